"""Evaluation protocol: subsets, feature cache, probes, fine-tuning and statistics beyond the notebook's examples."""
import math
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from scipy import stats
from umedpt.core import ConfigError, DataError, TrainingError
from umedpt.evaluation import (FRACTIONS, PROBE_SOLVERS, RESULT_COLUMNS, cached_features, compare_arms,
                               extract_embeddings, fine_tune, fine_tune_task, fit_linear_probe, fit_linear_probes,
                               fit_probe, holm, linear_probe_task, nested_subsets, paired_ttest, plot_scarcity,
                               probe_benchmark, relative_change, results_frame, table1_summary, task_results)


# --- nested subsets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes,n,seed", [(2, 50, 0), (3, 333, 1), (7, 1000, 2), (10, 123, 3)])
def test_nested_subsets_properties(n_classes, n, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(n_classes) * 0.7)
    y = rng.choice(n_classes, n, p=p)
    y[:n_classes] = np.arange(n_classes)  # every class occurs
    subsets = nested_subsets(y, seeds=range(5))
    full = np.bincount(y, minlength=n_classes)
    for s in range(5):
        for a, b in zip(FRACTIONS, FRACTIONS[1:]):
            assert np.isin(subsets[(s, a)], subsets[(s, b)]).all()
        assert np.array_equal(subsets[(s, 1.0)], np.arange(n))
    for (s, f), idx in subsets.items():
        assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)  # sorted, no duplicates
        counts = np.bincount(y[idx], minlength=n_classes)
        assert counts.min() >= 1
        want = np.maximum(1, np.floor(f * full + 0.5))
        assert np.array_equal(counts, np.minimum(full, want)), (f, counts, want)


def test_nested_subsets_independent_of_fraction_order_and_other_seeds():
    y = np.random.default_rng(0).integers(0, 4, 400)
    a = nested_subsets(y, fractions=(0.1, 0.5, 1.0), seeds=[0, 1])
    b = nested_subsets(y, fractions=(1.0, 0.5, 0.1), seeds=[1])
    assert np.array_equal(a[(1, 0.5)], b[(1, 0.5)])
    assert not np.array_equal(a[(0, 0.1)], a[(1, 0.1)])


def test_nested_subsets_min_per_class_and_tiny_classes():
    y = np.array([0] * 98 + [1] * 2)
    sub = nested_subsets(y, fractions=(0.01,), seeds=[0], min_per_class=3)[(0, 0.01)]
    assert np.bincount(y[sub]).tolist() == [3, 2]  # class 1 has only two examples: both are taken
    assert len(nested_subsets(y, fractions=(0.01,), seeds=[0], min_per_class=0)[(0, 0.01)]) == 1


def test_nested_subsets_bad_input():
    with pytest.raises(ConfigError, match="seeds"): nested_subsets(np.zeros(5, int), seeds=[-1])
    with pytest.raises(ConfigError, match="fractions"): nested_subsets(np.zeros(5, int), fractions=(0.5, 0.5))
    with pytest.raises(ConfigError, match="fractions"): nested_subsets(np.zeros(5, int), fractions=(1.5,))
    with pytest.raises(ConfigError, match="n must be"): nested_subsets(None, n=0)
    with pytest.raises(ConfigError, match="multi-hot"): nested_subsets(np.zeros((5, 2, 2)))


# --- feature cache --------------------------------------------------------------------------------------------------

