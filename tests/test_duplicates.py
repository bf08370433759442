"""Duplicates between splits, by content: the registry's held-out splits share no image with their training splits,
the record of what was removed is cached on disk, and dedupe=False gives the official split."""
import logging, os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import umedpt.registry as registry
from umedpt.adapters import ClassFolderDataset
from umedpt.catalogue import duplicate_report, open_dataset
from umedpt.core import ConfigError, DataError
from umedpt.duplicates import Fingerprints, assert_disjoint, find_duplicates
from umedpt.registry import CACHE_ENV, DATASETS, DatasetCard, item_keys, register_dataset

CHECKED = ("brain_tumor_mri_224", "kermany_pneumonia_cxr_224", "pneumoniamnist_28", "medmnist_small/breastmnist",
           "medmnist_small/adrenalmnist3d")


@pytest.fixture(scope="session")
def fingerprinted(tmp_path_factory):
    """A session-wide duplicate cache in a tmp folder, and every dataset decoded at most once per session: the
    registry's `fingerprint_dataset` is memoised by the image keys it is asked for (the tests reuse the results)."""
    real, memo, calls = registry.fingerprint_dataset, {}, []
    def memoised(dataset, base=None, progress=False):
        key = (str(base), type(dataset).__name__, tuple(item_keys(dataset, base)))
        calls.append(key)
        if key not in memo: memo[key] = real(dataset, base, progress)
        return memo[key]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("umedpt_cache")))
        mp.setattr(registry, "fingerprint_dataset", memoised)
        yield memoised, calls


def _path(real_data: Path, name: str) -> Path: return real_data / (DATASETS[name].path or name)


def _fingerprints(fingerprinted, real_data, name: str, split: str) -> Fingerprints:
    "Fingerprints of the official split (no duplicates removed)."
    return fingerprinted[0](open_dataset(name, split, dedupe=False), _path(real_data, name))


@pytest.mark.parametrize("name", CHECKED)
def test_held_out_splits_share_no_image_with_training(real_data, fingerprinted, name):
    card = DATASETS[name]
    for split, against in card.held_out.items():
        official = _fingerprints(fingerprinted, real_data, name, split)
        train = {s: _fingerprints(fingerprinted, real_data, name, s) for s in against}
        kept = set(item_keys(open_dataset(name, split), _path(real_data, name)))
        assert_disjoint(train, official.select([i for i, k in enumerate(official.ids) if k in kept]))
        dups = find_duplicates(official, Fingerprints.concat(list(train.values())))
        assert len(kept) == len(official) - dups["a"].nunique(), (name, split)  # only duplicates were removed
        with pytest.raises(DataError, match="held-out images duplicate") if len(dups) else nullcontext():
            assert_disjoint(train, official)  # the official split, where it has duplicates, fails the check


def test_brain_mri_counts_and_the_official_split(real_data, fingerprinted):
    report = duplicate_report(["brain_tumor_mri_224", "kermany_pneumonia_cxr_224"]).set_index(["dataset", "split"])
    brain = report.loc[("brain_tumor_mri_224", "test")]
    assert (brain["images"], brain["exact"]) == (1311, 216) and 200 <= brain["near"] <= 280
    assert len(open_dataset("brain_tumor_mri_224", "test")) == brain["kept"] == 1311 - 216 - brain["near"]
    assert len(open_dataset("brain_tumor_mri_224", "test", dedupe=False)) == DATASETS["brain_tumor_mri_224"].counts[
        "test"] == 1311
    assert report.loc[("kermany_pneumonia_cxr_224", "test"), "kept"] == 624  # Kermany's test folder is clean
    for name in CHECKED:  # dedupe=False gives the official count of every held-out split
        for split in DATASETS[name].held_out:
            assert len(open_dataset(name, split, dedupe=False)) == DATASETS[name].counts[split], (name, split)


