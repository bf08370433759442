"""Weights: safetensors round trip without pickle, strict loading, atomic saves, short names and publishing."""
import hashlib, json, pickle
import pytest
import torch
from umedpt.core import ConfigError, DataError
from umedpt.blocks import BlocksConfig, SharedBlocks
import umedpt.weights as weights
from umedpt.weights import (CARD_NAME, CONFIG_NAME, PUBLISHED, WEIGHTS_NAME, PublishedModel, from_pretrained,
                            publish_weights, read_config, save_pretrained)


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return SharedBlocks(BlocksConfig()).eval()


@pytest.fixture(scope="module")
def saved(blocks, tmp_path_factory):
    return save_pretrained(blocks, tmp_path_factory.mktemp("w") / "umedpt", extra={"steps": 0, "tasks": ["shapes"]})


def test_round_trip_is_exact(blocks, saved):
    loaded = from_pretrained(saved, device="cpu")
    x = torch.rand(3, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(blocks.embed(x), loaded.embed(x))
        assert all(torch.equal(a, b) for a, b in zip(blocks.encode(x), loaded.encode(x)))
    assert not loaded.training
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["blocks"]["pretrained"] is False and config["extra"] == {"steps": 0, "tasks": ["shapes"]}
    assert config["norm"] == blocks.config.norm and config["umedpt_version"]


def test_no_pickle_anywhere(saved, monkeypatch):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    def refuse(*args, **kwargs): raise AssertionError("a pickle loader was called")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = from_pretrained(saved, device="cpu")
    assert sum(p.numel() for p in loaded.parameters()) > 0


def test_pretrained_config_is_not_downloaded_again(tmp_path):
    "A model built with pretrained=True is saved with pretrained=False: loading uses the file, nothing else."
    b = SharedBlocks(BlocksConfig(pretrained=True, norm="keep")).eval()
    path = save_pretrained(b, tmp_path / "imagenet")
    assert json.loads((path / CONFIG_NAME).read_text())["blocks"]["pretrained"] is False
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(b.embed(x), from_pretrained(path, device="cpu").embed(x))


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(DataError, match="no such folder"): from_pretrained(tmp_path / "nothing")
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text())
    with pytest.raises(DataError, match=r"only_config/model\.safetensors: no such file"):
        from_pretrained(tmp_path / "only_config")
    (tmp_path / "only_weights").mkdir()
    (tmp_path / "only_weights" / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes())
    with pytest.raises(DataError, match=r"only_weights/config\.json: no such file"):
        from_pretrained(tmp_path / "only_weights")
    assert isinstance(from_pretrained(saved / WEIGHTS_NAME, device="cpu"), SharedBlocks)  # a file in the folder works


