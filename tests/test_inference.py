"""Inference: embeddings independent of neighbours and order, input checks, image files of every kind."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from umedpt.core import ConfigError, DataError, InputError
from umedpt.blocks import BlocksConfig, SharedBlocks
from umedpt.inference import embed_images, load_image


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return SharedBlocks(BlocksConfig()).eval()


def test_embeddings_do_not_depend_on_neighbours_or_order(blocks):
    g = torch.Generator().manual_seed(0)
    sizes = [(33, 45), (64, 64), (50, 90), (64, 64), (100, 31), (40, 40), (33, 45)]
    imgs = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    together = embed_images(blocks, imgs, batch_size=3, device="cpu")
    alone = np.concatenate([embed_images(blocks, [im], device="cpu") for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    perm = [6, 2, 0, 5, 1, 4, 3]
    shuffled = embed_images(blocks, [imgs[i] for i in perm], batch_size=2, device="cpu")
    np.testing.assert_allclose(shuffled, together[perm], atol=1e-4)
    with torch.no_grad():  # "alone" means: padded bottom/right with zeros to a multiple of 32
        h, w = sizes[2]
        ref = blocks.embed(F.pad(imgs[2], (0, -w % 32, 0, -h % 32))[None]).numpy()
    np.testing.assert_allclose(alone[2:3], ref, atol=1e-4)
    # and padding does matter, so the test above can fail: more zero padding changes the embedding
    with torch.no_grad(): more = blocks.embed(F.pad(imgs[2], (0, -w % 32 + 32, 0, -h % 32 + 32))[None]).numpy()
    assert np.abs(more - ref).max() > 1e-2


def test_embed_images_keeps_training_mode_and_checks_input(blocks):
    blocks.train()
    embed_images(blocks, [torch.rand(3, 32, 32)], device="cpu")
    assert blocks.training
    blocks.eval()
    with pytest.raises(InputError, match="image 1: expected a float tensor"):
        embed_images(blocks, [torch.rand(3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(InputError, match="image 0: expected a tensor or a file path"):
        embed_images(blocks, [np.zeros((3, 4, 4))])
    with pytest.raises(ConfigError, match="batch_size"): embed_images(blocks, [torch.rand(3, 32, 32)], batch_size=0)


def test_load_image_formats(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    t = load_image(tmp_path / "rgba.png")
    assert t.shape == (3, 20, 30) and torch.allclose(t, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1) / 255)
    g16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    t16 = load_image(tmp_path / "g16.png", channels=1)
    assert t16.shape == (1, 20, 30) and torch.allclose(t16[0], torch.from_numpy(g16.astype(np.float32) / 65535))
    import tifffile
    tifffile.imwrite(tmp_path / "chw.tif", np.stack([g16] * 3), photometric="rgb", planarconfig="separate")  # CHW
    assert load_image(tmp_path / "chw.tif").shape == (3, 20, 30)
    tifffile.imwrite(tmp_path / "f.tif", np.full((8, 8), 3.5, np.float32))
    with pytest.raises(DataError, match=r"f\.tif: unsupported pixel type float32"): load_image(tmp_path / "f.tif")


