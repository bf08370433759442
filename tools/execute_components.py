"""Execute the component pages (the nbs/ notebooks in _toc.yml) into the book's execution cache, two at a time.

jupyter-book (myst-nb, `execute_notebooks: cache`) starts a fresh Jupyter kernel for every page it has not cached,
so each of the ~20 component pages pays the imports of torch, timm and MONAI and a kernel shutdown again: on two
cores that overhead was most of a fresh book build. Here the pages run the way `nbdev_test` runs them — in worker
processes that keep their imports, one torch thread each — and each executed copy is stored in `.jupyter_cache`
under the hash of its code cells, exactly where myst-nb looks before it executes anything. The book then renders
these outputs; a page edited afterwards no longer matches its hash and myst-nb executes it itself, as before.

Pages already in the cache are skipped. A page that raises stops the build with its traceback, as jupyter-book's
own execution would (`allow_errors: false`).
"""
import argparse, os, sys, time, traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def component_pages(toc: Path = ROOT / "_toc.yml") -> list[Path]:
    "The nbs/ notebooks that _toc.yml puts in the book, in its order."
    import yaml
    def files(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str): yield node["file"]
            for value in node.values(): yield from files(value)
        elif isinstance(node, list):
            for item in node: yield from files(item)
    pages = [ROOT / f"{f}.ipynb" for f in files(yaml.safe_load(toc.read_text())) if f.startswith("nbs/")]
    missing = [str(p.relative_to(ROOT)) for p in pages if not p.is_file()]
    if missing: raise SystemExit(f"_toc.yml lists component pages that do not exist: {', '.join(missing)}")
    return pages

def _execute(path: str):
    "Run one notebook in this worker (cwd: its folder); returns (path, seconds, outputs per cell or None, traceback)."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    os.chdir(Path(path).parent)
    nb = read_nb(path)
    start = time.time()
    try: CaptureShell(path).run_all(nb, exc_stop=True)
    except BaseException: return path, time.time() - start, None, traceback.format_exc()
    finally:
        import matplotlib.pyplot as plt
        plt.close("all")  # figures of one page must not leak into the next one this worker runs
    outputs = [(c.get("outputs", []), c.get("execution_count")) if c.cell_type == "code" else None for c in nb.cells]
    return path, time.time() - start, outputs, None

def execute_into_cache(pages: list[Path], cache_path: str | Path, workers: int = 2) -> list[Path]:
    "Execute the pages not yet in the cache at `cache_path` and store them there; returns the pages that failed."
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    cache = get_cache(str(cache_path))
    def cached(path: Path) -> bool:
        try: cache.match_cache_notebook(nbformat.read(path, as_version=4)); return True
        except KeyError: return False
    todo = [Path(p) for p in pages if not cached(Path(p))]
    print(f"component pages: {len(pages)}, already cached: {len(pages) - len(todo)}, to execute: {len(todo)}",
          flush=True)
    if not todo: return []
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when a worker imports it
    start, failed = time.time(), []
    # submitted by module name: a page's IPython shell replaces the worker's __main__, where a script's _execute lives
    from execute_components import _execute as run_page
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(run_page, str(p)) for p in todo]):
            path, seconds, outputs, error = future.result()
            if error:
                failed.append(Path(path))
                print(f"{path}: FAILED after {seconds:.0f} s\n{error}", file=sys.stderr, flush=True); continue
            nb = nbformat.read(path, as_version=4)  # the source as myst-nb reads it: same hash, executed outputs added
            for cell, out in zip(nb.cells, outputs):
                if out is not None: cell.outputs, cell.execution_count = [nbformat.from_dict(o) for o in out[0]], out[1]
            nbformat.validate(nb)
            bundle = CacheBundleIn(nb, str(Path(path).resolve()), data={"execution_seconds": seconds})
            cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
            print(f"{path}: {seconds:.0f} s", flush=True)
    print(f"executed {len(todo) - len(failed)} page(s) in {time.time() - start:.0f} s", flush=True)
    return failed

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(ROOT / ".jupyter_cache"),
                    help="myst-nb's execution cache (_config.yml: execute.cache)")
    ap.add_argument("--workers", type=int, default=2, help="notebooks executed at once (one torch thread each)")
    ap.add_argument("pages", nargs="*", type=Path,
                    help="notebooks to execute (default: the component pages of _toc.yml)")
    args = ap.parse_args(argv)
    failed = execute_into_cache(args.pages or component_pages(), args.cache, args.workers)
    if failed:
        names = (str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in failed)
        print(f"failed: {', '.join(names)}", file=sys.stderr)
    return 1 if failed else 0

if __name__ == "__main__": sys.exit(main())