def test_cached_features_failed_compute_leaves_nothing(tmp_path):
    def boom(): raise RuntimeError("compute failed")
    with pytest.raises(RuntimeError): cached_features("a/b", boom, tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cached_features("a/b", lambda: np.ones(3), tmp_path).tolist() == [1, 1, 1]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.npy"))


class _Counting(nn.Module):
    "A stand-in encoder: mean colour and size of each image, counting forward passes."
    def __init__(self): super().__init__(); self.calls = 0; self.w = nn.Parameter(torch.ones(1))
    def embed(self, x):
        self.calls += 1
        return torch.cat([x.mean((2, 3)), torch.full((len(x), 1), float(x.shape[-1]))], 1) * self.w


def test_extract_embeddings_caches_and_detects_stale_cache(tmp_path):
    data = [{"image": torch.rand(3, 32 + 8 * (i % 3), 40), "label": i % 2} for i in range(10)]
    enc = _Counting()
    x1, y1 = extract_embeddings(enc, data, batch_size=4, cache_dir=tmp_path, key="arm/task/train")
    calls = enc.calls
    x2, y2 = extract_embeddings(enc, data, batch_size=4, cache_dir=tmp_path, key="arm/task/train")
    assert enc.calls == calls and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert y1.tolist() == [i % 2 for i in range(10)] and x1.shape == (10, 4) and x1.dtype == np.float32
    with pytest.raises(DataError, match="holds 10 rows for a dataset of 5"):
        extract_embeddings(enc, data[:5], cache_dir=tmp_path, key="arm/task/train")
    with pytest.raises(ConfigError, match="key"): extract_embeddings(enc, data, cache_dir=tmp_path)
    multi = [{"image": torch.rand(3, 32, 32), "labels": torch.tensor([1.0, float("nan")])} for _ in range(3)]
    _, ym = extract_embeddings(enc, multi)
    assert ym.shape == (3, 2) and np.isnan(ym[:, 1]).all()
    seg = [{"image": torch.rand(3, 32, 32), "mask": torch.zeros(32, 32, dtype=torch.long)} for _ in range(3)]
    assert extract_embeddings(enc, seg)[1] is None


# --- probes and the frozen benchmark --------------------------------------------------------------------------------

def _separable(n, k=4, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).normal(0, 4, (k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32), y


def test_probe_benchmark_rows_and_scores():
    Xtr, ytr = _separable(200); Xte, yte = _separable(100, seed=1)
    subsets = nested_subsets(ytr, fractions=(0.05, 1.0), seeds=range(3))
    acc = lambda y, p: float((p.argmax(1) == y).mean())
    nll = lambda y, p: -np.log(p[np.arange(len(y)), y]).mean()
    res = probe_benchmark(Xtr, ytr, Xte, yte, subsets, {"accuracy": acc, "nll": nll},
                          task="blobs", arm="a")
    assert list(res.columns) == list(RESULT_COLUMNS) and len(res) == 2 * 6
    assert set(res.setting) == {"frozen"} and set(res.fraction) == {0.05, 1.0}
    full = res[(res.fraction == 1.0) & (res.metric == "accuracy")].value
    assert (full == 1.0).all()
    # more data never hurts these well-separated blobs' likelihood on average
    nll = res[res.metric == "nll"].groupby("fraction").value.mean()
    assert nll[1.0] < nll[0.05]


def test_multilabel_probe_benchmark_uses_sigmoid():
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (300, 6)).astype(np.float32)
    Y = (X[:, :3] > 0).astype(np.float32)
    seen = {}
    def metric(y, p): seen["p"] = p; return float(((p > 0.5) == (y > 0.5)).mean())
    res = probe_benchmark(X[:200], Y[:200], X[200:], Y[200:], nested_subsets(Y[:200], fractions=(1.0,), seeds=[0]),
                          {"acc": metric}, task="ml", arm="a")
    assert res.value.item() > 0.9
    assert seen["p"].shape == (100, 3) and not np.allclose(seen["p"].sum(1), 1)  # independent sigmoids, not softmax


def _head_equal(a: nn.Linear, b: nn.Linear) -> bool:
    return torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_adamw_probe_is_seeded_learns_and_folds_the_standardisation():
    X, y = _separable(240, k=4, d=12); Xt, yt = _separable(200, k=4, d=12, seed=1)
    head = fit_linear_probe(X, y)
    assert _head_equal(head, fit_linear_probe(X, y))  # deterministic for a seed
    assert not _head_equal(head, fit_linear_probe(X, y, seed=1))  # another seed: another init and batch order
    with torch.no_grad():
        assert (head(torch.from_numpy(Xt)).argmax(1).numpy() == yt).mean() == 1.0  # a separable problem is learnt
        # logits on raw features: a change of units (scale, shift) standardises away
        shifted = fit_linear_probe(X * 100 + 7, y)(torch.from_numpy(Xt * 100 + 7))
        torch.testing.assert_close(shifted, head(torch.from_numpy(Xt)), atol=1e-3, rtol=1e-4)
    # the weight decay keeps the probe soft: its training loss stays clearly above zero on separable data
    with torch.no_grad():
        train_ce = nn.functional.cross_entropy(head(torch.from_numpy(X)), torch.from_numpy(y)).item()
        lbfgs_ce = nn.functional.cross_entropy(fit_linear_probe(X, y, solver="lbfgs")(torch.from_numpy(X)),
                                               torch.from_numpy(y)).item()
    assert train_ce > 5 * lbfgs_ce, (train_ce, lbfgs_ce)


def test_probe_epochs_and_batch_size_set_the_steps(monkeypatch):
    import umedpt.evaluation as ev
    seen = []
    real = ev.train_steps
    monkeypatch.setattr(ev, "train_steps", lambda opt, loss, batches, steps, **kw: seen.append(steps) or
                        real(opt, loss, batches, steps, **kw))
    X, y = _separable(50, k=2, d=4)
    fit_linear_probe(X, y, epochs=3, batch_size=16)
    fit_linear_probe(X, y, epochs=2, batch_size=128)  # at most N per batch: one full batch per epoch
    assert seen == [3 * 4, 2 * 1]


def test_fit_linear_probes_equals_one_probe_each():
    X, y = _separable(90, k=3, d=6)
    subsets = [np.arange(0, 60), np.arange(30, 90), np.arange(15, 75)]
    together = fit_linear_probes([(X[i], y[i]) for i in subsets], [0, 1, 2])
    for i, seed, head in zip(subsets, [0, 1, 2], together):
        alone = fit_linear_probe(X[i], y[i], seed=seed)
        torch.testing.assert_close(head.weight, alone.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(head.bias, alone.bias, atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="differ in size"):
        fit_linear_probes([(X[:10], y[:10]), (X[:20], y[:20])], [0, 1])
    with pytest.raises(ConfigError, match="one seed per problem"): fit_linear_probes([(X, y)], [0, 1])


def test_probe_loss_is_the_tasks_normalised_losses():
    from umedpt.evaluation import _probe_loss
    from umedpt.losses import ClassificationLoss, MultiLabelLoss
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 4, 8, generator=g), torch.randint(0, 4, (3, 8), generator=g)  # S×K×B, classes first
    want = sum(ClassificationLoss(4)(logits[s].T, y[s]) for s in range(3))
    torch.testing.assert_close(_probe_loss(logits, y), want)
    ym = (torch.rand(3, 8, 4, generator=g) > 0.5).float(); ym[torch.rand(3, 8, 4, generator=g) < 0.3] = float("nan")
    want = sum(MultiLabelLoss(4)(logits[s].T, ym[s]) for s in range(3))
    torch.testing.assert_close(_probe_loss(logits, ym), want)


def test_probe_solvers_and_bad_input():
    X, y = _separable(60, k=3, d=5)
    for solver in PROBE_SOLVERS:
        with torch.no_grad(): head = fit_linear_probe(X, y, solver=solver)  # fits under no_grad too
        assert (head(torch.from_numpy(X)).argmax(1).numpy() == y).mean() == 1.0
    assert _head_equal(fit_linear_probe(X, y, solver="lbfgs", seed=0), fit_linear_probe(X, y, solver="lbfgs", seed=4))
    for kw, msg in [(dict(solver="sgd"), "solver must be one of"), (dict(epochs=0), "epochs must be a positive"),
                    (dict(epochs=2.5), "epochs must be a positive"), (dict(batch_size=0), "batch_size must be"),
                    (dict(lr=-1.0), "lr > 0"), (dict(weight_decay=-0.1), "weight_decay >= 0"),
                    (dict(seed=-2), "seed must be")]:
        with pytest.raises(ConfigError, match=msg): fit_linear_probe(X, y, **kw)
    with pytest.raises(Exception, match="nan or inf"): fit_linear_probe(np.full((4, 2), np.nan), np.arange(4) % 2)
    with pytest.raises(Exception, match="at least two classes"): fit_linear_probe(X, np.zeros(60, int))
    with pytest.raises(ConfigError, match="subsets' seeds"):
        probe_benchmark(X, y, X, y, {(0, 1.0): np.arange(60)}, {}, task="t", arm="a", seed=3)


# --- fine-tuning ----------------------------------------------------------------------------------------------------

def test_fine_tune_learns_and_unfreezes():
    torch.manual_seed(0)
    X, y = _separable(256, k=3, d=8)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    enc, head = nn.Linear(8, 8), nn.Linear(8, 3)
    for p in enc.parameters(): p.requires_grad_(False)  # e.g. left frozen by a probe run
    w0 = enc.weight.clone()
    loader = [{"x": X[i:i + 32], "y": y[i:i + 32]} for i in range(0, 256, 32)]
    ce = lambda o, batch: nn.functional.cross_entropy(o, batch["y"])
    losses = fine_tune(enc, head, lambda b, h, batch: h(b(batch["x"])), ce, loader, steps=60, lr_encoder=1e-2,
                       lr_head=5e-2, device="cpu")
    assert len(losses) == 60 and np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
    assert not torch.equal(enc.weight, w0) and enc.weight.requires_grad
    assert not enc.training and not head.training


def test_relative_change():
    before = [torch.ones(3), torch.zeros(2)]
    assert relative_change(before, [torch.full((3,), 2.0), torch.zeros(2)]) == pytest.approx(1.0)
    assert relative_change(before, [t.clone() for t in before]) == 0.0
    assert relative_change(before, [torch.ones(3), torch.tensor([3.0, 4.0])]) == pytest.approx(5 / math.sqrt(3))
    with pytest.raises(ValueError): relative_change(before, [torch.ones(3)])  # not the same tensors


def test_channels_last_matches_standard_layout(dense_blocks):
    "Channels-last (the CPU default) gives the standard layout's numbers to float rounding, and restores the layout."
    import copy
    from umedpt.shapes import ShapesDataset
    ds = ShapesDataset("classification", n=6, size=64, seed=3)
    a = extract_embeddings(dense_blocks, ds, batch_size=3, channels_last=False)[0]
    b = extract_embeddings(dense_blocks, ds, batch_size=3)[0]  # default on the CPU: channels-last
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    batch = {"image": torch.stack([ds[i]["image"] for i in range(6)]),
             "label": torch.tensor([ds[i]["label"] for i in range(6)])}
    runs = {}
    for cl in (False, True):
        torch.manual_seed(0)
        blocks, head = copy.deepcopy(dense_blocks), nn.Linear(dense_blocks.embed_dim, 3)
        losses = fine_tune(blocks, head, lambda b_, h, x: h(b_.embed(x["image"])),
                           lambda o, x: nn.functional.cross_entropy(o, x["label"]), [batch], steps=3, lr_encoder=1e-4,
                           device="cpu", channels_last=cl)
        runs[cl] = (losses, blocks)
        assert all(p.is_contiguous() for p in blocks.parameters())  # the standard layout again
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4)
    change = [relative_change(list(dense_blocks.encoder.parameters()), list(runs[cl][1].encoder.parameters()))
              for cl in (False, True)]
    assert change[0] > 0 and change[1] == pytest.approx(change[0], rel=1e-2)
    with pytest.raises(ConfigError, match="channels_last"): extract_embeddings(dense_blocks, ds, channels_last="yes")


