"""Fail when umedpt/ is not exactly what the notebooks export, or when a notebook is not nbdev-clean.

Works on a scratch copy, so it needs no git and never touches the working tree: a hand edit of umedpt/*.py
shows up as a difference here instead of being silently overwritten by `nbdev_export`.
"""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent

def py_files(lib: Path) -> set:
    return {p.relative_to(lib) for p in lib.rglob("*.py") if "__pycache__" not in p.parts}

def main() -> int:
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("settings.ini", "setup.py"): shutil.copy(root / name, tmp / name)
        shutil.copytree(root / "nbs", tmp / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        (tmp / "umedpt").mkdir()
        if (root / "umedpt/__init__.py").exists(): shutil.copy(root / "umedpt/__init__.py", tmp / "umedpt/__init__.py")
        subprocess.run([bin_dir / "nbdev_export"], cwd=tmp, check=True)
        lib, fresh = root / "umedpt", tmp / "umedpt"
        for rel in sorted(py_files(lib) | py_files(fresh)):
            if not (lib / rel).exists():
                problems.append(f"umedpt/{rel} is exported by the notebooks but missing: run nbdev_export")
            elif not (fresh / rel).exists():
                problems.append(f"umedpt/{rel} is not exported by any notebook (hand-written module?)")
            elif not filecmp.cmp(lib / rel, fresh / rel, shallow=False):
                problems.append(f"umedpt/{rel} differs from what nbs/ export: edit the notebook, never the module")
        before = {p: p.read_bytes() for p in (tmp / "nbs").rglob("*.ipynb")}
        subprocess.run([bin_dir / "nbdev_clean", "--fname", "nbs"], cwd=tmp, check=True)
        for p, old in before.items():
            if p.read_bytes() != old: problems.append(f"{p.relative_to(tmp)} is not clean: run nbdev_clean")
    if problems:
        print("check_sync failed:\n- " + "\n- ".join(problems), file=sys.stderr)
        return 1
    print("check_sync: umedpt/ matches the notebooks; notebooks are clean")
    return 0

if __name__ == "__main__": sys.exit(main())
