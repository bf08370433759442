"""Loaders of helper D: augmentation wrappers, 3D volumes and the caching slice loader, slides and the patch loader.

Worker correctness, read_region equality, normalisation rules and bad-file errors. Tests that need the shared data
take the `real_data` fixture.
"""
import gzip, pickle, shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset

from umedpt.augment import SampleAugment, VolumeAugment, volume_recipe
from umedpt.core import DataError, check_sample, collate_samples
from umedpt.shapes import ShapesDataset
from umedpt.slides import CachedPatchDataset, SlideReader, tissue_mask
from umedpt.volumes import CachedSliceDataset, NiftiVolumes, NpzVolumes, normalize_volume

TS = "totalsegmentator_ct_mr_3d"


# ---------------------------------------------------------------- helpers
def _volume_items(n, shape=(6, 16, 20), seed=0):
    rng = np.random.default_rng(seed)
    return [{"volume": rng.random(shape, dtype=np.float32), "mask": rng.integers(0, 3, shape), "label": i,
             "meta": {"index": i}} for i in range(n)]


def _stream(ds, num_workers, batch_size=4):
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    return [(m["stream"], m.get("volume", m.get("slide_index")), m.get("slice", m.get("y")), m.get("x", 0),
             round(float(img.double().sum()), 4)) for b in dl for m, img in zip(b["meta"], b["image"])]


def _write_tiff(path, shape=(700, 900), tile=128, seed=0, compression="jpeg"):
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 240, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = (yy - shape[0] / 2) ** 2 / (shape[0] / 3) ** 2 + (xx - shape[1] / 2) ** 2 / (shape[1] / 3) ** 2 < 1
    img[blob] = (rng.normal([200, 110, 180], 15, (blob.sum(), 3))).clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(tile, tile), compression=compression, photometric="rgb", subifds=1)
        tw.write(img[::2, ::2], tile=(tile, tile), compression=compression, photometric="rgb", subfiletype=1)
    return Path(path)


# ---------------------------------------------------------------- normalisation
def test_ct_minmax_gives_exactly_unit_range():
    vol = np.random.default_rng(0).integers(-1024, 3000, (5, 6, 7)).astype(np.int16)
    n = normalize_volume(vol, "ct")
    assert n.dtype == np.float32 and n.min() == 0.0 and n.max() == 1.0
    np.testing.assert_allclose(n, (vol - vol.min()) / (vol.max() - vol.min()), atol=1e-6)


def test_mri_quantiles_clip_both_tails():
    v = np.random.default_rng(1).normal(300, 50, 100_000)
    n = normalize_volume(v, "mri")
    lo, hi = np.percentile(v, [2.5, 97.5])
    assert n.min() == 0.0 and n.max() == 1.0
    assert (n[v >= hi] == 1).all() and (n[v <= lo] == 0).all()
    assert abs((n == 1).mean() - 0.025) < 0.002 and abs((n == 0).mean() - 0.025) < 0.002
    inside = (v > lo) & (v < hi)
    np.testing.assert_allclose(n[inside], (v[inside] - lo) / (hi - lo), atol=1e-5)


def test_ct_and_mri_of_real_volumes(real_data):
    ct = NiftiVolumes([(real_data / TS / "example_ct_sm.nii.gz", real_data / TS / "example_seg.nii.gz")], "ct")[0]
    assert ct["volume"].min() == 0.0 and ct["volume"].max() == 1.0
    raw = np.asarray(nib.load(real_data / TS / "example_mr_sm.nii.gz").dataobj).astype(np.float64)
    mr = NiftiVolumes([real_data / TS / "example_mr_sm.nii.gz"], "mri")[0]["volume"]
    assert abs((mr == 1).mean() - 0.025) < 0.01  # the top 2.5 % of voxels is clipped to 1
    assert mr.shape == raw.shape[::-1]


# ---------------------------------------------------------------- volumes
def test_nifti_orientation_of_real_lps_volume(real_data):
    # the MR is stored LPS: reorienting to RAS flips x and y, and our D×H×W layout flips them back, so the result is
    # the plain transpose of the stored array (checked here without nibabel's reorientation code)
    path, seg = real_data / TS / "example_mr_sm.nii.gz", real_data / TS / "example_seg_mr.nii.gz"
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")
    item = NiftiVolumes([(path, seg)], "mri")[0]
    raw = np.asarray(nib.load(path).dataobj)
    np.testing.assert_array_equal(item["volume"], normalize_volume(raw, "mri").transpose(2, 1, 0))
    np.testing.assert_array_equal(item["mask"], np.asarray(nib.load(seg).dataobj).transpose(2, 1, 0))
    assert item["mask"].dtype == np.int64 and len(np.unique(item["mask"])) - 1 == 23