def test_fine_tune_bad_steps():
    with pytest.raises(ConfigError, match="steps"):
        fine_tune(nn.Linear(1, 1), nn.Linear(1, 1), lambda *a: None, lambda *a: None, [{}], steps=0, device="cpu")


# --- dense probes (segmentation, detection) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_blocks():
    from umedpt.blocks import SharedBlocks
    torch.manual_seed(0)
    return SharedBlocks(norm="layernorm")


def _shapes_batch(label_type, n=4, size=32, seed=0):
    from umedpt.core import collate_samples
    from umedpt.shapes import ShapesDataset
    ds = ShapesDataset(label_type, n=n, size=size, seed=seed)
    return ds.classes, collate_samples([ds[i] for i in range(n)])


def test_fit_probe_trains_only_the_head_and_restores_flags(dense_blocks):
    classes, batch = _shapes_batch("segmentation")
    before = {k: v.clone() for k, v in dense_blocks.state_dict().items()}
    frozen_before = next(dense_blocks.fpn.parameters())
    frozen_before.requires_grad_(False)  # a flag the caller set must survive too
    probe = linear_probe_task("segmentation", "seg", classes, dense_blocks)
    w0 = probe.head.weight.clone()
    try:
        losses = fit_probe(probe, dense_blocks, [batch], steps=12, lr=1e-2, device="cpu")
        assert all(torch.equal(v, dense_blocks.state_dict()[k]) for k, v in before.items())
        assert not frozen_before.requires_grad
        assert all(p.requires_grad for p in dense_blocks.pixel_decoder.parameters())
        assert not torch.equal(probe.head.weight, w0) and not probe.training
        assert len(losses) == 12 and losses[-1] < losses[0]
    finally:
        frozen_before.requires_grad_(True)


