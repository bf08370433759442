"""The `umedpt` command line: embed (exit status, unreadable files, formats), check, and clean --help."""
import os, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from umedpt.blocks import BlocksConfig, SharedBlocks
from umedpt.cli import main
from umedpt.inference import embed_images
from umedpt.weights import CONFIG_NAME, from_pretrained, save_pretrained

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(SharedBlocks(BlocksConfig()).eval(), tmp_path_factory.mktemp("w") / "umedpt")


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
                        "--out", str(out), "--device", "cpu", "--batch-size", "2"],
                       capture_output=True, text=True, env=ENV)
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
    embed = lambda weights, images: main(["embed", "--weights", str(weights), "--images", str(images),
                                          "--out", str(tmp_path / "e.csv")])
    assert embed(tmp_path / "w", pics) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: no such file" in err and not (tmp_path / "e.csv").exists()
    assert embed(saved, tmp_path / "none") == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert embed(saved, tmp_path / "empty") == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(["embed", "--weights", str(saved)])
    assert e.value.code == 2


@pytest.mark.parametrize("command", [[], ["embed"], ["check"]])
def test_help_is_clean(command):
    r = subprocess.run([sys.executable, "-m", "umedpt", *command, "--help"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("usage: umedpt"), r.stderr
    assert all(word in r.stdout for word in {(): ("embed", "check"), ("embed",): ("--weights", "--out"),
                                             ("check",): ("--layout", "--split", "--option")}[tuple(command)])


def _class_folder(folder: Path, broken: bool) -> Path:
    for k, cls in enumerate(("cat", "dog", "cat", "dog")):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(folder / cls / f"{k}.png")
    if broken: (folder / "dog" / "bad.png").write_bytes(b"not a png")
    return folder


def test_check_folder_lists_problems(tmp_path, capsys):
    pets = _class_folder(tmp_path / "pets", broken=True)
    assert main(["check", str(pets), "--layout", "classes", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "dog/bad.png" in out and "1 with problems" in err
    (pets / "dog" / "bad.png").unlink()
    assert main(["check", str(pets), "--layout", "classes", "--option", "channels=1", "--no-progress"]) == 0
    assert capsys.readouterr().out == ""


def test_check_usage_errors(tmp_path, capsys):
    pets = _class_folder(tmp_path / "pets", broken=False)
    assert main(["check", str(pets), "--layout", "nope"]) == 2
    assert "unknown layout 'nope'" in capsys.readouterr().err
    assert main(["check", str(pets), "--layout", "classes", "--split", "val"]) == 2
    assert main(["check", str(pets), "--layout", "classes", "--option", "no-equals"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["check", "no_such_dataset", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'no_such_dataset'" in capsys.readouterr().err


def test_check_registered_dataset():
    from umedpt.core import data_root
    if data_root(required=False) is None: pytest.skip("needs UMEDPT_DATA")
    r = subprocess.run([sys.executable, "-m", "umedpt", "check", "crc_histology_tiles_tiny/kather2016_jpg",
                        "--no-progress"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    assert "33 samples checked, 0 with problems" in r.stderr