def test_npz_volumes_real(real_data):
    ds = NpzVolumes(real_data / "medmnist_small/adrenalmnist3d_64.npz", "val")
    assert len(ds) == 98 and ds[0]["volume"].shape == (64, 64, 64)
    assert np.bincount(ds.labels).tolist() == [76, 22]


def test_missing_and_corrupt_nifti_name_the_file(tmp_path):
    with pytest.raises(DataError, match="absent.nii.gz"): NiftiVolumes([tmp_path / "absent.nii.gz"], "ct")
    bad = tmp_path / "truncated.nii.gz"
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)); nib.save(img, tmp_path / "ok.nii.gz")
    bad.write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.nii.gz"): NiftiVolumes([bad], "ct")[0]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(DataError, match="seg.nii.gz"):
        NiftiVolumes([(tmp_path / "ok.nii.gz", tmp_path / "seg.nii.gz")], "ct")[0]


def test_missing_and_corrupt_npz_name_the_file(tmp_path):
    with pytest.raises(DataError, match="absent.npz"): NpzVolumes(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="bad.npz"): NpzVolumes(tmp_path / "bad.npz")
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((3, 4, 4, 4), np.uint8), train_labels=np.zeros((3, 2)))
    with pytest.raises(DataError, match="one label per volume"): NpzVolumes(tmp_path / "multi.npz")


# ---------------------------------------------------------------- caching slice loader and workers
@pytest.mark.parametrize("num_workers", [0, 2])
def test_slice_stream_is_deterministic(num_workers):
    make = lambda: CachedSliceDataset(_volume_items(5), cache_size=2, samples_per_epoch=24, refresh_every=4, seed=3,
                                      transform_3d=VolumeAugment(volume_recipe(prob=1.0)),
                                      transform_2d=SampleAugment("mri"))
    a, b = _stream(make(), num_workers), _stream(make(), num_workers)
    assert a == b and len(a) == 24


def test_slice_workers_do_not_duplicate_streams():
    ds = CachedSliceDataset(_volume_items(4), cache_size=2, samples_per_epoch=20, seed=0)
    out = _stream(ds, 2)
    w = {s: [k[1:] for k in out if k[0] == s] for s in (0, 1)}
    assert len(w[0]) == len(w[1]) == 10
    assert {k[0] for k in w[0]}.isdisjoint({k[0] for k in w[1]})  # volumes are dealt to workers
    # fewer volumes than workers: both workers read the one volume, with different random streams
    one = _stream(CachedSliceDataset(_volume_items(1), samples_per_epoch=20, seed=0), 2)
    assert [k[1:] for k in one if k[0] == 0] != [k[1:] for k in one if k[0] == 1]


def test_slice_loader_on_real_volumes_with_workers(real_data):
    vols = NiftiVolumes([(real_data / TS / "example_ct_sm.nii.gz", real_data / TS / "example_seg.nii.gz"),
                         (real_data / TS / "example_mr_sm.nii.gz", real_data / TS / "example_seg_mr.nii.gz")], "ct")
    ds = CachedSliceDataset(vols, cache_size=1, samples_per_epoch=16, seed=0)
    out = _stream(ds, 2)
    assert out == _stream(ds, 2)
    assert {k[1] for k in out if k[0] == 0} != {k[1] for k in out if k[0] == 1}  # one volume per worker
    b = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert b["image"].shape[1] == 1 and b["mask"].dtype == torch.long and b["mask"].max() > 0


class _Repeat(Dataset):
    "The same sample N times, so that any difference between outputs comes from augmentation."
    def __init__(self, n, aug): self.s, self.n, self.aug = ShapesDataset("segmentation", n=1, size=48)[0], n, aug
    def __len__(self): return self.n
    def __getitem__(self, i): return self.aug(self.s)


def test_sample_augment_in_map_style_workers_is_not_duplicated():
    def run():
        torch.manual_seed(0)
        dl = DataLoader(_Repeat(8, SampleAugment("histology", seed=1)), batch_size=1, num_workers=2,
                        collate_fn=collate_samples)
        return [b["image"] for b in dl]
    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible under torch.manual_seed
    # DataLoader interleaves workers: batches 0, 2, 4, 6 come from worker 0 and 1, 3, 5, 7 from worker 1
    assert not all(torch.equal(a[i], a[i + 1]) for i in (0, 2, 4, 6))


