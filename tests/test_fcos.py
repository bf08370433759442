"""FCOS: round trips on many scene layouts, decoding options, bad input, and a short overfit through SharedBlocks."""
import math
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou
from umedpt.core import ConfigError, InputError, collate_samples, seed_everything
from umedpt.fcos import (FCOSHead, FCOSLoss, FCOSOutput, decode_detections, default_size_ranges, fcos_grid,
                         fcos_targets, oracle_output, pyramid_sizes)
from umedpt.metrics import detection_map
from umedpt.shapes import ShapesDataset


def _round_trip(boxes, labels, sizes, num_classes=3, nms_thresh=0.6, **kw):
    b = collate_samples([{"image": torch.zeros(1, h, w), "boxes": x, "box_labels": y}
                         for x, y, (h, w) in zip(boxes, labels, sizes)])
    grid = fcos_grid(pyramid_sizes(tuple(b["image"].shape[-2:])))
    t = fcos_targets(grid, b["boxes"], b["box_labels"], b["image_size"], num_classes, **kw)
    return t, decode_detections(oracle_output(grid, t, num_classes), b["image_size"], nms_thresh=nms_thresh,
                                max_detections=1000)


def _assert_recovered(gt, gl, det, min_iou=0.99):
    if len(gt) == 0: return
    iou = box_iou(gt, det["boxes"]) * (gl[:, None] == det["labels"][None])
    assert (iou.max(1).values >= min_iou).all(), gt[iou.max(1).values < min_iou]


@pytest.mark.parametrize("size,max_size,max_shapes", [((33, 47), None, 4), ((64, 200), None, 8), ((200, 64), None, 8),
                                                      ((128, 128), (300, 260), 12), ((40, 40), (90, 150), 10)])
@pytest.mark.parametrize("center_radius", [1.5, None])
def test_round_trip_shapes(size, max_size, max_shapes, center_radius):
    ds = ShapesDataset("detection", n=12, size=size, max_size=max_size, max_shapes=max_shapes, rel_size=(0.1, 0.7),
                       seed=sum(size))
    samples = [ds[i] for i in range(len(ds))]
    t, dets = _round_trip([s["boxes"] for s in samples], [s["box_labels"] for s in samples],
                          [tuple(s["image"].shape[1:]) for s in samples], nms_thresh=1.0, center_radius=center_radius)
    small = sum(int(((s["boxes"][:, 2:] - s["boxes"][:, :2]).min(1).values <= 8).sum()) for s in samples)
    assert t.unassigned <= small  # only boxes no wider than the finest stride may lack a location
    for s, det in zip(samples, dets):
        keep = (s["boxes"][:, 2:] - s["boxes"][:, :2]).min(1).values > 8
        _assert_recovered(s["boxes"][keep], s["box_labels"][keep], det)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_many_small_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    n, (h, w) = 60, (192, 256)
    wh = torch.randint(9, 30, (n, 2), generator=g).float()
    xy = (torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)).round()
    boxes, labels = torch.cat([xy, xy + wh], 1), torch.randint(0, 5, (n,), generator=g)
    t, dets = _round_trip([boxes], [labels], [(h, w)], num_classes=5, nms_thresh=1.0)
    assert t.unassigned == 0
    _assert_recovered(boxes, labels, dets[0])
    # with NMS, the duplicates from neighbouring locations collapse into one box each: a perfect score (these scenes
    # have no same-class pair overlapping by more than nms_thresh, which NMS would merge)
    same = box_iou(boxes, boxes) * (labels[:, None] == labels[None]); same.fill_diagonal_(0)
    assert (same <= 0.6).all()
    _, dets = _round_trip([boxes], [labels], [(h, w)], num_classes=5)
    assert len(dets[0]["boxes"]) == n
    assert detection_map(dets, [{"boxes": boxes, "labels": labels}])["map"] == pytest.approx(1.0)


def test_round_trip_with_nms_keeps_distinct_boxes_and_merges_duplicates():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0], [10.0, 10.0, 50.0, 50.0],
                          [60.0, 5.0, 90.0, 40.0]])
    labels = torch.tensor([0, 0, 1, 0])  # box 1 overlaps box 0 (IoU 0.82, same class); box 2 equals box 0, other class
    _, dets = _round_trip([boxes], [labels], [(64, 96)], num_classes=2,
                          size_ranges=[(0, math.inf)] + [(math.inf, math.inf)] * 4)
    det = dets[0]
    assert len(det["boxes"]) == 3                      # NMS merges the same-class pair only
    assert sorted(det["labels"].tolist()) == [0, 0, 1]


def test_decode_options_and_clipping():
    grid = fcos_grid(pyramid_sizes((64, 64)))
    n = len(grid)
    torch.manual_seed(0)
    out = FCOSOutput(torch.randn(2, n, 3) * 3, torch.rand(2, n, 4) * 80 + 1, torch.randn(2, n), grid)
    dets = decode_detections(out, [(50, 40), (64, 64)], score_thresh=0.0, nms_thresh=1.0, top_k=50, max_detections=30)
    for det, (h, w) in zip(dets, [(50, 40), (64, 64)]):
        assert len(det["boxes"]) <= 30
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h and det["boxes"].min() >= 0
        assert (det["boxes"][:, 2:] > det["boxes"][:, :2]).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted by score
    high = decode_detections(out, [(64, 64)] * 2, score_thresh=0.9)
    assert all((d["scores"] > 0.9).all() for d in high)
    expected = (out.cls_logits.sigmoid() * out.centerness.sigmoid()[..., None]).sqrt()
    best = decode_detections(out, [(64, 64)] * 2, score_thresh=0.0, nms_thresh=1.0, max_detections=1)
    for i in range(2): assert best[i]["scores"].item() == pytest.approx(expected[i].max().item())


