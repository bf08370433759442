"""The export check must catch a hand edit of umedpt/*.py and a notebook that is not clean."""
import json, shutil, subprocess, sys
from pathlib import Path

def _copy_project(root: Path, dest: Path) -> Path:
    for name in ("settings.ini", "setup.py"): shutil.copy(root / name, dest / name)
    for name in ("nbs", "umedpt", "tools"):
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest

def _check(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/check_sync.py"], cwd=project, capture_output=True, text=True)

def test_clean_tree_passes(repo_root, tmp_path):
    r = _check(_copy_project(repo_root, tmp_path))
    assert r.returncode == 0, r.stderr

def test_hand_edit_of_module_fails(repo_root, tmp_path):
    project = _copy_project(repo_root, tmp_path)
    with open(project / "umedpt/core.py", "a") as f: f.write("\n# a hand edit\n")
    r = _check(project)
    assert r.returncode == 1 and "umedpt/core.py differs" in r.stderr

def test_hand_written_module_fails(repo_root, tmp_path):
    project = _copy_project(repo_root, tmp_path)
    (project / "umedpt/extra.py").write_text("x = 1\n")
    r = _check(project)
    assert r.returncode == 1 and "umedpt/extra.py is not exported" in r.stderr

def test_unclean_notebook_fails(repo_root, tmp_path):
    project = _copy_project(repo_root, tmp_path)
    nb_path = project / "nbs/00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"][0]["execution_count"] = 7  # what an unclean, executed notebook carries
    nb["cells"][0]["metadata"]["collapsed"] = True
    nb_path.write_text(json.dumps(nb, indent=1))
    r = _check(project)
    assert r.returncode == 1 and "is not clean" in r.stderr
