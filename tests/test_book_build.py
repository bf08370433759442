"""Building the book never dirties the tree: only the cpu profile writes the published chapters; other profiles go
to _preview/ and the book is built from a staged source that shows them."""
import importlib.util, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"tools/{name}.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module

runner, book_source = _load("run_experiments"), _load("book_source")


def test_only_the_published_profile_writes_book_executed():
    assert runner.executed_dir("cpu") == ROOT / "book/executed"
    for profile in ("smoke", "gpu", "gpu-dry"): assert runner.executed_dir(profile) == ROOT / "_preview/executed"
    assert "_preview/" in (ROOT / ".gitignore").read_text().split()


def test_staged_source_shows_the_preview_chapters(tmp_path):
    root = tmp_path / "repo"
    for rel in ("book/executed/a.ipynb", "book/intro.md", "nbs/00_core.ipynb", "_toc.yml", "_config.yml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True); (root / rel).write_text(rel)
    preview = tmp_path / "preview"; preview.mkdir()
    (preview / "a.ipynb").write_text("preview copy")
    stage = book_source.stage(preview, tmp_path / "stage", root)
    assert (stage / "book/executed/a.ipynb").read_text() == "preview copy"
    assert (stage / "book/intro.md").read_text() == "book/intro.md" and (stage / "nbs/00_core.ipynb").is_file()
    assert (root / "book/executed/a.ipynb").read_text() == "book/executed/a.ipynb"  # the tracked copy is untouched
    with pytest.raises(SystemExit, match="no executed chapters"):
        book_source.stage(tmp_path / "empty", tmp_path / "s2", root)


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_a_smoke_run_leaves_git_status_unchanged():
    if not (ROOT / ".git").exists(): pytest.skip("not a git checkout")
    before = _status()
    r = subprocess.run([sys.executable, "tools/run_experiments.py", "--profile", "smoke",
                        "--only", "shapes_classifier"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _status() == before, "a smoke run changed tracked or untracked files outside _preview/"
    assert (ROOT / "_preview/executed/shapes_classifier.ipynb").is_file()


def test_injected_parameters_are_collapsed(tmp_path):
    import nbformat
    cell = nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["injected-parameters"]})
    path = tmp_path / "n.ipynb"; nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    runner.hide_injected(path)
    assert nbformat.read(path, as_version=4).cells[0].metadata["tags"] == ["injected-parameters", "hide-input"]


def test_quickstart_page_runs():
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(ROOT / "book/quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the scores table


def test_executed_copies_show_no_machine_paths(tmp_path):
    import nbformat
    root, data = tmp_path / "repo", tmp_path / "shared/data"
    out = {"output_type": "stream", "name": "stdout",
           "text": f"data under {data}\nweights {root}/book/weights/umedpt-cpu\nrun in {root}\n"}
    cell = nbformat.v4.new_code_cell("print()", outputs=[nbformat.from_dict(out)])
    path = tmp_path / "n.ipynb"; nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    runner.relative_paths(path, root=root, data=str(data))
    text = nbformat.read(path, as_version=4).cells[0].outputs[0].text
    assert text == "data under $UMEDPT_DATA\nweights book/weights/umedpt-cpu\nrun in .\n"
    assert str(tmp_path) not in path.read_text()


def test_published_chapters_show_no_machine_paths():
    import os
    data = os.environ.get("UMEDPT_DATA")
    machine = [str(ROOT), "/work/main", "/work/shared"] + ([str(Path(data).resolve())] if data else [])
    for path in sorted((ROOT / "book/executed").glob("*.ipynb")):
        text = path.read_text()
        assert not [m for m in machine if m in text], f"{path.name} shows an absolute path of this machine"
        assert ".venv/" not in text, f"{path.name} shows a file of the virtualenv (an environment warning)"


def test_environment_warnings_are_dropped(tmp_path):
    import nbformat
    warn = {"output_type": "stream", "name": "stderr",
            "text": ".venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"}
    keep = {"output_type": "stream", "name": "stderr", "text": "UserWarning: a fixed box\n"}
    cell = nbformat.v4.new_code_cell("x", outputs=[nbformat.from_dict(warn), nbformat.from_dict(keep)])
    path = tmp_path / "n.ipynb"; nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    runner.drop_environment_warnings(path)
    assert [o.text for o in nbformat.read(path, as_version=4).cells[0].outputs] == [keep["text"]]
