"""Volume benchmark (umedpt.volume_benchmark): bags of slice embeddings, their cache, pooling heads, the 3D CNN."""
import numpy as np
import pytest
import torch
from torch import nn
from umedpt.core import ConfigError, DataError, InputError
from umedpt.evaluation import nested_subsets
from umedpt.volume_benchmark import (VolumeSet, VolumeSettings, bag_probe_rows, embed_volumes, fine_tune_bags,
                                     fit_bag_head, fit_volume_cnn, load_volumes, predict_bag_head, predict_volumes,
                                     volume_cnn, volume_slices)


def _toy(n: int, seed: int, size: int = 12) -> VolumeSet:
    "Empty volumes with a bright ball (class 1) or a dim cube (class 0) near the centre."
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    g = np.stack(np.meshgrid(*[np.arange(size) - size / 2 + 0.5] * 3, indexing="ij"))
    vols = []
    for label in y:
        r = rng.uniform(0.15, 0.3) * size
        inside = (np.sqrt((g ** 2).sum(0)) < r) if label else (np.abs(g).max(0) < r * 0.8)
        vols.append((inside * (255 if label else 120)).astype(np.uint8))
    return VolumeSet(np.stack(vols), y, ["cube", "ball"], f"toy-{seed}")


class _Blocks(nn.Module):
    "Tiny stand-in blocks with `embed`; counts the slices they embed."
    def __init__(self):
        super().__init__(); torch.manual_seed(0); self.conv, self.seen = nn.Conv2d(3, 4, 3, padding=1), 0

    def embed(self, x):
        self.seen += len(x); h = self.conv(x).relu()
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def _monai():
    "MONAI's first import takes seconds; done once, outside the timed test."
    import monai.networks.nets  # noqa: F401


def test_bags_have_one_embedding_per_slice_and_match_direct_embedding():
    toy, blocks = _toy(6, 0), _Blocks()
    for axis in (0, 2):
        bags = embed_volumes(blocks, toy, axis=axis, progress=False)
        assert bags.shape == (6, 12, 8) and bags.dtype == np.float32
        with torch.no_grad(): direct = blocks.embed(volume_slices(toy.volumes[4], axis=axis)).numpy()
        np.testing.assert_allclose(bags[4], direct, atol=1e-5)
    blocks.seen = 0
    embed_volumes(blocks, toy, progress=False)
    assert blocks.seen < 6 * 12  # the empty slices are embedded once
    resized = embed_volumes(blocks, toy, size=20, progress=False)
    assert resized.shape == (6, 12, 8) and not np.allclose(resized, bags)


def test_cache_is_reused_and_invalidated_by_weights_and_data(tmp_path):
    toy, blocks = _toy(6, 0), _Blocks()
    a = embed_volumes(blocks, toy, cache_dir=tmp_path, key="t/arm/train", progress=False)
    n = blocks.seen
    b = embed_volumes(blocks, toy, cache_dir=tmp_path, key="t/arm/train", progress=False)
    assert blocks.seen == n and np.array_equal(a, b)
    other = _toy(6, 1)
    c = embed_volumes(blocks, other, cache_dir=tmp_path, key="t/arm/train", progress=False)
    assert blocks.seen > n and not np.array_equal(a, c)  # other voxels: another entry
    n = blocks.seen
    with torch.no_grad(): blocks.conv.weight.mul_(2)
    d = embed_volumes(blocks, toy, cache_dir=tmp_path, key="t/arm/train", progress=False)
    assert blocks.seen > n and not np.allclose(a, d)  # other weights: another entry
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_attention_head_learns_the_toy_problem():
    blocks = _Blocks()
    train, test = _toy(48, 1), _toy(24, 2)
    tb, sb = embed_volumes(blocks, train, progress=False), embed_volumes(blocks, test, progress=False)
    subsets = nested_subsets(train.labels, fractions=[1.0], seeds=[0, 1])
    rows = bag_probe_rows(subsets, tb, train.labels, sb, test.labels, "toy", "tiny", 2, epochs=30, lr=1e-2, hidden=8)
    assert set(rows.setting) == {"frozen-attention"} and len(rows) == 2 * 4
    assert rows[rows.metric == "accuracy"].value.mean() > 0.85
    head, _ = fit_bag_head(tb, train.labels, 2, pooling="mean", epochs=3)
    p = predict_bag_head(head, sb)
    assert p.shape == (24, 2) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_fine_tuning_trains_a_copy():
    blocks = _Blocks()
    train, test = _toy(12, 1), _toy(6, 2)
    before = blocks.conv.weight.detach().clone()
    r = fine_tune_bags(blocks, train, test, embed_volumes(blocks, train, progress=False), np.arange(8), 0, 1.0, "toy",
                       "tiny", epochs=2, batch_size=4, head_options=dict(epochs=2, hidden=4), lr_encoder=1e-2)
    assert len(r.losses) == 2 * 2 and r.encoder_change > 0
    assert torch.equal(blocks.conv.weight, before)
    assert {row["setting"] for row in r.rows} == {"finetune-attention"} and len(r.rows) == 4