def test_fit_probe_restores_flags_after_a_failure(dense_blocks):
    classes, batch = _shapes_batch("segmentation")
    probe = linear_probe_task("segmentation", "seg", classes, dense_blocks)
    with pytest.raises(Exception):
        fit_probe(probe, dense_blocks, [{"image": batch["image"]}], steps=1, device="cpu")  # no mask: the loss fails
    assert all(p.requires_grad for p in dense_blocks.parameters())


def test_linear_detection_probe_then_fine_tuning(dense_blocks):
    import copy
    classes, batch = _shapes_batch("detection")
    blocks = copy.deepcopy(dense_blocks)
    probe = linear_probe_task("detection", "det", classes, blocks)
    assert len(probe.head.cls_tower) == 0 and len(probe.head.box_tower) == 0
    fit_probe(probe, blocks, [batch], steps=2, device="cpu")
    w_enc, w_head = blocks.encoder.state_dict(), probe.head.cls_logits.weight.clone()
    w_enc = {k: v.clone() for k, v in w_enc.items()}
    losses = fine_tune_task(blocks, probe, [batch], steps=2, lr_encoder=1e-3, lr_head=1e-3, device="cpu")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(v, blocks.encoder.state_dict()[k]) for k, v in w_enc.items())  # the encoder trained too
    assert not torch.equal(probe.head.cls_logits.weight, w_head)
    rows = task_results(probe, blocks, [batch], arm="a", setting="finetune", fraction=0.5, seed=3, metrics=["map_50"])
    assert list(rows.columns) == list(RESULT_COLUMNS) and rows.metric.tolist() == ["map_50"]
    assert rows.task.iloc[0] == "det" and rows.fraction.iloc[0] == 0.5 and 0 <= rows.value.iloc[0] <= 1
    with pytest.raises(ConfigError, match="no metric"):
        task_results(probe, blocks, [batch], arm="a", setting="frozen", fraction=1.0, seed=0, metrics=["miou"])


