"""Execute the experiment chapters with papermill for one profile; the book renders these executed copies.

Order matters (pretraining writes the weights the benchmarks read), so the chapters are listed here, not globbed.
"""
import argparse, sys, time
from pathlib import Path
import papermill as pm

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["shapes_classifier", "loaders_benchmark"]
PROFILES = ("smoke", "cpu", "gpu")

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="smoke", choices=PROFILES)
    ap.add_argument("--only", nargs="*", default=None, help="run only these chapters")
    args = ap.parse_args()
    out_dir = ROOT / "book/executed"; out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only or CHAPTERS:
        if name not in CHAPTERS: sys.exit(f"unknown chapter {name!r}; known: {', '.join(CHAPTERS)}")
        start = time.time()
        print(f"[{args.profile}] {name} ...", flush=True)
        pm.execute_notebook(ROOT / f"book/experiments/{name}.ipynb", out_dir / f"{name}.ipynb",
                            parameters={"profile": args.profile}, cwd=str(ROOT), kernel_name="python3",
                            progress_bar=False, request_save_on_cell_execute=False)
        print(f"[{args.profile}] {name}: {time.time() - start:.0f} s", flush=True)
    return 0

if __name__ == "__main__": sys.exit(main())
