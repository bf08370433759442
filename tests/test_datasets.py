"""Dataset registry and adapters: bad input on small files made here, geometry, splits, and every shared dataset."""
import json, warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umedpt.core import ConfigError, DataError, DataRootError, check_sample, collate_samples
from umedpt.adapters import (ClassFolderDataset, ImageMaskFolderDataset, NpzDataset, VOCDetectionDataset, open_folder,
                             write_voc)
from umedpt.catalogue import datasets_table, kermany_patient, open_dataset
from umedpt.images import boxes_from_mask, pad_to_multiple, resize_longer_edge, to_channels
from umedpt.registry import DATASETS, check_dataset, seeded_split
from umedpt.shapes import ShapesDataset


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture
def seg_folder(tmp_path) -> Path:
    "images/ + masks/ with two classes, three 12×16 pairs."
    for k in range(3):
        m = np.zeros((12, 16), np.uint8); m[2:6, 3:9] = 1
        _png(tmp_path / "images" / f"{k}.png", _noise(12, 16, seed=k)); _png(tmp_path / "masks" / f"{k}.png", m)
    return tmp_path


# ---------------------------------------------------------------- bad input: each error names the file and the problem
def test_corrupt_image_is_named(tmp_path):
    _png(tmp_path / "a" / "ok.png", _noise(8, 8))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = ClassFolderDataset(tmp_path)
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read the image"): ds[0]
    assert ds[1]["image"].shape == (3, 8, 8)  # the good file still loads


def test_truncated_image_is_named(tmp_path):
    good = _png(tmp_path / "c" / "cut.png", _noise(64, 64))
    good.write_bytes(good.read_bytes()[:200])  # a valid header, then nothing
    with pytest.raises(DataError, match=r"cut\.png: cannot read the image"): ClassFolderDataset(tmp_path)[0]


def test_mask_size_mismatch_names_both_files(seg_folder):
    _png(seg_folder / "masks" / "1.png", np.zeros((12, 15), np.uint8))
    ds = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks")
    with pytest.raises(DataError, match=r"masks/1\.png: mask is 15×12 but its image 1\.png is 16×12"): ds[1]