# --- statistics -----------------------------------------------------------------------------------------------------

def _table(arms=("new", "mid", "base"), fractions=(0.1, 0.5, 1.0), seeds=range(5), offset=None):
    offset = offset or {"new": 0.15, "mid": 0.05, "base": 0.0}
    rng = np.random.default_rng(0)
    rows = []
    for f in fractions:
        for s in seeds:
            shared = rng.normal(0, 0.02)
            for arm in arms:
                rows.append(dict(task="t", arm=arm, setting="frozen", fraction=f, seed=s, metric="auc",
                                 value=0.6 + 0.2 * f + offset[arm] + shared + rng.normal(0, 0.005)))
    return results_frame(rows)


def test_compare_arms_three_arms_against_reference():
    res = _table()
    cmp = compare_arms(res, "auc", "frozen", reference="base")
    assert len(cmp) == 6 and set(cmp.arm) == {"new", "mid"} and set(cmp.reference) == {"base"}
    for _, row in cmp.iterrows():
        a = res[(res.arm == row.arm) & (res.fraction == row.fraction)].sort_values("seed").value
        b = res[(res.arm == "base") & (res.fraction == row.fraction)].sort_values("seed").value
        r = stats.ttest_rel(a, b)
        assert math.isclose(row.t, r.statistic) and math.isclose(row.p, r.pvalue)
        assert math.isclose(row["mean"], a.mean()) and math.isclose(row.sd, a.std(ddof=1))
    assert cmp.significant.all()
    # default reference: the arm appearing last
    assert set(compare_arms(res, "auc", "frozen").reference) == {"base"}
    # pairing is by seed, not by row order
    shuffled = res.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(compare_arms(shuffled, "auc", "frozen", reference="base")
                                  .sort_values(["fraction", "arm"]).reset_index(drop=True),
                                  cmp.sort_values(["fraction", "arm"]).reset_index(drop=True))


