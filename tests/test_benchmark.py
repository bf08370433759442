"""Benchmark API: image sets, settings, arms and `run_benchmark` on tiny synthetic data."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from umedpt.core import ConfigError, DataError, DataRootError
from umedpt.evaluation import (FRACTIONS, RESULT_COLUMNS, compare_arms, extract_embeddings, nested_subsets,
                               probe_benchmark)
from umedpt.shapes import ShapesDataset
from umedpt.benchmark import (BENCHMARK_METRICS, BENCHMARK_PROFILES, BenchmarkSettings, ImageSet, build_arm, capped,
                              fine_tune_run, fingerprint, load_image_set, majority_rows, need_weights, probe_rows,
                              run_benchmark, scores_table, to_uint8)
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


SETTINGS = dict(size=32, fractions=[0.2, 0.5, 1.0], seeds=[0, 1, 2], ft_fractions=[0.5], ft_seeds=[0, 1], ft_epochs=1,
                ft_batch=4, batch_size=16)  # fine-tuning: 30 images, ⌈30 / 4⌉ = 8 steps


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
    assert len(frozen) == 3 * 3 * 3 * 4 and len(ft) == 2 * 1 * 2 * 4  # (majority +) arms × fractions × seeds × metrics
    assert set(BENCHMARK_METRICS) == {"macro_f1", "accuracy", "balanced_accuracy", "auroc"}
    assert list(r.setting) == sorted(r.setting, key=["frozen", "finetune"].index)  # frozen rows first
    assert not r.duplicated(["arm", "setting", "fraction", "seed", "metric"]).any()
    assert r.value.between(0, 1).all()
    assert list(scores_table(r).columns) == ["majority", "a", "b"] and list(scores_table(r).index) == [0.2, 0.5, 1.0]
    assert set(r[r.arm == "majority"].setting) == {"frozen"}
    assert list(compare_arms(r, "macro_f1", "frozen").reference.unique()) == ["b"]  # default reference: the last arm


def test_frozen_rows_are_the_evaluation_protocol(splits):
    "The frozen rows equal probe_benchmark on nested_subsets: the chapter's numbers stay reproducible."
    train, test = splits
    arm = TinyBlocks(0)
    run = _run(splits, {"a": arm}, ft_fractions=[], majority=False)
    subsets = nested_subsets(train.labels, fractions=SETTINGS["fractions"], seeds=SETTINGS["seeds"])
    f_train, f_test = (extract_embeddings(arm, s, batch_size=16)[0] for s in splits)
    ref = probe_benchmark(f_train, train.labels, f_test, test.labels, subsets,
                          {m: _metric(m) for m in BENCHMARK_METRICS}, task="shapes", arm="a", num_classes=3)
    key = ["fraction", "seed", "metric"]
    got = run.results.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref.sort_values(key).reset_index(drop=True), check_exact=False, rtol=1e-12,
                                  check_dtype=False)
    lbfgs = _run(splits, {"a": arm}, ft_fractions=[], probe_solver="lbfgs").results
    full = lbfgs[(lbfgs.arm == "a") & (lbfgs.fraction == 1.0)].pivot_table(index="metric", columns="seed",
                                                                           values="value")
    assert (full.nunique(axis=1) == 1).all()  # lbfgs at 100 %: the same images for every seed, one probe (n = 1)


def test_probe_rows_fits_every_seed_and_lbfgs_identical_subsets_once(splits, monkeypatch):
    import umedpt.benchmark as bm
    calls = []
    real = bm.probe_benchmark
    monkeypatch.setattr(bm, "probe_benchmark", lambda *a, **k: calls.append(len(a[4])) or real(*a, **k))
    train, test = splits
    f_train, f_test = np.random.default_rng(0).normal(size=(60, 4)), np.random.default_rng(1).normal(size=(30, 4))
    subsets = nested_subsets(train.labels, fractions=[0.5, 1.0], seeds=[0, 1, 2])
    df = probe_rows(subsets, f_train, train.labels, f_test, test.labels, "shapes", "a", 3, solver="lbfgs")
    assert calls == [4]  # 3 seeds at 50 % + one 100 % fit
    assert len(df) == 6 * len(BENCHMARK_METRICS)
    df = probe_rows(subsets, f_train, train.labels, f_test, test.labels, "shapes", "a", 3, epochs=5)
    assert calls == [4, 6] and len(df) == 6 * len(BENCHMARK_METRICS)  # adamw: every seed is a fit of its own


def test_majority_rows_by_hand():
    subsets = {(0, 1.0): np.arange(3)}
    rows = majority_rows(subsets, np.array([0, 0, 1]), np.array([0, 1, 1, 2]), "t", 3).set_index("metric").value
    # always class 0: accuracy 1/4; recalls 1, 0, 0; F1 of class 0: precision 1/4, recall 1 -> 2/5, others 0
    assert rows["accuracy"] == 0.25 and rows["balanced_accuracy"] == pytest.approx(1 / 3)
    assert rows["macro_f1"] == pytest.approx(0.4 / 3) and rows["auroc"] == 0.5


def test_fine_tuning(splits):
    arm = TinyBlocks(0)
    before = fingerprint(arm)
    run = _run(splits, {"a": arm, "b": TinyBlocks(1)}, ft_arms=["b", "not-there"])
    assert fingerprint(arm) == before  # the arm itself is never trained
    assert run.finetuned_arms == ["b"] and set(run.results[run.results.setting == "finetune"].arm) == {"b"}
    assert sorted(run.losses) == [("b", 0.5, 0), ("b", 0.5, 1)] == sorted(run.encoder_change)
    assert all(len(v) == 8 and np.isfinite(v).all() for v in run.losses.values())  # 1 epoch of ⌈30 / 4⌉ steps
    assert all(c > 0 for c in run.encoder_change.values())  # fine-tuning moved the encoder
    assert all(v[0] > 0.05 for v in run.losses.values())  # and did not start at a loss of zero
    again = _run(splits, {"a": TinyBlocks(0), "b": TinyBlocks(1)}, ft_arms=["b"])
    pd.testing.assert_frame_equal(run.results, again.results)  # seeded, augmentation included: the same run twice
    assert again.encoder_change == run.encoder_change


def test_fine_tune_run_by_epochs_with_augmentation(splits):
    train, test = splits
    arm = TinyBlocks(2)
    feats = extract_embeddings(arm, train)[0]
    idx = nested_subsets(train.labels, fractions=[0.5], seeds=[0])[(0, 0.5)]
    run = lambda **kw: fine_tune_run(arm, train, test, feats, idx, 0, 0.5, BenchmarkSettings(**{**SETTINGS, **kw}),
                                     "shapes", "a", "cpu")
    plain, aug = run(ft_epochs=2, ft_augment=False), run(ft_epochs=2)
    assert len(plain.losses) == len(aug.losses) == 2 * 8
    assert plain.losses != aug.losses  # the domain recipe changed the images
    assert run(ft_epochs=2).losses == aug.losses  # and it is seeded
    assert [r["metric"] for r in aug.rows] == list(BENCHMARK_METRICS) and aug.encoder_change > 0
    xray = ImageSet(train.images, train.labels, train.classes, "x", domain="xray")
    assert fine_tune_run(arm, xray, test, feats, idx, 0, 0.5, BenchmarkSettings(**{**SETTINGS, "ft_epochs": 2}),
                         "shapes", "a", "cpu").losses != aug.losses  # the set's own domain is used


def test_no_fine_tuning(splits):
    run = _run(splits, ft_fractions=[])
    assert set(run.results.setting) == {"frozen"} and run.losses == {} and run.finetuned_arms == []
    assert run.encoder_change == {}


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
    with pytest.raises(ConfigError, match="majority baseline"): _run(splits, {"majority": TinyBlocks()})
    assert "majority" in set(_run(splits, {"majority": TinyBlocks()}, majority=False, ft_fractions=[]).results.arm)


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
    s = BenchmarkSettings.preset("smoke", ft_epochs=2, seeds=None)
    assert (s.size, s.ft_epochs, s.seeds, s.max_train) == (64, 2, [0, 1], 200)
    assert set(BENCHMARK_PROFILES) == {"smoke", "cpu", "gpu", "gpu-dry"}
    assert BenchmarkSettings.preset("cpu").ft_arms == ["imagenet", "umedpt"]
    with pytest.raises(ConfigError, match="profile must be one of"): BenchmarkSettings.preset("tpu")
    with pytest.raises(ConfigError, match="no field"): BenchmarkSettings.preset("cpu", steps=1)
    with pytest.raises(ConfigError, match="no field"): BenchmarkSettings.preset("cpu", ft_steps=1)  # now ft_epochs
    with pytest.raises(ConfigError): BenchmarkSettings(fractions=[0.0, 0.5])
    with pytest.raises(ConfigError): BenchmarkSettings(ft_fractions=[1.5])
    with pytest.raises(ConfigError): BenchmarkSettings(seeds=[-1])
    with pytest.raises(ConfigError, match="ft_batch"): BenchmarkSettings(ft_batch=0)
    with pytest.raises(ConfigError, match="ft_epochs"): BenchmarkSettings(ft_epochs=1.5)
    with pytest.raises(ConfigError, match="probe_epochs"): BenchmarkSettings(probe_epochs=0)
    with pytest.raises(ConfigError, match="probe_solver"): BenchmarkSettings(probe_solver="sgd")
    with pytest.raises(ConfigError, match="ft_augment"): BenchmarkSettings(ft_augment="yes")
    with pytest.raises(ConfigError, match="channels_last"): BenchmarkSettings(channels_last=1)
    with pytest.raises(ConfigError, match="max_train"): BenchmarkSettings(max_train=2.5)


def test_presets_are_the_protocol_at_their_scale():
    presets = {name: BenchmarkSettings.preset(name) for name in BENCHMARK_PROFILES}  # every preset is valid
    assert presets["gpu"] == BenchmarkSettings()  # the paper: the defaults
    gpu = presets["gpu"]
    assert (gpu.probe_epochs, gpu.ft_epochs, gpu.fractions, gpu.ft_fractions, gpu.seeds, gpu.ft_seeds) == \
        (100, 100, list(FRACTIONS), list(FRACTIONS), [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    cpu = presets["cpu"]  # frozen setting complete; fine-tuning at 1 %, three seeds (a t-test needs ≥ 2)
    assert (cpu.probe_epochs, cpu.fractions, cpu.seeds, cpu.probe_solver) == (100, list(FRACTIONS), [0, 1, 2, 3, 4],
                                                                             "adamw")
    assert cpu.ft_fractions == [0.01] and len(cpu.ft_seeds) >= 3 and cpu.ft_epochs >= 10 and cpu.size == 128
    smoke = presets["smoke"]  # tiny: a chapter in seconds
    assert smoke.max_train <= 200 and smoke.ft_epochs <= 5 and len(smoke.seeds) == 2
    dry = presets["gpu-dry"]
    assert (dry.size, dry.max_train, dry.max_test, dry.ft_epochs) == (64, 48, 24, 1)
    assert {k for k, v in vars(gpu).items() if vars(dry)[k] != v} <= {
        "size", "max_train", "max_test", "fractions", "seeds", "ft_fractions", "ft_seeds", "ft_epochs", "ft_batch"}
    for p in presets.values():  # every fine-tuning run of a preset makes at least one step per epoch, ≥ 1 image
        assert p.ft_batch >= 1 and (not p.ft_fractions or set(p.ft_seeds) <= set(range(5)))


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


def test_image_set_domain():
    s = load_image_set(Mixed(), size=8, name="mixed")
    assert s.domain == "general" and load_image_set(Mixed(), size=8, domain="mri").domain == "mri"
    assert s.subset([0, 1]).domain == "general"
    with pytest.raises(ConfigError, match="unknown augmentation domain"): load_image_set(Mixed(), size=8, domain="ct")


def test_registry_image_set_takes_the_cards_domain(real_data):
    s = load_image_set("kermany_pneumonia_cxr_224", "test", size=32, n_max=6)
    assert s.domain == "xray" and len(s) <= 6


def test_capped_is_stratified():
    y = np.repeat([0, 1, 2], [70, 25, 5])
    s = ImageSet(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), y, ["a", "b", "c"], "t")
    c = capped(s, 20, seed=7)
    assert len(c) <= 20 and np.array_equal(c.labels, capped(s, 20, seed=7).labels)
    counts = np.bincount(c.labels, minlength=3)
    assert counts.min() >= 1 and abs(counts[0] / len(c) - 0.7) < 0.1
    assert capped(s, 200, seed=7) is s and capped(s, None, seed=0) is s