def test_missing_mask_is_named(seg_folder):
    (seg_folder / "masks" / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png: its mask .*masks/2\.png does not exist"):
        ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks")


def test_mask_value_outside_classes(seg_folder):
    _png(seg_folder / "masks" / "0.png", np.full((12, 16), 255, np.uint8))  # a 0/255 mask read as class ids
    ds = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks")
    with pytest.raises(DataError, match=r"masks/0\.png: mask values \[255\] are outside the declared classes"): ds[0]
    fixed = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks", ignore_index=255)
    assert (fixed[0]["mask"] == -1).all()  # declared as ignore, it is kept as -1, not dropped


def test_class_folder_outside_classes(tmp_path):
    for c in ("benign", "malignant", "other"): _png(tmp_path / c / "x.png", _noise(4, 4))
    with pytest.raises(DataError, match=r"other/x\.png: class 'other' is not one of the declared classes"):
        ClassFolderDataset(tmp_path, classes=["benign", "malignant"])


def test_npz_label_outside_classes(tmp_path):
    np.savez(tmp_path / "set.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([0, 1, 5]))
    with pytest.raises(DataError, match=r"set\.npz: train_labels\[2\] = 5 is outside the declared classes"):
        NpzDataset(tmp_path / "set.npz", "train", classes=["a", "b"])


def test_voc_class_outside_classes(tmp_path):
    write_voc(tmp_path, {"train": ["a"]}, {"a": [("cell", 1, 1, 5, 5), ("dust", 2, 2, 6, 6)]})
    with pytest.raises(DataError, match=r"a\.xml: object class 'dust' is not one of the declared classes"):
        VOCDetectionDataset(tmp_path, "train", classes=["cell"])


def test_box_outside_image(tmp_path):
    write_voc(tmp_path, {"train": ["a"]}, {"a": [("cell", 1, 1, 5, 5), ("cell", 20, 2, 40, 9)]}, size=(24, 32))
    with pytest.raises(DataError, match=r"a\.xml: out-of-image box .*image 32×24"):
        VOCDetectionDataset(tmp_path, "train")
    with pytest.warns(UserWarning, match="fixed 1 bad box"):
        ds = VOCDetectionDataset(tmp_path, "train", bad_boxes="clip")
    assert ds[0]["boxes"].tolist() == [[0, 0, 5, 5], [19, 1, 32, 9]]


def test_box_outside_image_from_a_box_mapping(seg_folder):
    boxes = {str(k): ([[2, 2, 30, 8]], [0]) for k in range(3)}  # images are 16 wide
    ds = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks", label_type="detection", boxes=boxes)
    with pytest.raises(DataError, match=r"images/0\.png: out-of-image box"): ds[0]


def test_degenerate_box(tmp_path):
    write_voc(tmp_path, {"train": ["a"]}, {"a": [("cell", 7, 7, 7, 7)]})
    with pytest.raises(DataError, match=r"a\.xml: degenerate box"): VOCDetectionDataset(tmp_path, "train")


def test_empty_datasets(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images .* found under"): ClassFolderDataset(tmp_path / "empty")
    write_voc(tmp_path / "voc", {"train": []}, {})
    with pytest.raises(DataError, match="voc: the dataset is empty"): VOCDetectionDataset(tmp_path / "voc", "train")
    np.savez(tmp_path / "e.npz", train_images=np.zeros((0, 4, 4), np.uint8), train_labels=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="the dataset is empty"): NpzDataset(tmp_path / "e.npz", "train", classes=["a"])


def test_missing_roots(tmp_path, monkeypatch):
    with pytest.raises(DataRootError, match="folder not found"): ClassFolderDataset(tmp_path / "nowhere")
    with pytest.raises(DataRootError, match="VOC folder not found"): VOCDetectionDataset(tmp_path / "nowhere")
    with pytest.raises(DataRootError, match="npz file not found"): NpzDataset(tmp_path / "nowhere.npz")
    with pytest.raises(DataRootError,
                       match=r"dataset 'bccd_detection': .*bccd_detection/BCCD does not exist; expected layout"):
        open_dataset("bccd_detection", root=tmp_path)
    monkeypatch.delenv("UMEDPT_DATA", raising=False)
    with pytest.raises(DataRootError,
                       match="dataset 'bccd_detection' was requested but the environment variable UMEDPT_DATA"):
        open_dataset("bccd_detection")


def test_missing_splits(tmp_path):
    with pytest.raises(ConfigError, match="'kvasir_seg_256' has no split 'valid'; its splits are"):
        open_dataset("kvasir_seg_256", "valid", root=tmp_path)
    write_voc(tmp_path / "voc", {"train": ["a"]}, {"a": [("cell", 1, 1, 5, 5)]})
    with pytest.raises(DataError, match=r"val\.txt: split file not found; voc has splits \['train'\]"):
        VOCDetectionDataset(tmp_path / "voc", "val")
    np.savez(tmp_path / "s.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"s\.npz: no split 'test'.*it has splits \['train'\]"):
        NpzDataset(tmp_path / "s.npz", "test")


def test_bad_options(tmp_path):
    _png(tmp_path / "a" / "x.png", _noise(4, 4))
    with pytest.raises(ConfigError, match="unknown dataset 'kvasir'"): open_dataset("kvasir")
    with pytest.raises(ConfigError, match=r"takes no option \['three_class'\]"):
        open_dataset("bccd_detection", three_class=True)
    with pytest.raises(ConfigError, match="channels must be a positive int"): ClassFolderDataset(tmp_path, channels=0)
    with pytest.raises(ConfigError, match="size must be a positive int"): ClassFolderDataset(tmp_path, size=-3)
    with pytest.raises(ConfigError, match="bad_boxes must be one of"):
        write_voc(tmp_path / "v", {"train": ["a"]}, {"a": []}) and \
        VOCDetectionDataset(tmp_path / "v", bad_boxes="drop")


def test_check_dataset_lists_every_bad_file_at_once(tmp_path):
    for k in range(3): _png(tmp_path / "good" / f"{k}.png", _noise(16, 16, seed=k))
    cut = _png(tmp_path / "bad" / "cut.png", _noise(64, 64))
    cut.write_bytes(cut.read_bytes()[:200])  # a truncated PNG: valid header, then nothing
    (tmp_path / "bad" / "text.png").write_text("not an image, whatever the extension says")
    (tmp_path / "bad" / "empty.jpg").write_bytes(b"")
    problems = check_dataset(ClassFolderDataset(tmp_path), progress=False)
    assert list(problems.columns) == ["index", "file", "error"]
    assert sorted(Path(f).name for f in problems["file"]) == ["cut.png", "empty.jpg", "text.png"]
    assert all("cannot read the image" in e for e in problems["error"])
    for f in (tmp_path / "bad").iterdir(): f.unlink()
    _png(tmp_path / "bad" / "fixed.png", _noise(16, 16))
    assert check_dataset(ClassFolderDataset(tmp_path), progress=False).empty


def test_open_folder_layouts_and_errors(seg_folder, tmp_path):
    assert open_folder(seg_folder, "masks")[0]["mask"].shape == (12, 16)
    write_voc(tmp_path / "voc", {"train": ["a"]}, {"a": [("cell", 1, 1, 5, 5)]})
    assert open_folder(tmp_path / "voc", "voc").num_boxes == 1
    with pytest.raises(ConfigError, match="unknown layout 'coco'"): open_folder(seg_folder, "coco")
    with pytest.raises(ConfigError, match=r"layout='masks'\) takes no option \['label_fn'\]"):
        open_folder(seg_folder, "masks", label_fn=str)
    with pytest.raises(ConfigError, match="pass images= the sub-folder"): open_folder(seg_folder, "masks", images="img")
    with pytest.raises(ConfigError, match="layout='voc'.*lacks Annotations/"): open_folder(seg_folder, "voc")


def test_jpeg_masks_need_a_threshold(tmp_path):
    truth = np.zeros((24, 32), np.uint8); truth[4:18, 6:25] = 1
    _png(tmp_path / "images" / "0.png", _noise(24, 32))
    (tmp_path / "masks").mkdir()
    Image.fromarray(truth * 255).save(tmp_path / "masks" / "0.jpg", quality=50)  # lossy: edges blur into 1..254
    ds = open_folder(tmp_path, "masks", mask_suffix=".jpg", mask_threshold=127)
    assert torch.equal(ds[0]["mask"], torch.from_numpy(truth.astype(np.int64)))
    with pytest.raises(DataError, match="outside the declared classes"):
        open_folder(tmp_path, "masks", mask_suffix=".jpg")[0]
    with pytest.raises(ConfigError, match="mask_threshold is for binary masks"):
        open_folder(tmp_path, "masks", classes=["bg", "a", "b"], mask_suffix=".jpg", mask_threshold=127)


def test_cards_state_licence_and_weight_redistribution():
    table = datasets_table()
    assert {"licence", "weights redistributable"} <= set(table.columns)
    assert not DATASETS["kvasir_seg_256"].weights_redistributable
    for card in DATASETS.values():
        assert card.licence and isinstance(card.weights_redistributable, bool), card.name
        if card.weights_redistributable and "CC BY" in card.licence: assert "attribution" in card.licence, card.name


# ---------------------------------------------------------------- geometry: resizing and padding keep labels aligned
def _scene_sample(ds: ShapesDataset, i: int) -> dict:
    "A detection sample of the shapes plus the mask of the same scene."
    scene, s = ds.render(i), ds[i]
    s["mask"] = torch.zeros(scene.image.shape[:2], dtype=torch.long)
    for obj, c in zip(scene.objects, scene.classes): s["mask"][torch.from_numpy(obj)] = c + 1
    return s


@pytest.mark.parametrize("size", [50, 96, 300])  # shrink, same, enlarge
def test_resize_keeps_masks_and_boxes_aligned(size):
    ds = ShapesDataset("detection", 12, size=(64, 96), max_size=(96, 160), seed=3, max_shapes=1, rel_size=(0.4, 0.6))
    assert 0 < sum(int(ds[i]["box_labels"][0]) != 2 for i in range(12)) < 12  # both kinds of shape are covered
    for i in range(12):
        s = _scene_sample(ds, i)
        t = resize_longer_edge(s, size)
        h, w = t["image"].shape[-2:]
        assert max(h, w) == size and t["mask"].shape == (h, w)
        check_sample(t)
        fg = torch.nonzero(t["mask"] > 0)
        tight = torch.tensor([fg[:, 1].min(), fg[:, 0].min(), fg[:, 1].max() + 1, fg[:, 0].max() + 1]).float()
        box = t["boxes"][0]
        # mask within box
        assert (tight[:2] >= box[:2] - 0.5).all() and (tight[2:] <= box[2:] + 0.5).all(), (tight, box)
        if s["box_labels"][0] != 2:  # and close to it, except for triangles, whose thin tips may vanish when shrinking
            assert (tight - box).abs().max() <= 1.5, (tight, box)
        assert set(t["mask"].unique().tolist()) <= set(s["mask"].unique().tolist())  # nearest: no new class ids


def test_pad_keeps_coordinates_and_marks_padding_ignore():
    s = _scene_sample(ShapesDataset("detection", 1, size=(45, 70), seed=0), 0)
    p = pad_to_multiple(s, 32)
    assert p["image"].shape[-2:] == (64, 96) and p["meta"]["unpadded_size"] == (45, 70)
    assert torch.equal(p["mask"][:45, :70], s["mask"])
    assert (p["mask"][45:] == -1).all() and (p["mask"][:, 70:] == -1).all()
    assert torch.equal(p["boxes"], s["boxes"]) and (p["image"][:, 45:] == 0).all()
    batch = collate_samples([p, s])  # padded and unpadded samples collate to the same size
    assert batch["image"].shape == (2, 3, 64, 96)


def test_size_and_channels_options_on_a_dataset(seg_folder):
    ds = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks", size=32, channels=1)
    s = ds[0]
    assert s["image"].shape == (1, 24, 32) and s["mask"].shape == (24, 32)
    assert s["mask"][4:12, 6:18].eq(1).all() and s["mask"].sum() == 8 * 12  # the 4×6 square, doubled
    assert to_channels(torch.rand(1, 5, 5), 3).shape == (3, 5, 5)


def test_transform_moves_image_mask_and_boxes_together(seg_folder):
    import albumentations as A
    flip = A.HorizontalFlip(p=1)
    seg = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks")
    det = ImageMaskFolderDataset(seg_folder / "images", seg_folder / "masks", label_type="detection")
    a, b = seg[0], seg.with_transform(flip)[0]
    assert torch.equal(b["mask"], a["mask"].flip(-1)) and torch.allclose(b["image"], a["image"].flip(-1), atol=1 / 255)
    assert det.with_transform(flip)[0]["boxes"].tolist() == [[16 - 9, 2, 16 - 3, 6]]
    assert seg.prep.transform is None  # with_transform returns a copy


def test_boxes_from_instances():
    inst = np.zeros((10, 10), np.int64); inst[1:3, 1:4] = 1; inst[5:9, 6:8] = 2; inst[0, 9] = 4  # id 3 unused
    b, l = boxes_from_mask(inst, instances=True)
    assert b.tolist() == [[1, 1, 4, 3], [6, 5, 8, 9], [9, 0, 10, 1]] and l.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- splits
def test_seeded_split_is_deterministic_disjoint_and_grouped():
    keys = [f"p{i // 4}" for i in range(200)]  # 50 patients, 4 images each
    strata = [i // 4 % 3 for i in range(200)]
    a = seeded_split(keys, {"train": .7, "val": .15, "test": .15}, seed=5, strata=strata)
    assert a == seeded_split(keys, {"train": .7, "val": .15, "test": .15}, seed=5, strata=strata)
    assert sorted(sum(a.values(), [])) == list(range(200))
    groups = {s: {keys[i] for i in idx} for s, idx in a.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    with pytest.raises(ConfigError, match="appears in two strata"):
        seeded_split(["a", "a"], {"train": 1.0}, strata=[0, 1])


def test_kermany_patient_ids():
    assert kermany_patient(Path("person447_virus_921_1.jpeg")) == "person447"
    assert kermany_patient(Path("NORMAL2-IM-1345-0001-0002.jpeg")) == "NORMAL2-IM-1345"
    assert kermany_patient(Path("IM-0115-0001.jpeg")) == "IM-0115"
    with pytest.raises(DataError, match=r"scan\.jpeg: cannot read a patient id"): kermany_patient(Path("scan.jpeg"))


# ---------------------------------------------------------------- the shared datasets (skip without UMEDPT_DATA)
def _paths(ds) -> list[str]: return [str(it["path"]) for it in ds.items]


def _open_quiet(name, split="train", **kw):
    kw.setdefault("dedupe", False)  # the official splits; removing duplicates is tested in test_duplicates.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_dataset(name, split, **kw)


def test_every_card_matches_its_files(real_data):
    for name, card in DATASETS.items():
        for split, n in card.counts.items():
            ds = _open_quiet(name, split, root=real_data)
            got = len(ds.volumes) if name == "totalsegmentator_ct_mr_3d" else len(getattr(ds, "slides", ds))
            assert got == n, (name, split, got, n)


def test_splits_are_disjoint_deterministic_and_complete(real_data):
    whole = {"kvasir_seg_256": 998, "dsb2018_nuclei": 664, "brain_tumor_mri_224": 5708 + 1311,
             "kermany_pneumonia_cxr_224": 5216 + 624, "bccd_detection": 364}
    for name, total in whole.items():
        parts = {s: _paths(_open_quiet(name, s)) for s in ("train", "val", "test")}
        assert parts["train"] == _paths(_open_quiet(name, "train")), name  # same files, same order, every time
        sets = [set(p) for p in parts.values()]
        assert sum(map(len, sets)) == len(set.union(*sets)) == total, name
    seed1 = set(_paths(_open_quiet("kvasir_seg_256", "test", split_seed=1)))
    assert seed1 != set(_paths(_open_quiet("kvasir_seg_256", "test")))


def test_bccd(real_data):
    with pytest.warns(UserWarning, match=r"fixed 1 bad box.*BloodImage_00343\.xml: dropped degenerate"):
        train = open_dataset("bccd_detection", "train")
    with pytest.warns(UserWarning, match=r"BloodImage_00338\.xml: dropped degenerate"):
        val = open_dataset("bccd_detection", "val", dedupe=False)
    test = open_dataset("bccd_detection", "test", dedupe=False)
    assert (len(train), len(val), len(test)) == (205, 87, 72)
    counts = Counter()
    for ds in (train, val, test): counts.update(ds.label_counts())
    assert dict(counts) == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}  # 4,888 boxes minus the 2 documented
    assert len(train.box_notes) + len(val.box_notes) == 2
    with pytest.raises(DataError, match="BloodImage_00343.xml: degenerate box"):
        open_dataset("bccd_detection", bad_boxes="error")
    s = train[0]
    assert s["image"].shape == (3, 480, 640) and len(s["boxes"]) == len(train.items[0]["box_labels"]) > 0


def test_kvasir(real_data):
    seg = [_open_quiet("kvasir_seg_256", s) for s in ("train", "val", "test")]
    assert [len(d) for d in seg] == [798, 100, 100]
    s = seg[0][0]
    assert s["image"].shape == (3, 256, 256) and set(s["mask"].unique().tolist()) == {0, 1}
    frac = s["mask"].float().mean().item()
    assert 0.005 <= frac <= 0.81  # the documented range of polyp fractions
    det = [_open_quiet("kvasir_seg_256", sp, label_type="detection") for sp in ("train", "val", "test")]
    official = json.loads((real_data / "kvasir_seg_256/kavsir_bboxes_original_resolution.json").read_text())
    assert len(official) == 1000 and sum(len(v["bbox"]) for v in official.values()) == 1071  # 2 entries have no image
    assert sum(d.label_counts()["polyp"] for d in det) == 1069 and det[0].classes == ["polyp"]
    d = det[0][0]
    # the scaled box and the mask describe the same polyp: the mask's extent lies inside the union of the boxes (± 3 px)
    fg = torch.nonzero(s["mask"])
    union = torch.cat([d["boxes"][:, :2].min(0).values, d["boxes"][:, 2:].max(0).values])
    assert (torch.stack([fg[:, 1].min(), fg[:, 0].min()]) >= union[:2] - 3).all()
    assert (torch.stack([fg[:, 1].max() + 1, fg[:, 0].max() + 1]) <= union[2:] + 3).all()


def test_dsb2018(real_data):
    det = [_open_quiet("dsb2018_nuclei", s, label_type="detection") for s in ("train", "val", "test")]
    assert sum(len(d) for d in det) == 664 and sum(d.label_counts()["nucleus"] for d in det) == 28986
    seg = _open_quiet("dsb2018_nuclei", "train")
    i = next(k for k, it in enumerate(seg.items)
             if "boxes" not in it and Image.open(it["path"]).size[0] != Image.open(it["path"]).size[1])
    s, d = seg[i], det[0][i]
    assert s["image"].shape[-2:] == s["mask"].shape and s["mask"].shape[0] != s["mask"].shape[1]  # a non-square image
    inst = np.asarray(Image.open(seg.items[i]["mask"])).astype(np.int64)
    assert torch.equal(s["mask"], torch.from_numpy((inst > 0).astype(np.int64)))
    boxes, _ = boxes_from_mask(inst, instances=True)
    assert d["boxes"].tolist() == boxes.tolist()  # the box file agrees with the instance masks


def test_brain_tumor(real_data):
    tr, va, te = (_open_quiet("brain_tumor_mri_224", s) for s in ("train", "val", "test"))
    both = Counter(tr.label_counts()) + Counter(va.label_counts())
    assert dict(both) == {"glioma": 1321, "meningioma": 1339, "notumor": 1591, "pituitary": 1457}
    assert te.label_counts() == {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300}
    modes = {}
    for k, it in enumerate(te.items):
        modes.setdefault(Image.open(it["path"]).mode, k)
        if {"L", "RGB"} <= set(modes): break
    assert {"L", "RGB"} <= set(modes)  # the set mixes grey and colour JPEGs ...
    for k in (modes["L"], modes["RGB"]):  # ... and both come out with 3 channels by default, 1 on request
        assert te[k]["image"].shape == (3, 224, 224)
        assert te.prep.channels == 3
        assert _open_quiet("brain_tumor_mri_224", "test", channels=1)[k]["image"].shape == (1, 224, 224)


def test_kermany(real_data):
    tr, va, te = (_open_quiet("kermany_pneumonia_cxr_224", s) for s in ("train", "val", "test"))
    assert dict(Counter(tr.label_counts()) + Counter(va.label_counts())) == {"normal": 1341, "pneumonia": 3875}
    assert te.label_counts() == {"normal": 234, "pneumonia": 390}
    pt, pv = ({kermany_patient(it["path"]) for it in d.items} for d in (tr, va))
    assert not pt & pv and 0.05 < len(pv) / (len(pt) + len(pv)) < 0.15  # about 10 % of the patients, none shared
    three = [_open_quiet("kermany_pneumonia_cxr_224", s, three_class=True) for s in ("train", "val", "test")]
    c = Counter(); [c.update(d.label_counts()) for d in three[:2]]
    assert c["normal"] == 1341 and c["bacteria"] + c["virus"] == 3875 and min(c.values()) > 1000
    assert three[2].label_counts()["normal"] == 234 and sum(three[2].label_counts().values()) == 624
    assert te[0]["image"].shape == (3, 224, 224)


@pytest.mark.parametrize("name,counts", [
    ("pneumoniamnist_28", {"train": [1214, 3494], "val": [135, 389], "test": [234, 390]}),
    ("medmnist_small/breastmnist", {"train": [147, 399], "val": [21, 57], "test": [42, 114]}),
    ("medmnist_small/adrenalmnist3d", {"train": [929, 259], "val": [76, 22], "test": [229, 69]})])
def test_medmnist(real_data, name, counts):
    for split, want in counts.items():
        ds = open_dataset(name, split, dedupe=False)
        assert list(ds.label_counts().values()) == want
    s = ds[0]
    assert s["image"].shape == (3, 28, 28) and 0 <= s["image"].min() <= s["image"].max() <= 1


def test_adrenal_volumes_become_slices(real_data):
    raw = np.load(real_data / "medmnist_small/adrenalmnist3d.npz")["val_images"]
    centre = open_dataset("medmnist_small/adrenalmnist3d", "val", channels=1, dedupe=False)
    assert torch.allclose(centre[3]["image"][0], torch.from_numpy(raw[3, 14] / 255).float())
    every = open_dataset("medmnist_small/adrenalmnist3d", "val", slices="all", channels=1, dedupe=False)
    assert len(every) == 98 * 28
    assert torch.allclose(every[3 * 28 + 5]["image"][0], torch.from_numpy(raw[3, 5] / 255).float())
    assert every[3 * 28 + 5]["label"] == centre[3]["label"]
    assert len(open_dataset("medmnist_small/adrenalmnist3d_64", "val", dedupe=False)) == 98


def test_crc_tiles(real_data):
    a = open_dataset("crc_histology_tiles_tiny/crc_val_he_7k_png")
    assert len(a) == 32 and a.label_counts()["TUM"] == 4 and a.label_counts()["BACK"] == 0
    assert a.classes[a[len(a) - 1]["label"]] == Path(a.items[-1]["path"]).name.split("-")[0]
    b = open_dataset("crc_histology_tiles_tiny/kather2016_jpg")
    assert len(b) == 33 and b.label_counts()["03_COMPLEX"] == 11 and b.label_counts()["04_LYMPHO"] == 0


def test_totalsegmentator(real_data):
    for modality, depth, top in (("ct", 30, 117), ("mr", 20, 49)):
        ds = open_dataset("totalsegmentator_ct_mr_3d", modality=modality, stream=False)
        assert len(ds) == depth
        s = ds[depth // 2]
        assert s["image"].shape[0] == 3 and s["mask"].max() <= top and len(ds.classes) > top
    stream = open_dataset("totalsegmentator_ct_mr_3d", samples_per_epoch=5, size=64)
    got = list(stream)
    assert len(got) == 5 and all(max(g["image"].shape[-2:]) == 64 for g in got)
    again = open_dataset("totalsegmentator_ct_mr_3d", samples_per_epoch=5, size=64)
    assert [g["meta"]["slice"] for g in got] == [g["meta"]["slice"] for g in again]


def test_loader_batches(real_data):
    ds = _open_quiet("dsb2018_nuclei", "val", label_type="detection", size=128)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape[0] == 4 and batch["image"].shape[-1] == 128 and len(batch["boxes"]) == 4


def test_wsi_patches_have_no_labels(real_data):
    ds = open_dataset("wsi_svs", samples_per_epoch=6, patch_size=96, seed=2)
    assert len(ds.slides) == 2 and ds.classes == [] and ds.label_type == "none"
    got = list(ds)
    assert len(got) == 6
    for s in got:
        assert s["image"].shape == (3, 96, 96) and not set(s) & {"label", "labels", "mask", "boxes"}
        assert s["meta"]["slide"] in {"cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"}
        assert s["meta"]["level"] == 0
