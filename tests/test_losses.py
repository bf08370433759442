"""Normalised losses and heads: reference implementations, masking, gradients, bad input, the committed init table."""
import math
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss
from umedpt.core import ConfigError, InputError
from umedpt.losses import (ClassificationHead, ClassificationLoss, MultiLabelHead, MultiLabelLoss, SegmentationHead,
                           SegmentationLoss, dice_at_uniform, focal_at_uniform)


@pytest.mark.parametrize("C", [2, 3, 7, 20])
def test_classification_loss_matches_sklearn_log_loss(C):
    g = torch.Generator().manual_seed(C)
    logits, target = torch.randn(50, C, generator=g, dtype=torch.float64) * 2, torch.randint(0, C, (50,), generator=g)
    got = ClassificationLoss(C)(logits, target).item()
    assert got == pytest.approx(log_loss(target, logits.softmax(1), labels=range(C)) / math.log(C), rel=1e-9)
    assert ClassificationLoss(C)(torch.zeros(9, C), target[:9]).item() == pytest.approx(1.0)


def test_classification_loss_bad_input():
    crit = ClassificationLoss(4)
    with pytest.raises(InputError, match="B×4"): crit(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="does not match"): crit(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[0, 4\)"): crit(torch.zeros(2, 4), torch.tensor([0, -1]))
    with pytest.raises(InputError, match="integer"): crit(torch.zeros(2, 4), torch.tensor([True, False]))
    with pytest.raises(ConfigError, match="at least 2"): ClassificationLoss(0)


def _reference_multilabel(logits, target):
    "Loop over observed entries, BCE by formula, mean, / ln 2."
    terms = []
    for x, y in zip(logits.flatten().tolist(), target.flatten().tolist()):
        if math.isnan(y): continue
        p = 1 / (1 + math.exp(-x))
        terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    return sum(terms) / len(terms) / math.log(2) if terms else 0.0


@pytest.mark.parametrize("missing", [0.0, 0.3, 0.9])
def test_multilabel_loss_matches_reference_with_missing_labels(missing):
    g = torch.Generator().manual_seed(int(missing * 10))
    logits = torch.randn(12, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (12, 6), generator=g).double()
    target[torch.rand(12, 6, generator=g) < missing] = float("nan")
    assert MultiLabelLoss(6)(logits, target).item() == pytest.approx(_reference_multilabel(logits, target), rel=1e-9)


def test_multilabel_missing_entries_get_no_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([[1.0, float("nan"), 0.0], [float("nan")] * 3, [0.0, 1.0, 1.0],
                           [float("nan"), 0.0, float("nan")]])
    MultiLabelLoss()(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[target.isnan()] == 0).all() and (logits.grad[~target.isnan()] != 0).all()


def test_multilabel_soft_targets_and_bad_input():
    # ln 2 for any target
    assert MultiLabelLoss()(torch.zeros(2, 2), torch.full((2, 2), 0.3)).item() == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"): MultiLabelLoss()(torch.zeros(2, 2), torch.full((2, 2), -0.5))
    with pytest.raises(InputError, match="B×K"): MultiLabelLoss()(torch.zeros(2), torch.zeros(2))


def _reference_segmentation(logits, target, gamma=2.0, eps=1e-5):
    "Soft Dice over the batch + softmax focal per valid pixel, each divided by its uniform-prediction value."
    C = logits.shape[1]
    valid = (target >= 0).unsqueeze(1).double()
    p = logits.double().softmax(1) * valid
    y = F.one_hot(target.clamp(min=0), C).permute(0, 3, 1, 2).double() * valid
    tp, fp, fn = (p * y).sum((0, 2, 3)), (p * (1 - y)).sum((0, 2, 3)), ((1 - p) * y).sum((0, 2, 3))
    dice = (1 - (2 * tp + eps) / (2 * tp + fp + fn + eps)).mean()
    logp = logits.double().log_softmax(1)
    focal = (-(1 - logp.exp()) ** gamma * logp * y).sum() / valid.sum().clamp(min=1)
    return ((dice / (1 - 1 / C) + focal / ((1 - 1 / C) ** gamma * math.log(C))) / 2).item()


@pytest.mark.parametrize("C", [2, 4, 9])
def test_segmentation_loss_matches_reference(C):
    g = torch.Generator().manual_seed(C)
    logits = torch.randn(3, C, 10, 12, generator=g) * 2
    target = torch.randint(0, C, (3, 10, 12), generator=g)
    target[torch.rand(3, 10, 12, generator=g) < 0.25] = -1
    target[0, :, -3:] = -1  # padding strip, as collate_samples makes
    assert SegmentationLoss(C)(logits, target).item() == pytest.approx(_reference_segmentation(logits, target),
                                                                       rel=1e-4)


def test_segmentation_ignored_pixels_have_no_effect_and_no_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    target[:, :2] = -1
    loss = SegmentationLoss(3)(logits, target)
    loss.backward()
    assert (logits.grad[:, :, :2] == 0).all() and logits.grad[:, :, 2:].abs().sum() > 0
    other = logits.detach().clone(); other[:, :, :2] = torch.randn(2, 3, 2, 6, generator=g) * 10
    assert SegmentationLoss(3)(other, target).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("C", [2, 3, 5, 20, 50])
def test_segmentation_uniform_prediction_bounds(C):
    "At a uniform prediction the normalised loss lies in [1, (1 + (1 - 2/(C(C+1)))/(1 - 1/C))/2] for any class mix."
    g = torch.Generator().manual_seed(C)
    upper = (1 + (1 - 2 / (C * (C + 1))) / (1 - 1 / C)) / 2
    for _ in range(5):
        freq = torch.rand(C, generator=g) ** 4  # skewed class frequencies
        target = torch.multinomial(freq / freq.sum(), 2 * 16 * 16, replacement=True, generator=g).reshape(2, 16, 16)
        value = SegmentationLoss(C)(torch.zeros(2, C, 16, 16), target).item()
        assert 1 - 1e-4 <= value <= upper + 1e-4
    assert dice_at_uniform(C) == pytest.approx(1 - 1 / C)
    assert focal_at_uniform(C) == pytest.approx((1 - 1 / C) ** 2 * math.log(C))


def test_segmentation_bad_input():
    crit = SegmentationLoss(3)
    with pytest.raises(InputError, match="B×3×H×W"): crit(torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(InputError, match="integer"): crit(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(InputError, match="or -1"): crit(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 5))
    with pytest.raises(ConfigError, match="at least 2"): SegmentationLoss(1)


@pytest.mark.parametrize("C", [2, 5, 20])
def test_fresh_heads_start_near_one_on_random_embeddings(C):
    torch.manual_seed(C)
    emb, pix = torch.randn(32, 256), torch.randn(4, 32, 16, 16)
    assert (ClassificationLoss(C)(ClassificationHead(256, C)(emb), torch.randint(0, C, (32,))).item()
            == pytest.approx(1, abs=0.1))
    ml_target = torch.randint(0, 2, (32, C)).float()
    assert MultiLabelLoss(C)(MultiLabelHead(256, C)(emb), ml_target).item() == pytest.approx(1, abs=0.1)
    seg = SegmentationLoss(C)(SegmentationHead(32, C)(pix), torch.randint(0, C, (4, 16, 16))).item()
    assert 0.95 < seg < 1.2


def test_heads_are_plain_layers_and_check_shapes():
    head = ClassificationHead(8, 3)
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (3, 8)
    with pytest.raises(InputError, match="B×8"): head(torch.zeros(2, 3, 8))
    with pytest.raises(InputError, match="B×4×H×W"): SegmentationHead(4, 2)(torch.zeros(1, 3, 5, 5))


def test_committed_loss_at_init_table(repo_root: Path):
    path = repo_root / "book/data/components/loss_at_init.csv"
    table = pd.read_csv(path)
    assert list(table.columns) == ["task_type", "num_classes", "mean_initial_loss"]
    assert set(table["task_type"]) == {"classification", "multilabel", "segmentation", "detection",
                                       "detection (normalised)"}
    assert sorted(table["num_classes"].unique().tolist()) == [2, 5, 20] and len(table) == 15
    # every loss starts near 1 except the paper's detection sum (cls/C + box + ctr), which is shown as measured
    assert table[table.task_type != "detection"]["mean_initial_loss"].between(0.7, 1.4).all()
    paper = table[table.task_type == "detection"].sort_values("num_classes")["mean_initial_loss"]
    assert paper.is_monotonic_decreasing  # its classification term shrinks as 1/C
