"""Benchmark API: image sets, settings, arms and `run_benchmark` on tiny synthetic data."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from umedpt.core import ConfigError, DataError, DataRootError
from umedpt.evaluation import RESULT_COLUMNS, extract_embeddings, nested_subsets, probe_benchmark
from umedpt.shapes import ShapesDataset
from umedpt.benchmark import (BENCHMARK_METRICS, BENCHMARK_PROFILES, BenchmarkSettings, ImageSet, build_arm, capped,
                              fingerprint, load_image_set, need_weights, probe_rows, run_benchmark, scores_table,
                              to_uint8)
from umedpt.benchmark import _metric


class TinyBlocks(nn.Module):
    "A stand-in for SharedBlocks: one convolution and global pooling, counting its embed calls."
    def __init__(self, seed: int = 0, dim: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.proj, self.calls = nn.Conv2d(3, dim, 3, padding=1), 0
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x).relu().mean((2, 3))
    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.embed(x)


@pytest.fixture(scope="module")
def splits():
    train = load_image_set(ShapesDataset("classification", n=60, size=32, seed=0), size=32, name="shapes")
    test = load_image_set(ShapesDataset("classification", n=30, size=32, seed=1), size=32, name="shapes")
    return train, test


SETTINGS = dict(size=32, fractions=[0.2, 0.5, 1.0], seeds=[0, 1, 2], ft_fractions=[0.5], ft_seeds=[0, 1], ft_steps=3,
                ft_batch=4, batch_size=16)


def _run(splits, arms=None, **kw):
    arms = arms if arms is not None else {"a": TinyBlocks(0), "b": TinyBlocks(1)}
    return run_benchmark(*splits, arms, BenchmarkSettings(**{**SETTINGS, **kw}), task="shapes", verbose=False)


# --- the results table ----------------------------------------------------------------------------------------------

def test_table_format(splits):
    run = _run(splits)
    r = run.results
    assert list(r.columns) == list(RESULT_COLUMNS)
    assert r.fraction.dtype == float and r.seed.dtype == np.int64 and r.value.dtype == float
    assert set(r.metric) == set(BENCHMARK_METRICS) and set(r.task) == {"shapes"}
    frozen, ft = r[r.setting == "frozen"], r[r.setting == "finetune"]
    assert len(frozen) == 2 * 3 * 3 * 3 and len(ft) == 2 * 1 * 2 * 3  # arms × fractions × seeds × metrics
    assert list(r.setting) == sorted(r.setting, key=["frozen", "finetune"].index)  # frozen rows first
    assert not r.duplicated(["arm", "setting", "fraction", "seed", "metric"]).any()
    assert r.value.between(0, 1).all()
    assert list(scores_table(r).columns) == ["a", "b"] and list(scores_table(r).index) == [0.2, 0.5, 1.0]


def test_frozen_rows_are_the_evaluation_protocol(splits):
    "The frozen rows equal probe_benchmark on nested_subsets: the chapter's numbers stay reproducible."
    train, test = splits
    arm = TinyBlocks(0)
    run = _run(splits, {"a": arm}, ft_fractions=[])
    subsets = nested_subsets(train.labels, fractions=SETTINGS["fractions"], seeds=SETTINGS["seeds"])
    f_train, f_test = (extract_embeddings(arm, s, batch_size=16)[0] for s in splits)
    ref = probe_benchmark(f_train, train.labels, f_test, test.labels, subsets,
                          {m: _metric(m) for m in BENCHMARK_METRICS}, task="shapes", arm="a", num_classes=3)
    key = ["fraction", "seed", "metric"]
    got = run.results.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref.sort_values(key).reset_index(drop=True), check_exact=False, rtol=1e-12,
                                  check_dtype=False)
    full = got[got.fraction == 1.0].pivot_table(index="metric", columns="seed", values="value")
    assert (full.nunique(axis=1) == 1).all()  # 100 %: the same images for every seed, one probe


def test_probe_rows_fits_identical_subsets_once(splits, monkeypatch):
    import umedpt.benchmark as bm
    calls = []
    real = bm.probe_benchmark
    monkeypatch.setattr(bm, "probe_benchmark", lambda *a, **k: calls.append(len(a[4])) or real(*a, **k))
    train, test = splits
    f_train, f_test = np.random.default_rng(0).normal(size=(60, 4)), np.random.default_rng(1).normal(size=(30, 4))
    subsets = nested_subsets(train.labels, fractions=[0.5, 1.0], seeds=[0, 1, 2])
    df = probe_rows(subsets, f_train, train.labels, f_test, test.labels, "shapes", "a", 3)
    assert calls == [4]  # 3 seeds at 50 % + one 100 % fit
    assert len(df) == 6 * len(BENCHMARK_METRICS)


def test_fine_tuning(splits):
    arm = TinyBlocks(0)
    before = fingerprint(arm)
    run = _run(splits, {"a": arm, "b": TinyBlocks(1)}, ft_arms=["b", "not-there"])
    assert fingerprint(arm) == before  # the arm itself is never trained
    assert run.finetuned_arms == ["b"] and set(run.results[run.results.setting == "finetune"].arm) == {"b"}
    assert sorted(run.losses) == [("b", 0.5, 0), ("b", 0.5, 1)]
    assert all(len(v) == 3 and np.isfinite(v).all() for v in run.losses.values())
    again = _run(splits, {"a": TinyBlocks(0), "b": TinyBlocks(1)}, ft_arms=["b"])
    pd.testing.assert_frame_equal(run.results, again.results)  # seeded: the same run twice


def test_no_fine_tuning(splits):
    run = _run(splits, ft_fractions=[])
    assert set(run.results.setting) == {"frozen"} and run.losses == {} and run.finetuned_arms == []


def test_feature_cache(splits, tmp_path):
    arm = TinyBlocks(0)
    settings = BenchmarkSettings(**{**SETTINGS, "ft_fractions": []})
    first = run_benchmark(*splits, {"a": arm}, settings, task="shapes", cache_dir=tmp_path, verbose=False)
    calls = arm.calls
    second = run_benchmark(*splits, {"a": arm}, settings, task="shapes", cache_dir=tmp_path, verbose=False)
    assert arm.calls == calls  # read from the cache
    pd.testing.assert_frame_equal(first.results, second.results)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert names == [f"shapes/a-{fingerprint(arm)}/test-32px-n30.safetensors",
                     f"shapes/a-{fingerprint(arm)}/train-32px-n60.safetensors"]


# --- errors ---------------------------------------------------------------------------------------------------------

def test_bad_arms(splits):
    with pytest.raises(ConfigError, match="arms is empty"): _run(splits, {})
    with pytest.raises(ConfigError, match="build_arm"): _run(splits, {"umedpt": "book/weights/umedpt-cpu"})
    with pytest.raises(ConfigError, match="is not built in"): build_arm("nonsense")
    with pytest.raises(ConfigError, match="embed"): build_arm("mine", nn.Linear(2, 2))


def test_bad_splits(splits):
    train, test = splits
    with pytest.raises(ConfigError, match="must be an ImageSet"):
        run_benchmark(ShapesDataset("classification", n=4), test, {"a": TinyBlocks()}, BenchmarkSettings(**SETTINGS))
    other = ImageSet(test.images, test.labels, ["x", "y", "z"], "other")
    with pytest.raises(DataError, match="different classes"):
        run_benchmark(train, other, {"a": TinyBlocks()}, BenchmarkSettings(**SETTINGS))
    with pytest.raises(DataError, match="images but"): ImageSet(test.images, test.labels[:2], test.classes, "t")


def test_need_weights(tmp_path):
    with pytest.raises(DataRootError, match="no umedpt weights at .*Make them"):
        need_weights(tmp_path, "umedpt", hint="Make them")
    with pytest.raises(DataRootError, match="no umedpt weights"): build_arm("umedpt", tmp_path)


def test_build_arm_from_saved_folder(tmp_path):
    from umedpt.weights import save_pretrained
    arm = build_arm("random")
    save_pretrained(arm, tmp_path / "w")
    again = build_arm("mine", tmp_path / "w")
    assert fingerprint(again) == fingerprint(arm) and not again.training


# --- settings -------------------------------------------------------------------------------------------------------

def test_settings():
    s = BenchmarkSettings.preset("smoke", ft_steps=2, seeds=None)
    assert (s.size, s.ft_steps, s.seeds, s.max_train) == (64, 2, [0, 1], 200)
    assert set(BENCHMARK_PROFILES) == {"smoke", "cpu", "gpu"}
    assert BenchmarkSettings.preset("cpu").ft_arms == ["imagenet", "umedpt"]
    with pytest.raises(ConfigError, match="profile must be one of"): BenchmarkSettings.preset("tpu")
    with pytest.raises(ConfigError, match="no field"): BenchmarkSettings.preset("cpu", steps=1)
    with pytest.raises(ConfigError): BenchmarkSettings(fractions=[0.0, 0.5])
    with pytest.raises(ConfigError): BenchmarkSettings(ft_fractions=[1.5])
    with pytest.raises(ConfigError): BenchmarkSettings(seeds=[-1])
    with pytest.raises(ConfigError, match="ft_batch"): BenchmarkSettings(ft_batch=0)
    with pytest.raises(ConfigError, match="max_train"): BenchmarkSettings(max_train=2.5)


# --- loading --------------------------------------------------------------------------------------------------------

class Mixed(Dataset):
    "Grey images of different sizes, with class labels."
    classes = ["dark", "light"]
    def __len__(self) -> int: return 20
    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 20 + i, 30), 0.2 if i % 2 else 0.8), "label": i % 2 == 0}


def test_load_image_set_from_a_dataset():
    s = load_image_set(Mixed(), size=16, n_max=10, name="mixed")
    assert s.images.shape == (len(s), 3, 16, 16) and s.images.dtype == torch.uint8 and len(s) <= 10
    assert set(s.labels) == {0, 1} and s.classes == ["dark", "light"] and s.name == "mixed"
    assert torch.all(s.images[s.labels == 1] == round(0.8 * 255))
    with pytest.raises(DataError, match="different sizes"): to_uint8(Mixed(), "mixed")
    with pytest.raises(ConfigError, match="registry names"): load_image_set(Mixed(), planes=True)


def test_capped_is_stratified():
    y = np.repeat([0, 1, 2], [70, 25, 5])
    s = ImageSet(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), y, ["a", "b", "c"], "t")
    c = capped(s, 20, seed=7)
    assert len(c) <= 20 and np.array_equal(c.labels, capped(s, 20, seed=7).labels)
    counts = np.bincount(c.labels, minlength=3)
    assert counts.min() >= 1 and abs(counts[0] / len(c) - 0.7) < 0.1
    assert capped(s, 200, seed=7) is s and capped(s, None, seed=0) is s