def test_strict_loading_names_shape_mismatch(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"; bad.mkdir()
    (bad / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text())
    state = load_file(saved / WEIGHTS_NAME)
    key = next(k for k, v in state.items() if v.ndim == 4 and v.shape[0] > 1)
    state[key] = torch.zeros(1, *state[key].shape[1:])
    save_file(state, bad / WEIGHTS_NAME)
    with pytest.raises(DataError, match=f"shape mismatch: {key}"): from_pretrained(bad)
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    (bad / CONFIG_NAME).write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(DataError, match="not a umedpt config"): from_pretrained(bad)


def test_save_is_atomic(blocks, saved, tmp_path, monkeypatch):
    target = save_pretrained(blocks, tmp_path / "m", extra={"version": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.torch
    def crash(*args, **kwargs): raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"): save_pretrained(blocks, target, extra={"version": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous save is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_save_refuses_a_file_path(blocks, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"): save_pretrained(blocks, tmp_path / "file")


# Published weights by short name

ALLOWED = {"shapes_cls": "synthetic", "nuclei": "dsb2018_nuclei"}


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    "Point the package's pretrained folder at a temporary one."
    monkeypatch.setattr(weights, "PRETRAINED_DIR", tmp_path / "pretrained")
    return tmp_path / "pretrained"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(1)
    b = SharedBlocks(BlocksConfig(pixel_channels=8, fpn_channels=16)).eval()
    return b, save_pretrained(b, tmp_path_factory.mktemp("tiny") / "tiny", extra={"profile": "test", "steps": 3})


def test_publish_and_load_by_name(tiny, package_dir):
    blocks, src = tiny
    out = publish_weights(src, "umedpt-tiny", ALLOWED, results={"nuclei Dice": 0.75})
    assert out == package_dir / "umedpt-tiny"
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    from safetensors.torch import load_file
    state = load_file(out / WEIGHTS_NAME)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    loaded = from_pretrained("umedpt-tiny", device="cpu")  # found in the package folder, no PUBLISHED entry needed
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for k, v in blocks.state_dict().items():
        ref = v.half().to(v.dtype) if v.is_floating_point() else v
        assert torch.equal(loaded.state_dict()[k], ref), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(loaded.embed(x), blocks.embed(x), atol=2e-2, rtol=2e-2)
    sha = hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()
    card, config = (out / CARD_NAME).read_text(), read_config(out)
    assert config["published"]["sha256"] == sha and config["published"]["database"] == ALLOWED
    from umedpt.registry import DATASETS
    for text in (sha, DATASETS["dsb2018_nuclei"].licence, "synthetic", "Not for clinical use", "0.75",
                 "| profile |", "efficientnet_lite0"):
        assert text in card, text


def test_registered_name_points_anywhere(tiny, tmp_path, monkeypatch):
    out = publish_weights(tiny[1], "umedpt-tiny", ALLOWED, dest=tmp_path / "elsewhere")
    monkeypatch.setitem(PUBLISHED, "umedpt-tiny", PublishedModel(str(out)))
    assert isinstance(from_pretrained("umedpt-tiny", device="cpu"), SharedBlocks)


def test_publish_refuses_kvasir(tiny, package_dir):
    from umedpt.registry import DATASETS
    licence = DATASETS["kvasir_seg_256"].licence
    with pytest.raises(ConfigError, match="refused") as e:
        publish_weights(tiny[1], "umedpt-tiny", {**ALLOWED, "polyps": "kvasir_seg_256"})
    assert "kvasir_seg_256" in str(e.value) and licence in str(e.value)
    assert not package_dir.exists()
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"): publish_weights(tiny[1], "t", {"a": "nope"})
    with pytest.raises(ConfigError, match="must map"): publish_weights(tiny[1], "t", {})


def test_publish_is_atomic(tiny, package_dir, monkeypatch):
    first = publish_weights(tiny[1], "umedpt-tiny", ALLOWED)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr(weights, "_model_card", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError): publish_weights(tiny[1], "umedpt-tiny", {"other": "synthetic"})
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in package_dir.iterdir()) == ["umedpt-tiny"]


def test_unknown_and_unshipped_names(package_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"published names: umedpt-lite0 \(shipped\)"):
        from_pretrained("umedpt-nope")
    monkeypatch.setitem(PUBLISHED, "umedpt-later", PublishedModel("umedpt-later", status="not shipped",
                                                                   reason="its licence forbids it"))
    with pytest.raises(DataError, match="not shipped with umedpt: its licence forbids it"):
        from_pretrained("umedpt-later")


def test_shipped_weights_reproduce_the_committed_embedding():
    "umedpt-lite0 loads by name from the package and embeds two fixed images as recorded when it was published."
    import json, hashlib, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    from publish_weights import REFERENCE, embed_reference
    reference = json.loads(REFERENCE.read_text())
    shipped = weights.PRETRAINED_DIR / "umedpt-lite0" / WEIGHTS_NAME
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == reference["sha256"]
    got = torch.tensor(embed_reference("umedpt-lite0"))
    want = torch.tensor(reference["embedding"])
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert PUBLISHED["umedpt-lite0"].status == "shipped"


def test_the_published_database_can_be_shipped(tiny, package_dir):
    "umedpt-lite0 ships because its database (the pretraining chapter's table) holds only redistributable data."
    import pandas as pd
    from pathlib import Path
    table = Path(__file__).resolve().parents[1] / "book/data/pretraining/database.csv"
    if not table.is_file(): pytest.skip("no published pretraining database table")
    db = pd.read_csv(table)
    out = publish_weights(tiny[1], "umedpt-lite0", dict(zip(db["task"], db["source"])))
    assert "kermany_pneumonia_cxr_224" in (out / CARD_NAME).read_text()
