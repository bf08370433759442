"""Export and reuse: safetensors round trip without pickle, strict loading, atomic saves, embeddings and the CLI."""
import json, os, pickle, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from umedpt.core import ConfigError, DataError, InputError
from umedpt.blocks import BlocksConfig, SharedBlocks
from umedpt.export import CONFIG_NAME, WEIGHTS_NAME, embed_images, from_pretrained, load_image, main, save_pretrained

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


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
    assert isinstance(from_pretrained(saved / WEIGHTS_NAME, device="cpu"), SharedBlocks)  # a file in the folder works too


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


def test_embeddings_do_not_depend_on_neighbours_or_order(blocks):
    g = torch.Generator().manual_seed(0)
    sizes = [(33, 45), (64, 64), (50, 90), (64, 64), (100, 31), (40, 40), (33, 45)]
    imgs = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    together = embed_images(blocks, imgs, batch_size=3, device="cpu")
    alone = np.concatenate([embed_images(blocks, [im], device="cpu") for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    perm = [6, 2, 0, 5, 1, 4, 3]
    np.testing.assert_allclose(embed_images(blocks, [imgs[i] for i in perm], batch_size=2, device="cpu"), together[perm], atol=1e-4)
    with torch.no_grad():  # "alone" means: padded bottom/right with zeros to a multiple of 32
        h, w = sizes[2]
        ref = blocks.embed(F.pad(imgs[2], (0, -w % 32, 0, -h % 32))[None]).numpy()
    np.testing.assert_allclose(alone[2:3], ref, atol=1e-4)
    # and padding does matter, so the test above can fail: more zero padding changes the embedding
    with torch.no_grad(): more = blocks.embed(F.pad(imgs[2], (0, -w % 32 + 32, 0, -h % 32 + 32))[None]).numpy()
    assert np.abs(more - ref).max() > 1e-2


def test_embed_images_keeps_training_mode_and_checks_input(blocks):
    blocks.train()
    embed_images(blocks, [torch.rand(3, 32, 32)], device="cpu")
    assert blocks.training
    blocks.eval()
    with pytest.raises(InputError, match="image 1: expected a float tensor"):
        embed_images(blocks, [torch.rand(3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(InputError, match="image 0: expected a tensor or a file path"): embed_images(blocks, [np.zeros((3, 4, 4))])
    with pytest.raises(ConfigError, match="batch_size"): embed_images(blocks, [torch.rand(3, 32, 32)], batch_size=0)


def test_load_image_formats(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    t = load_image(tmp_path / "rgba.png")
    assert t.shape == (3, 20, 30) and torch.allclose(t, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1) / 255)
    g16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    t16 = load_image(tmp_path / "g16.png", channels=1)
    assert t16.shape == (1, 20, 30) and torch.allclose(t16[0], torch.from_numpy(g16.astype(np.float32) / 65535))
    import tifffile
    tifffile.imwrite(tmp_path / "chw.tif", np.stack([g16] * 3), photometric="rgb", planarconfig="separate")  # channels first
    assert load_image(tmp_path / "chw.tif").shape == (3, 20, 30)
    tifffile.imwrite(tmp_path / "f.tif", np.full((8, 8), 3.5, np.float32))
    with pytest.raises(DataError, match=r"f\.tif: unsupported pixel type float32"): load_image(tmp_path / "f.tif")


def _image_folder(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 50), "b.jpg": (64, 64), "sub/c.png": (70, 33)}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_cli_reports_unreadable_file_and_writes_the_others(saved, tmp_path):
    pics = _image_folder(tmp_path / "pics")
    out = tmp_path / "out" / "emb.csv"
    r = subprocess.run([sys.executable, "-m", "umedpt", "embed", "--weights", str(saved), "--images", str(pics),
                        "--out", str(out), "--device", "cpu", "--batch-size", "2"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "cannot read the image" in errors[0]
    assert "image" in r.stderr  # the tqdm bar's unit
    table = pd.read_csv(out)
    assert table.file.tolist() == ["a.png", "b.jpg"]  # sorted, sub-folder not included without --recursive
    expected = embed_images(from_pretrained(saved, device="cpu"), [pics / "a.png", pics / "b.jpg"], device="cpu")
    np.testing.assert_allclose(table.drop(columns="file").values, expected, atol=1e-5)
    assert table.columns[1] == "emb_0000" and table.shape[1] == 1 + expected.shape[1]


def test_cli_parquet_recursive_and_clean_exit(saved, tmp_path):
    pics = _image_folder(tmp_path / "pics")
    (pics / "broken.png").unlink()
    assert main(["embed", "--weights", str(saved), "--images", str(pics), "--out", str(tmp_path / "e.parquet"),
                 "--recursive", "--no-progress", "--device", "cpu", "--max-size", "48"]) == 0
    table = pd.read_parquet(tmp_path / "e.parquet")
    assert table.file.tolist() == ["a.png", "b.jpg", "sub/c.png"] and table.iloc[:, 1:].notna().all().all()


def test_cli_missing_weights_and_usage_errors(saved, tmp_path, capsys):
    pics = _image_folder(tmp_path / "pics")
    (tmp_path / "w").mkdir(); (tmp_path / "w" / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text())
    assert main(["embed", "--weights", str(tmp_path / "w"), "--images", str(pics), "--out", str(tmp_path / "e.csv")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: no such file" in err and not (tmp_path / "e.csv").exists()
    assert main(["embed", "--weights", str(saved), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "e.csv")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", "--weights", str(saved), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(["embed", "--weights", str(saved)])
    assert e.value.code == 2
