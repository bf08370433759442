"""Slide feature tables (umedpt.slides.embed_slide) and `umedpt embed-slide`: shape, tissue, resume, staged slides."""
import os, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from torch import nn
from umedpt.core import DataError
from umedpt.slides import SlideReader, embed_slide, patch_grid, tissue_mask

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


class Tiny(nn.Module):
    "A small random CNN with `embed` (4 features); counts its calls."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.calls = nn.Conv2d(3, 4, 5, 4), 0

    def embed(self, x):
        self.calls += 1
        return self.conv(x).mean((2, 3))


def _slide(path: Path) -> Path:
    "A 2-level tiled TIFF, 384×512: a pink rectangle of tissue (rows 64-320, cols 128-448) on white glass."
    img = np.full((384, 512, 3), 245, np.uint8)
    img[64:320, 128:448] = (205, 120, 175)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), photometric="rgb", subifds=1)
        tw.write(img[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    return path


def _read(table: Path) -> pd.DataFrame:
    return pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)


def test_table_shape_tissue_and_features(tmp_path):
    slide, tiny = _slide(tmp_path / "rect.tif"), Tiny()
    done = embed_slide(slide, tiny, tmp_path / "out", patch_size=64, level=0, batch_size=5, progress=False)
    t = _read(done.table)
    assert list(t.columns) == ["x", "y", "level", "emb_0000", "emb_0001", "emb_0002", "emb_0003"]
    assert len(t) == done.patches == 4 * 5  # the rectangle holds 4 × 5 whole 64-pixel grid cells
    assert set(zip(t.y, t.x)) == {(y, x) for y in range(64, 320, 64) for x in range(128, 448, 64)}
    r = SlideReader(slide)
    mask = tissue_mask(r)
    sy, sx = 384 / mask.shape[0], 512 / mask.shape[1]
    for x, y in zip(t.x, t.y):  # every patch lies inside the tissue mask
        assert mask[int(y / sy):int((y + 64) / sy), int(x / sx):int((x + 64) / sx)].all()
    pix = torch.from_numpy(r.read_region(0, int(t.y[3]), int(t.x[3]), 64, 64)).permute(2, 0, 1)[None] / 255
    with torch.no_grad(): np.testing.assert_allclose(t.iloc[3, 3:].to_numpy(float), tiny.embed(pix)[0], atol=1e-5)
    assert done.thumbnail.is_file() and done.thumbnail.read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_array_equal(patch_grid(r, mask, 0, 64, min_tissue=0.5), t[["y", "x"]].to_numpy())


def test_resume_skips_finished_and_redoes_interrupted(tmp_path):
    a, b, out = _slide(tmp_path / "a.tif"), _slide(tmp_path / "b.tif"), tmp_path / "out"
    tiny = Tiny()
    first = embed_slide(a, tiny, out, patch_size=64, level=1, format="csv", progress=False)
    mtime, calls = first.table.stat().st_mtime_ns, tiny.calls

    class Stop(Tiny):
        def embed(self, x): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): embed_slide(b, Stop(), out, patch_size=64, level=1, format="csv")
    assert not (out / "b.csv").exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    again = [embed_slide(s, tiny, out, patch_size=64, level=1, format="csv", progress=False) for s in (a, b)]
    assert again[0].skipped and first.table.stat().st_mtime_ns == mtime
    assert not again[1].skipped and again[1].patches == first.patches
    assert tiny.calls == calls + 1  # only slide b was embedded (one batch)
    assert embed_slide(a, tiny, out, patch_size=64, level=1, format="csv", overwrite=True).skipped is False


def test_blank_slide_and_bad_options(tmp_path):
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((256, 256, 3), 250, np.uint8), tile=(64, 64), photometric="rgb")
    with pytest.raises(DataError, match="blank.tif: no 64×64 patch"):
        embed_slide(blank, Tiny(), tmp_path / "o", patch_size=64, progress=False)
    slide = _slide(tmp_path / "s.tif")
    with pytest.raises(ValueError, match="level 5 does not exist"): embed_slide(slide, Tiny(), tmp_path / "o", level=5)
    with pytest.raises(ValueError, match="no magnification recorded"):
        embed_slide(slide, Tiny(), tmp_path / "o", magnification=10)
    with pytest.raises(ValueError, match="patch_size"): embed_slide(slide, Tiny(), tmp_path / "o", patch_size=0)
    with pytest.raises(DataError, match="nowhere.svs"): embed_slide(tmp_path / "nowhere.svs", Tiny(), tmp_path / "o")


def test_staged_svs_at_a_magnification(real_data, tmp_path):
    slide = real_data / "wsi_svs" / "cmu-1-small-region.svs"  # one level, AppMag 20
    done = embed_slide(slide, Tiny(), tmp_path, patch_size=56, magnification=5, min_tissue=0.8, progress=False)
    t = _read(done.table)
    r = SlideReader(slide)
    assert len(t) == done.patches > 10 and set(t.level) == {0}
    assert (t.x % 224 == 0).all() and (t.y % 224 == 0).all()  # 56 px at 5× = 224 px at 20×
    mask = tissue_mask(r)
    (h, w), (mh, mw) = r.levels[0].shape, mask.shape
    centres = mask[((t.y + 112) * mh / h).astype(int), ((t.x + 112) * mw / w).astype(int)]
    assert centres.mean() > 0.95


def test_cli_embed_slide(tmp_path):
    from umedpt.blocks import BlocksConfig, SharedBlocks
    from umedpt.weights import save_pretrained
    weights = save_pretrained(SharedBlocks(BlocksConfig()).eval(), tmp_path / "w")
    slide = _slide(tmp_path / "s.tif")
    cmd = [sys.executable, "-m", "umedpt", "embed-slide", str(slide), "--weights", str(weights), "--out",
           str(tmp_path / "f"), "--patch-size", "64", "--level", "1", "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    table = next((tmp_path / "f").glob("s.*[tv]"))  # s.parquet or s.csv
    assert len(_read(table)) > 0 and (tmp_path / "f" / "s.png").is_file()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "skipped, already done" in r.stderr
