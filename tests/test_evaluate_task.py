"""Scoring a saved fine-tuned task on new data: save_task/load_task, evaluate_folder and `umedpt evaluate`."""
import json, os, subprocess, sys
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from umedpt.blocks import BlocksConfig, SharedBlocks
from umedpt.core import ConfigError, DataError
from umedpt.inference import evaluate_folder
from umedpt.tasks import create_task
from umedpt.weights import load_task, save_task

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
QUIET = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return SharedBlocks(BlocksConfig()).eval()


def _masks_folder(root, suffix: str, scale: int):
    "Two 48×64 images with a bright square and its mask (values 0/scale) stored as `suffix`."
    for sub in ("images", "masks"): (root / sub).mkdir(parents=True)
    for k in range(2):
        m = np.zeros((48, 64), np.uint8); m[6 + 5 * k:30, 12:44 + 4 * k] = 1
        Image.fromarray(np.dstack([m * 200 + 30] * 3).astype(np.uint8)).save(root / "images" / f"{k}.png")
        Image.fromarray(m * scale).save(root / "masks" / f"{k}{suffix}", quality=70)
    return root


def _evaluate_command(model, data, *args) -> dict:
    "`python -m umedpt evaluate` on the CPU: the metrics it printed, by name (it must succeed)."
    r = subprocess.run([sys.executable, "-m", "umedpt", "evaluate", "--model", str(model), "--data", str(data), *args,
                        "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return dict(line.split() for line in r.stdout.splitlines())


def test_jpeg_masks_need_the_threshold_and_match_png(blocks, tmp_path):
    model = save_task(blocks, create_task("segmentation", "sq", ["background", "square"], blocks), tmp_path / "m")
    jpg, png = _masks_folder(tmp_path / "jpg", ".jpg", 255), _masks_folder(tmp_path / "png", ".png", 1)
    with pytest.raises(ConfigError, match="masks are JPEG.*mask_threshold"): evaluate_folder(model, jpg, **QUIET)
    scores = evaluate_folder(model, jpg, mask_threshold=127, out=tmp_path / "s.csv", **QUIET)
    assert scores == evaluate_folder(model, png, **QUIET) and "dice" in scores
    table = pd.read_csv(tmp_path / "s.csv")
    assert table.metric.tolist() == list(scores) and np.allclose(table.value, list(scores.values()))
    printed = _evaluate_command(model, jpg, "--mask-threshold", "127")
    assert np.isclose(float(printed["dice"]), scores["dice"], rtol=1e-5)


def test_class_folder_scores_the_saved_head(blocks, tmp_path):
    torch.manual_seed(1)
    task = create_task("classification", "tone", ["dark", "light"], blocks)
    model = save_task(blocks, task, tmp_path / "m", extra={"trained_on": "nothing"})
    data = tmp_path / "tone"
    for k in range(8):
        cls = ("dark", "light")[k % 2]
        (data / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 40 + 170 * (k % 2) + k, np.uint8)).save(data / cls / f"{k}.png")
    b2, t2 = load_task(model, device="cpu")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(task.eval().predict({"image": x}, blocks), t2.predict({"image": x}, b2))
    scores = evaluate_folder(model, data, out=tmp_path / "s.json", batch_size=3, **QUIET)
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["samples"] == 8 and record["metrics"] == scores and record["label_type"] == "classification"
    assert set(scores) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc"}


def test_bad_input_is_named(blocks, tmp_path):
    model = save_task(blocks, create_task("classification", "t", ["a", "b"], blocks), tmp_path / "m")
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "c" / "x.png")
    with pytest.raises(DataError, match="x.png: class 'c' is not one of"):
        evaluate_folder(model, tmp_path / "d", **QUIET)
    with pytest.raises(DataError, match="task.json: no such file"):
        load_task(save_task_free(blocks, tmp_path / "blocks_only"))
    with pytest.raises(ConfigError, match="unknown format"): evaluate_folder(model, tmp_path / "d", out="m.txt")
    with pytest.raises(ConfigError, match="unknown layout"): evaluate_folder(model, tmp_path / "d", layout="x", **QUIET)
    (tmp_path / "m" / "task.json").write_text("{broken")
    with pytest.raises(DataError, match="task.json: not valid JSON"): load_task(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "umedpt", "evaluate", "--model", str(tmp_path / "m"), "--data",
                        str(tmp_path / "d"), "--no-progress"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "task.json" in r.stderr


def save_task_free(blocks, path):
    from umedpt.weights import save_pretrained
    return save_pretrained(blocks, path)


def _voc_folder(root, split: str = "test"):
    "A Pascal VOC folder of three 64×64 images, each with one bright box of class 'cell' on a dark background."
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"): (root / sub).mkdir(parents=True)
    ids = []
    for k in range(3):
        x0, y0 = 8 + 6 * k, 10 + 4 * k
        img = np.full((64, 64, 3), 20, np.uint8); img[y0:y0 + 24, x0:x0 + 28] = 220
        Image.fromarray(img).save(root / "JPEGImages" / f"im{k}.jpg", quality=95)
        (root / "Annotations" / f"im{k}.xml").write_text(
            f"<annotation><filename>im{k}.jpg</filename><size><width>64</width><height>64</height><depth>3</depth>"
            f"</size><object><name>cell</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x0 + 28}</xmax><ymax>{y0 + 24}</ymax></bndbox></object></annotation>")
        ids.append(f"im{k}")
    (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_folder_scores_a_saved_detection_task(blocks, tmp_path):
    torch.manual_seed(2)
    model = save_task(blocks, create_task("detection", "cells", ["cell"], blocks), tmp_path / "m")
    voc = _voc_folder(tmp_path / "voc")
    with pytest.raises(DataError, match="split file not found"): evaluate_folder(model, voc, **QUIET)  # no train.txt
    scores = evaluate_folder(model, voc, split="test", out=tmp_path / "s.json", **QUIET)
    assert set(scores) >= {"map_50", "map"} and all(0 <= v <= 1 for v in scores.values())
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 3
    printed = _evaluate_command(model, voc, "--option", "split=test")
    assert np.isclose(float(printed["map_50"]), scores["map_50"], rtol=1e-5)