def test_compare_arms_not_significant_for_noise():
    rng = np.random.default_rng(1)
    rows = [dict(task="t", arm=arm, setting="finetune", fraction=0.5, seed=s, metric="acc", value=rng.normal(0.7, 0.05))
            for s in range(5) for arm in ("a", "b")]
    cmp = compare_arms(results_frame(rows), "acc", "finetune")
    assert cmp.p.item() > 0.05 and not cmp.significant.item()


def test_holm_by_hand_and_nan():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4·0.005, 3·0.01, 2·0.03, max(0.04, 0.06)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, np.nan, 0.005]), [0.03, 0.06, 0.06, np.nan, 0.02])
    assert holm([0.02]).tolist() == [0.02] and holm([0.4, 0.3]).tolist() == [0.6, 0.6]
    assert np.isnan(holm([np.nan])).all() and len(holm([])) == 0
    with pytest.raises(Exception, match=r"\[0, 1\]"): holm([-0.1])
    with pytest.raises(Exception, match="1-d"): holm([[0.1, 0.2]])


def test_compare_arms_holm_across_fractions_and_direction():
    res = _table()
    cmp = compare_arms(res, "auc", "frozen", reference="base")
    for arm, g in cmp.groupby("arm"):
        np.testing.assert_allclose(g.p_holm.values, holm(g.p.values))  # one family per arm: its three fractions
    assert (cmp.p_holm >= cmp.p).all() and set(cmp.direction) == {"higher"}
    assert set(compare_arms(res, "auc", "frozen", reference="new").direction) == {"lower"}
    rng = np.random.default_rng(1)
    noise = [dict(task="t", arm=arm, setting="frozen", fraction=f, seed=s, metric="acc", value=rng.normal(0.7, 0.05))
             for f in (0.1, 1.0) for s in range(5) for arm in ("a", "b")]
    assert set(compare_arms(results_frame(noise), "acc", "frozen").direction) == {"no difference"}
    old = ["task", "fraction", "arm", "reference", "n", "mean", "sd", "mean_ref", "sd_ref", "diff", "t", "p",
           "significant"]
    assert list(cmp.columns) == old + ["p_holm", "direction"]  # the old columns stay, for current callers


def test_table1_rules():
    res = _table()
    t1 = table1_summary(res, "auc", reference="base").set_index("arm")
    best_base = res[res.arm == "base"].groupby("fraction").value.mean().max()
    for arm in ("new", "mid"):
        means = res[res.arm == arm].groupby("fraction").value.mean()
        want = min(f for f, m in means.items() if m >= best_base)
        assert t1.loc[arm, "fraction"] == want and math.isclose(t1.loc[arm, "target"], best_base)
    assert (t1.loc["new", "fraction"], t1.loc["mid", "fraction"]) == (0.5, 1.0)  # by construction: +0.15 and +0.05
    # across settings: the target is the best of both settings
    ft = res.assign(setting="finetune", value=res.value + 0.3)
    both = pd.concat([res, ft])
    within = table1_summary(both, "auc", reference="base")
    across = table1_summary(both, "auc", reference="base", across_settings=True)
    assert (within[within.setting == "frozen"].fraction.notna()).all()
    assert across[across.setting == "frozen"].fraction.isna().all()  # frozen never reaches fine-tuned base + 0.3
    assert (across.target_setting == "finetune").all()