def test_the_cache_is_used_the_second_time(real_data, fingerprinted, monkeypatch):
    first = len(open_dataset("brain_tumor_mri_224", "test"))
    files = list((Path(os.environ[CACHE_ENV]) / "duplicates").glob("brain_tumor_mri_224.test.*.json"))
    assert len(files) == 1
    def fail(*a, **k): raise AssertionError("fingerprinted again although the record is cached")
    monkeypatch.setattr(registry, "fingerprint_dataset", fail)
    assert len(open_dataset("brain_tumor_mri_224", "test", size=64)) == first  # other options, same images: cached
    assert len(open_dataset("brain_tumor_mri_224", "test", val_fraction=0.2)) == first  # train + val is the same


# ---------------------------------------------------------------- a registered toy dataset (no real data needed)
def _image(path: Path, seed: int, quality: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    a = np.kron(rng.integers(0, 255, (10, 13), dtype=np.uint8), np.ones((5, 5), np.uint8))[:48, :64]  # blocky
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, **({"quality": quality} if quality else {}))
    return path


@pytest.fixture
def toy(tmp_path, monkeypatch):
    "`toy/{train,val,test}/x/*`: test holds a renamed copy and a JPEG re-encode of train images, val a copy too."
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    root = tmp_path / "data"
    for k in range(4): _image(root / f"toy/train/x/{k}.png", k)
    _image(root / "toy/test/x/copy.png", 0); _image(root / "toy/test/x/reencoded.jpg", 1, quality=95)
    _image(root / "toy/test/x/new.png", 9); _image(root / "toy/val/x/copy.png", 2); _image(root / "toy/val/x/v.png", 8)
    card = DatasetCard(name="toy", label_type="classification", modality="noise", classes=("x",), licence="own",
                       source="test", layout="toy/{train,val,test}/x/*", counts={"train": 4, "val": 2, "test": 3},
                       splits={s: s for s in ("train", "val", "test")})
    register_dataset(card)(lambda path, split, **common: ClassFolderDataset(path / split, name="toy", **common))
    yield root, card
    del DATASETS["toy"]


def test_toy_test_split_loses_its_copies_and_val_is_kept(toy):
    root, card = toy
    assert card.held_out == {"test": ("train",)}  # the default: val is not compared
    test = open_dataset("toy", "test", root=root)
    assert [Path(it["path"]).name for it in test.items] == ["new.png"]
    assert len(open_dataset("toy", "test", root=root, dedupe=False)) == 3
    assert len(open_dataset("toy", "val", root=root)) == 2
    report = duplicate_report("toy", root=root)
    assert report[["images", "exact", "near", "kept"]].values.tolist() == [[3, 1, 1, 1]]


def test_toy_cache_follows_the_files(toy):
    root, card = toy
    assert len(open_dataset("toy", "test", root=root)) == 1
    cache = Path(os.environ[CACHE_ENV]) / "duplicates"
    (record,) = cache.glob("toy.test.*.json")
    record.write_text("{not json")  # a broken record is recomputed and rewritten, not trusted
    assert len(open_dataset("toy", "test", root=root)) == 1 and record.read_text().startswith("{\n")
    _image(root / "toy/train/x/9.png", 9)  # new.png now has a training copy: another key, computed afresh
    with pytest.raises(DataError, match="every image of split 'test' duplicates one of train; open it with dedupe"):
        open_dataset("toy", "test", root=root)
    assert len(list(cache.glob("toy.test.*.json"))) == 2
    assert len(open_dataset("toy", "test", root=root, dedupe=False)) == 3


def test_toy_dedupe_with_an_unwritable_cache_still_opens(toy, tmp_path, monkeypatch, caplog):
    root, _ = toy
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a_file"))  # a file where the cache folder should be
    with caplog.at_level(logging.WARNING, logger="umedpt.registry"):
        assert len(open_dataset("toy", "test", root=root)) == 1
    assert "cannot cache duplicates" in caplog.text


def test_dedupe_card_must_name_its_splits():
    card = DatasetCard(name="bad", label_type="none", modality="", classes=(), licence="", source="", layout="",
                       splits={"train": "", "test": ""}, counts={}, dedupe={"test": ("val",)})
    with pytest.raises(ConfigError, match=r"dedupe 'test' -> \('val',\) must name a split"): register_dataset(card)
