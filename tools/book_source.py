"""Print the folder jupyter-book should build: the repository itself for the published book, or a staged copy in
which book/executed/ is replaced by the executed copies of another profile (_preview/executed/, git-ignored).

The staged source (_build/stage/) is made of symbolic links to the tracked files, so every page keeps its path
(book/executed/<chapter>) and every link between pages still resolves; nothing tracked is written.
"""
import argparse, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "_build/stage"
LINKED = ["_config.yml", "_toc.yml", "nbs", ".jupyter_cache"]  # top-level items the book build reads


def stage(executed: Path, stage_dir: Path = STAGE, root: Path = ROOT) -> Path:
    "A source folder like `root` whose book/executed/ is `executed`; returns it."
    executed = executed.resolve()
    if not executed.is_dir() or not any(executed.glob("*.ipynb")):
        raise SystemExit(f"{executed}: no executed chapters here; run tools/run_experiments.py for that profile first")
    if stage_dir.exists(): shutil.rmtree(stage_dir)
    (stage_dir / "book").mkdir(parents=True)
    (root / ".jupyter_cache").mkdir(exist_ok=True)
    for name in LINKED: (stage_dir / name).symlink_to(root / name)
    for item in (root / "book").iterdir():
        if item.name != "executed": (stage_dir / "book" / item.name).symlink_to(item)
    (stage_dir / "book/executed").symlink_to(executed)
    return stage_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executed", type=Path, default=None,
                    help="folder of executed chapters to show instead of book/executed (e.g. _preview/executed)")
    args = ap.parse_args(argv)
    executed = args.executed if args.executed is None or args.executed.is_absolute() else ROOT / args.executed
    print(ROOT if executed is None else stage(executed))
    return 0


if __name__ == "__main__": sys.exit(main())