def test_3d_cnn_learns_a_separable_problem(_monai):
    train, test = _toy(16, 3, size=12), _toy(16, 4, size=12)
    model, losses = fit_volume_cnn(train, epochs=5, batch_size=8, lr=3e-3, device="cpu")
    acc = (predict_volumes(model, test).argmax(1) == test.labels).mean()
    # the per-step losses of two-volume-class batches are too noisy to compare two of them: compare the whole
    # training set's cross-entropy before (the same seed's untrained network) and after training
    ce = lambda m: float(-np.log(predict_volumes(m, train)[np.arange(len(train)), train.labels] + 1e-9).mean())
    assert len(losses) == 5 * 2 and ce(model) < ce(volume_cnn(2, seed=0)) and acc > 0.8, (losses, acc)


def test_bad_input_is_refused(tmp_path):
    toy, blocks = _toy(4, 0), _Blocks()
    with pytest.raises(InputError, match="volume: expected D×H×W"): volume_slices(toy.volumes)
    with pytest.raises(ConfigError, match="axis must be 0, 1 or 2"): volume_slices(toy.volumes[0], axis=-1)
    with pytest.raises(ConfigError, match="size must be a positive"): volume_slices(toy.volumes[0], size=0)
    with pytest.raises(InputError, match="volumes must be uint8"): embed_volumes(blocks, toy.volumes / 255)
    with pytest.raises(InputError, match="no volumes given"): embed_volumes(blocks, toy.volumes[:0])
    with pytest.raises(ConfigError, match="give a cache `key`"): embed_volumes(blocks, toy, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="cache key"): embed_volumes(blocks, toy, cache_dir=tmp_path, key="../x")
    with pytest.raises(DataError, match="labels must be class indices below 2"):
        VolumeSet(toy.volumes, toy.labels + 2, ["a", "b"])
    with pytest.raises(DataError, match="volumes must be uint8"): VolumeSet(toy.volumes * 1.0, toy.labels, ["a", "b"])
    with pytest.raises(InputError, match="labels: expected 4 class indices"): fit_volume_cnn(toy.volumes, [0, 1])
    with pytest.raises(ConfigError, match="epochs must be a positive integer"): fit_volume_cnn(toy, epochs=0)
    with pytest.raises(InputError, match="below num_classes=2"):
        fit_bag_head(np.zeros((4, 3, 2)), [0, 1, 2, 0], 2)
    with pytest.raises(ConfigError, match="pooling must be one of"): fit_bag_head(np.zeros((4, 3, 2)), [0, 1, 0, 1], 2,
                                                                                  pooling="max")
    with pytest.raises(ConfigError, match="cnn_size must be 28 or 64"): VolumeSettings(cnn_size=32)
    with pytest.raises(ConfigError, match="unknown dataset"): load_volumes("adrenal")
    with pytest.raises(ConfigError, match="not a MedMNIST-3D npz card"): load_volumes("kvasir_seg_256")


def test_real_adrenal_volumes(real_data):
    vs = load_volumes("medmnist_small/adrenalmnist3d_64", "test", root=real_data)
    assert vs.volumes.shape == (298, 64, 64, 64) and vs.volumes.dtype == np.uint8 and vs.classes[1] == "hyperplasia"
    small = load_volumes("medmnist_small/adrenalmnist3d", "test", n_max=30, root=real_data)
    assert small.volumes.shape[1:] == (28, 28, 28) and len(small) <= 30 and set(small.labels) == {0, 1}
