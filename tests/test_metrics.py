"""Metrics against scikit-learn on random data, edge cases, and detection mAP on decoded FCOS output."""
import math
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, jaccard_score, roc_auc_score
from umedpt.core import InputError
from umedpt.metrics import (classification_metrics, confusion_matrix, detection_map, multilabel_metrics,
                            segmentation_metrics)


@pytest.mark.parametrize("C", [2, 3, 6])
def test_classification_metrics_match_sklearn(C):
    g = torch.Generator().manual_seed(C)
    target = torch.randint(0, C, (80,), generator=g)
    probs = (torch.randn(80, C, generator=g) + 1.5 * torch.nn.functional.one_hot(target, C)).softmax(1)
    m = classification_metrics(probs, target)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(target, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro"))
    ref = (roc_auc_score(target, probs[:, 1]) if C == 2
           else roc_auc_score(target, probs.double() / probs.double().sum(1, keepdim=True), multi_class="ovr"))
    assert m["auroc"] == pytest.approx(ref)


def test_classification_metrics_accept_numpy_and_reject_empty():
    m = classification_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 0]))
    assert m == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "auroc": 1.0}
    with pytest.raises(InputError, match="no samples"): classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int))
    with pytest.raises(InputError, match="class indices"):
        classification_metrics(np.array([[0.5, 0.5]]), np.array([0.5]))


def test_balanced_accuracy_matches_sklearn_with_absent_and_extra_classes():
    import warnings
    rng = np.random.default_rng(0)
    target = rng.choice([0, 1, 3], 50, p=[0.7, 0.2, 0.1])  # class 2 never a target, but sometimes predicted
    probs = rng.dirichlet(np.ones(4), 50)
    probs[np.arange(50), target] += 0.3 * rng.random(50); probs /= probs.sum(1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the predicted class absent from the targets
        want = balanced_accuracy_score(target, probs.argmax(1))
    assert classification_metrics(probs, target)["balanced_accuracy"] == pytest.approx(want)
    majority = classification_metrics(np.tile([0.7, 0.2, 0.0, 0.1], (50, 1)), target)
    assert majority["balanced_accuracy"] == pytest.approx(1 / 3) and majority["auroc"] == pytest.approx(0.5)


def test_multilabel_metrics_match_sklearn_without_missing_labels():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (60, 5), generator=g).float()
    probs = (torch.randn(60, 5, generator=g) + 1.2 * target).sigmoid()
    m = multilabel_metrics(probs, target)
    pred = (probs >= 0.5).float()
    assert m["accuracy"] == pytest.approx((pred == target).float().mean().item())
    assert m["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(target, probs, average="macro"))


def test_multilabel_missing_labels_are_skipped_per_label():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 2, (40, 3), generator=g).float()
    probs = (torch.randn(40, 3, generator=g) + target).sigmoid()
    holes = target.clone(); holes[torch.rand(40, 3, generator=g) < 0.3] = float("nan")
    m = multilabel_metrics(probs, holes)
    seen = ~holes.isnan()
    aurocs = [roc_auc_score(holes[seen[:, k], k], probs[seen[:, k], k]) for k in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(aurocs))
    assert m["accuracy"] == pytest.approx(((probs >= 0.5).float()[seen] == holes[seen]).float().mean().item())


def test_segmentation_metrics_match_sklearn_and_accumulate():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (3, 20, 20), generator=g)
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.7, target, torch.randint(0, 5, (3, 20, 20), generator=g))
    target[:, :, -4:] = -1
    cm = sum(confusion_matrix(pred[i], target[i], 5) for i in range(3))
    assert torch.equal(cm, confusion_matrix(pred, target, 5))
    valid = target >= 0
    m = segmentation_metrics(cm)
    assert m["miou"] == pytest.approx(jaccard_score(target[valid], pred[valid], average="macro"))
    assert m["dice"] == pytest.approx(f1_score(target[valid], pred[valid], average="macro"))  # Dice = F1 per class
    assert m["pixel_accuracy"] == pytest.approx((pred[valid] == target[valid]).float().mean().item())


def test_segmentation_absent_classes_and_empty():
    target = torch.tensor([[0, 0, 1, 1]])
    m = segmentation_metrics(confusion_matrix(target.clone(), target, 10))  # 8 classes absent everywhere
    assert m["miou"] == 1.0 and m["dice"] == 1.0
    assert math.isnan(segmentation_metrics(confusion_matrix(target, torch.full_like(target, -1), 3))["miou"])
    only_bg = segmentation_metrics(confusion_matrix(torch.zeros(1, 4, dtype=torch.long),
                                                    torch.zeros(1, 4, dtype=torch.long), 2), include_background=False)
    assert math.isnan(only_bg["miou"])


def test_detection_map_is_invariant_to_image_order_and_counts_duplicates():
    tgt = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])},
           {"boxes": torch.tensor([[5.0, 5, 25, 30], [40, 40, 60, 70]]), "labels": torch.tensor([1, 0])}]
    pred = [{"boxes": torch.tensor([[0.0, 0, 10, 11]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])},
            {"boxes": torch.tensor([[5.0, 5, 25, 30], [41, 40, 60, 70], [5, 5, 25, 22]]),
             "scores": torch.tensor([0.9, 0.6, 0.8]), "labels": torch.tensor([1, 0, 1])}]
    m = detection_map(pred, tgt)
    assert m == detection_map(pred[::-1], tgt[::-1])
    # class 1: the exact box (0.9) matches first at every threshold; the loose duplicate (IoU 0.68, 0.8) is a false
    # positive ranked after it, which costs nothing
    assert m["map_50"] == pytest.approx(1.0)
    worse = [pred[0], {**pred[1], "scores": torch.tensor([0.5, 0.6, 0.95])}]
    # now the loose box comes first: a hit up to IoU 0.65, a false positive before the exact box above that
    assert detection_map(worse, tgt)["map_50"] == pytest.approx(1.0)
    assert detection_map(worse, tgt)["map"] < m["map"] - 0.1
    assert detection_map(pred, [{"boxes": t["boxes"], "box_labels": t["labels"]} for t in tgt]) == m  # batch key name


def test_detection_map_of_decoded_oracle_is_one():
    from umedpt.core import collate_samples
    from umedpt.fcos import decode_detections, fcos_grid, fcos_targets, oracle_output, pyramid_sizes
    from umedpt.shapes import ShapesDataset
    ds = ShapesDataset("detection", n=10, size=(96, 128), max_shapes=4, seed=5)
    b = collate_samples([ds[i] for i in range(len(ds))])
    grid = fcos_grid(pyramid_sizes(tuple(b["image"].shape[-2:])))
    t = fcos_targets(grid, b["boxes"], b["box_labels"], b["image_size"], 3)
    dets = decode_detections(oracle_output(grid, t, 3), b["image_size"])
    m = detection_map(dets, [{"boxes": x, "labels": y} for x, y in zip(b["boxes"], b["box_labels"])])
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0)