# ---------------------------------------------------------------- slides
@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_read_region_equals_decoded_level(real_data, name):
    r = SlideReader(real_data / "wsi_svs" / name)
    assert len(r.levels) == (1 if name.startswith("cmu") else 2)
    rng = np.random.default_rng(0)
    for lev, lv in enumerate(r.levels):
        full = tifffile.TiffFile(real_data / "wsi_svs" / name).series[0].levels[lev].pages[0].asarray()
        H, W = lv.shape
        for h, w in [(1, 1), (257, 241), (H, min(W, 600))] + [tuple(x) for x in rng.integers(1, 700, (5, 2))]:
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            np.testing.assert_array_equal(r.read_region(lev, y, x, h, w), full[y:y + h, x:x + w])


def test_read_region_synthetic_pyramid_and_pickle(tmp_path):
    path = _write_tiff(tmp_path / "pyr.tif", tile=64)
    r = SlideReader(path)
    assert [lv.shape for lv in r.levels] == [(700, 900), (350, 450)] and r.levels[1].downsample == 2
    for lev in (0, 1):
        full = tifffile.TiffFile(path).series[0].levels[lev].pages[0].asarray()
        np.testing.assert_array_equal(r.read_region(lev, 30, 50, 200, 300), full[30:230, 50:350])
        np.testing.assert_array_equal(r.read_region(-2 + lev, 0, 0, *r.levels[lev].shape), full)
    copy = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(copy.read_region(0, 10, 10, 100, 100), r.read_region(0, 10, 10, 100, 100))


def test_tissue_mask_finds_the_blob(tmp_path):
    r = SlideReader(_write_tiff(tmp_path / "blob.tif"))
    m = tissue_mask(r)
    assert m.shape == (350, 450)
    yy, xx = np.mgrid[:350, :450]
    truth = (yy - 175) ** 2 / (350 / 3) ** 2 + (xx - 225) ** 2 / (450 / 3) ** 2 < 1
    assert (m == truth).mean() > 0.97


def test_missing_corrupt_and_blank_slides(tmp_path):
    with pytest.raises(DataError, match="absent.svs"): SlideReader(tmp_path / "absent.svs")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="junk.tif"): SlideReader(tmp_path / "junk.tif")
    path = _write_tiff(tmp_path / "tiles.tif", tile=64)
    page = tifffile.TiffFile(path).series[0].levels[0].pages[0]
    raw = bytearray(path.read_bytes())
    off, n = page.dataoffsets[0], page.databytecounts[0]
    raw[off:off + n] = b"\x00" * n  # destroy the first tile
    bad = tmp_path / "bad_tile.tif"; bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad_tile.tif.*tile 0"): SlideReader(bad).read_region(0, 0, 0, 10, 10)
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((256, 256, 3), 250, np.uint8), tile=(64, 64), photometric="rgb")
    with pytest.raises(DataError, match="no tissue"): CachedPatchDataset([blank], patch_size=32)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_patch_stream_deterministic_and_exact(tmp_path, num_workers):
    paths = [_write_tiff(tmp_path / f"s{i}.tif", seed=i) for i in range(3)]
    make = lambda: CachedPatchDataset(paths, patch_size=48, cache_regions=2, region_size=160, samples_per_epoch=18,
                                      refresh_every=3, seed=5)
    a, b = _stream(make(), num_workers), _stream(make(), num_workers)
    assert a == b and len(a) == 18
    if num_workers == 2:
        assert [k[1:] for k in a if k[0] == 0] != [k[1:] for k in a if k[0] == 1]
    ds = make()
    for s in ds:
        check_sample(s, "patch"); m = s["meta"]
        want = ds.slides[m["slide_index"]].reader.read_region(0, m["y"], m["x"], 48, 48)
        np.testing.assert_array_equal((s["image"] * 255).round().byte().permute(1, 2, 0).numpy(), want)


def test_patch_loader_on_real_slides_level1(real_data):
    tcga = real_data / "wsi_svs/tcga-cr-7395-01a-01-ts1.svs"
    ds = CachedPatchDataset([tcga], patch_size=128, level=1, cache_regions=2, region_size=512, samples_per_epoch=8)
    out = list(ds)
    assert len(out) == 8 and all(s["meta"]["level"] == 1 for s in out)
    assert np.mean([s["meta"]["tissue"] for s in out]) > 0.5
    with pytest.raises(Exception, match="level 1 does not exist"):
        CachedPatchDataset([real_data / "wsi_svs/cmu-1-small-region.svs"], level=1)
