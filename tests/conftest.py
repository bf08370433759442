"""Shared pytest fixtures: the repository root and the real-data root (tests skip with a reason when it is unset)."""
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

@pytest.fixture
def repo_root() -> Path:
    return ROOT

@pytest.fixture
def real_data() -> Path:
    "The folder named by UMEDPT_DATA; skips the test when it is unset (CI sets it)."
    value = os.environ.get("UMEDPT_DATA")
    if not value: pytest.skip("needs real data: set UMEDPT_DATA to the shared data folder (CI does)")
    root = Path(value)
    if not root.is_dir(): pytest.fail(f"UMEDPT_DATA={value} is not a directory")
    return root