def test_results_frame_checks_and_plot():
    with pytest.raises(DataError, match="lacks the columns"):
        results_frame(pd.DataFrame({"task": ["t"], "value": [1.0]}))
    res = _table(fractions=(0.01, 0.25, 1.0))
    fig = plot_scarcity(pd.concat([res, res.assign(setting="finetune")]), "auc")
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1%", "25%", "100%"]
    assert len(fig.axes[0].patches) == 3 * 3  # one box per arm and fraction
    with pytest.raises(DataError, match="no results for metric"): plot_scarcity(res, "dice")


def test_paired_ttest_matches_hand_formula():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.8, 0.05, 7), rng.normal(0.75, 0.05, 7)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(7))
    r = paired_ttest(a, b)
    assert math.isclose(r.t, t, rel_tol=1e-12) and math.isclose(r.p, 2 * stats.t.sf(abs(t), 6), rel_tol=1e-9)
    with pytest.raises(Exception, match="nan or inf"): paired_ttest([1, np.nan], [1, 2])


# --- the shared training loop and the module's surface --------------------------------------------------------------

def test_fine_tune_is_train_steps_with_two_groups():
    "fine_tune gives the same losses as core.train_steps run by hand with its two AdamW groups and schedule."
    from umedpt.core import train_steps
    X, y = _separable(64, k=3, d=8)
    loader = [{"x": torch.from_numpy(X[i:i + 16]), "y": torch.from_numpy(y[i:i + 16])} for i in range(0, 64, 16)]
    ce = lambda o, batch: nn.functional.cross_entropy(o, batch["y"])
    def make():
        torch.manual_seed(0)
        return nn.Linear(8, 8), nn.Linear(8, 3)
    enc, head = make()
    got = fine_tune(enc, head, lambda b, h, batch: h(b(batch["x"])), ce, loader, steps=9, lr_encoder=1e-2, lr_head=5e-2,
                    schedule="cosine", device="cpu")
    enc, head = make()
    groups = [{"params": list(enc.parameters()), "lr": 1e-2}, {"params": list(head.parameters()), "lr": 5e-2}]
    want = train_steps(groups, lambda batch: ce(head(enc(batch["x"])), batch), loader, 9, schedule="cosine",
                       weight_decay=0.05)
    assert got == want


def test_training_errors_name_the_caller(dense_blocks):
    classes, batch = _shapes_batch("segmentation")
    probe = linear_probe_task("segmentation", "seg", classes, dense_blocks)
    with pytest.raises(ConfigError, match=r"fit_probe \(seg\): the training loader yields no batches"):
        fit_probe(probe, dense_blocks, [], steps=2, device="cpu")
    assert all(p.requires_grad for p in dense_blocks.parameters())
    with pytest.raises(ConfigError, match="fit_probe .*steps must be a positive integer"):
        fit_probe(probe, dense_blocks, [batch], steps=0, device="cpu")
    nan = lambda o, batch: o.sum() * float("nan")
    with pytest.raises(TrainingError, match="fine_tune: non-finite loss nan at step 0"):
        fine_tune(nn.Linear(2, 2), nn.Linear(2, 2), lambda b, h, batch: h(b(batch["x"])), nan,
                  [{"x": torch.ones(1, 2)}], steps=3, device="cpu")


def test_cached_features_leaves_only_the_cache_file(tmp_path):
    cached_features("arm/task/test", lambda: {"features": np.ones((2, 3), np.float32)}, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["arm/task/test.safetensors"]


def test_all_holds_only_public_api():
    import umedpt.evaluation as ev
    assert not [n for n in ev.__all__ if n.startswith("_")]
    public = {"nested_subsets", "extract_embeddings", "fit_linear_probe", "fit_linear_probes", "fine_tune",
              "linear_probe_task", "fit_probe", "fine_tune_task", "task_results", "paired_ttest", "compare_arms",
              "table1_summary", "plot_scarcity", "probe_benchmark", "results_frame", "cached_features", "holm",
              "relative_change", "PROBE_SOLVERS"}
    assert public <= set(ev.__all__)
    assert not any(hasattr(ev, n) for n in ("_cycle", "_schedule", "_to_device"))  # one loop: core.train_steps