def test_custom_size_ranges_route_every_box_to_one_level():
    grid = fcos_grid(pyramid_sizes((128, 128)))
    boxes = torch.tensor([[4.0, 4.0, 120.0, 120.0], [30.0, 30.0, 50.0, 60.0]])
    only_p4 = [(math.inf, math.inf), (0, math.inf)] + [(math.inf, math.inf)] * 3
    t = fcos_targets(grid, [boxes], [torch.tensor([0, 1])], [(128, 128)], 2, size_ranges=only_p4)
    assert set(grid.levels[t.positive[0]].tolist()) == {1}
    assert default_size_ranges() == [(0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf)]


def test_tiny_boxes_are_counted_as_unassigned():
    grid = fcos_grid(pyramid_sizes((64, 64)))
    tiny = torch.tensor([[4.0, 4.0, 8.0, 8.0]])  # location centres are multiples of 4: none lies strictly inside
    t = fcos_targets(grid, [tiny], [torch.tensor([0])], [(64, 64)], 1)
    assert t.unassigned == 1 and not t.positive.any()


def test_bad_configuration_and_inputs():
    with pytest.raises(ConfigError, match="at least one class"): FCOSLoss(0)
    with pytest.raises(ConfigError, match="prior"): FCOSHead(16, 2, prior=1.5)
    with pytest.raises(ConfigError, match="num_convs"): FCOSHead(16, 2, num_convs=-1)
    with pytest.raises(ConfigError, match="num_convs"): FCOSHead(16, 2, num_convs=1.5)
    assert len(FCOSHead(16, 2, num_convs=0).cls_tower) == 0  # the linear head of the detection probe
    head = FCOSHead(16, 2)
    feats = [torch.randn(1, 16, 8 // 2 ** i + 1, 8 // 2 ** i + 1) for i in range(5)]
    with pytest.raises(InputError, match="level 2 must be B×16"):
        head(feats[:2] + [torch.randn(1, 8, 2, 2)] + feats[3:], nn.Conv2d(16, 1, 1))
    with pytest.raises(InputError, match="B×1×h×w"):
        head(feats, nn.Conv2d(16, 2, 1))
    out = head(feats, nn.Conv2d(16, 1, 1))
    with pytest.raises(InputError, match="1 predictions but 2 box tensors"):
        FCOSLoss(2)(out, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, [(64, 64)] * 2)
    with pytest.raises(InputError, match="integer tensor"):
        FCOSLoss(2)(out, [torch.tensor([[1.0, 1, 5, 5]])], [torch.tensor([0.0])], [(64, 64)])


def test_overfit_two_images_through_shared_blocks():
    "A short run on two images: the loss falls from its start and the decoded boxes match the ground truth."
    from umedpt.blocks import SharedBlocks
    seed_everything(0)
    blocks, head, crit = SharedBlocks(encoder="efficientnet_lite0"), FCOSHead(64, 3), FCOSLoss(3)
    ds = ShapesDataset("detection", n=2, size=64, max_shapes=2, seed=0)
    b = collate_samples([ds[0], ds[1]])
    opt = torch.optim.AdamW([*blocks.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(60):
        loss = crit(head(blocks.fpn_features(b["image"]), blocks.centerness), b["boxes"], b["box_labels"],
                    b["image_size"])
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    # the paper's sum cls/C + GIoU + ctr starts near 1.5-2 (FCOS page), not near 1
    assert 1.2 < losses[0] < 2.6 and losses[-1] < 0.5 * losses[0], losses[::10]
    blocks.eval(); head.eval()
    with torch.no_grad():
        dets = decode_detections(head(blocks.fpn_features(b["image"]), blocks.centerness), b["image_size"])
    m = detection_map(dets, [{"boxes": x, "labels": y} for x, y in zip(b["boxes"], b["box_labels"])])
    assert m["map_50"] > 0.9, m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_targets_loss_and_decoding_on_cuda():
    grid = fcos_grid(pyramid_sizes((96, 128)), device="cuda")
    boxes = [torch.tensor([[5.0, 6, 40, 50], [50, 20, 120, 90]], device="cuda")]
    labels = [torch.tensor([0, 1], device="cuda")]
    t = fcos_targets(grid, boxes, labels, torch.tensor([[96, 128]]), 2)
    out = oracle_output(grid, t, 2)
    assert FCOSLoss(2).components(out, boxes, labels, [(96, 128)])["box"].item() < 1e-4
    det = decode_detections(out, [(96, 128)])[0]
    _assert_recovered(boxes[0].cpu(), labels[0].cpu(), {k: v.cpu() for k, v in det.items()})


def test_mixed_precision_keeps_distances_and_loss_finite():
    "Under bfloat16 autocast the distances stay float32 (e^10·stride would overflow half precision); loss is finite."
    head, centerness = FCOSHead(16, 2), nn.Conv2d(16, 1, 3, padding=1)
    feats = [torch.randn(2, 16, 64 // s, 64 // s) for s in (8, 16, 32, 64)] + [torch.randn(2, 16, 1, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats, centerness)
        loss = FCOSLoss(2)(out, [torch.tensor([[4.0, 6, 40, 50]]), torch.zeros(0, 4)],
                           [torch.tensor([1]), torch.zeros(0, dtype=torch.long)], [(64, 64)] * 2)
    assert out.box_reg.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
