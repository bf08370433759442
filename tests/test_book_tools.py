"""tools/execute_components.py: component pages executed into myst-nb's cache are found there by their hash."""
import subprocess, sys
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # importable by name: the worker processes unpickle its functions
import execute_components as tool


def test_component_pages_are_the_nbs_in_the_toc():
    pages = tool.component_pages()
    assert pages and all(p.parent == ROOT / "nbs" and p.is_file() for p in pages)
    assert {p.name for p in pages} == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}  # every component is a page


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A page")]
                                  + [nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_executed_pages_match_in_the_cache_and_failures_are_reported(tmp_path):
    from jupyter_cache import get_cache
    ok = _notebook(tmp_path / "ok.ipynb", "print('hello from', __import__('os').getcwd())",
                   "import matplotlib.pyplot as plt\nplt.plot([1, 2]);", "6 * 7")
    bad = _notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('broken page')")
    failed = tool.execute_into_cache([ok, bad], tmp_path / "cache", workers=1)
    assert failed == [bad]
    cache = get_cache(str(tmp_path / "cache"))
    record = cache.match_cache_notebook(nbformat.read(ok, as_version=4))  # what myst-nb does before executing
    _, merged = cache.merge_match_into_notebook(nbformat.read(ok, as_version=4))
    outs = [c.outputs for c in merged.cells if c.cell_type == "code"]
    assert outs[0][0]["text"].strip() == f"hello from {tmp_path}"  # run in the page's own folder
    assert any("image/png" in o.get("data", {}) for o in outs[1])
    assert outs[2][0]["data"]["text/plain"] == "42"
    with pytest.raises(KeyError): cache.match_cache_notebook(nbformat.read(bad, as_version=4))
    # a second run finds the good page cached and executes only the failing one again
    assert tool.execute_into_cache([ok, bad], tmp_path / "cache", workers=1) == [bad]
    assert cache.match_cache_notebook(nbformat.read(ok, as_version=4)).pk == record.pk


def test_the_script_runs_several_pages_per_worker(tmp_path):
    # as a script, with one worker running every page: a page's IPython shell must not break the next one's dispatch
    pages = [_notebook(tmp_path / f"p{i}.ipynb", f"print({i} * 2)") for i in range(3)]
    r = subprocess.run([sys.executable, str(ROOT / "tools/execute_components.py"), "--workers", "1", "--cache",
                        str(tmp_path / "cache"), *map(str, pages)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "executed 3 page(s)" in r.stdout
    from jupyter_cache import get_cache
    cache = get_cache(str(tmp_path / "cache"))
    for i, page in enumerate(pages):
        _, merged = cache.merge_match_into_notebook(nbformat.read(page, as_version=4))
        assert merged.cells[1].outputs[0]["text"].strip() == str(i * 2)
