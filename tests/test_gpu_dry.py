"""The gpu profile, proven on the CPU: every chapter at profile gpu-dry end to end, and the gpu profile's early stop.

gpu-dry runs each chapter's gpu settings with a few explicit overrides (small images, a handful of samples and
steps) on the CPU: Swin-T, the parameter-free LayerNorm swap, bf16 autocast, the paper's losses. Without CUDA the
gpu profile must stop at a chapter's start with a ConfigError that names gpu-dry.

Every source notebook runs once (its first run), and the dense benchmark once per label type: the other runs of a
source differ only in their target task, which a dry run without real data replaces by the same synthetic stand-in.
"""
import importlib.util, os, subprocess, sys, time
from pathlib import Path
import nbformat
import papermill as pm
import pytest
import torch
from umedpt.benchmark import STAND_IN  # how a chapter labels the imagenet arm of a dry run

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_experiments", ROOT / "tools/run_experiments.py")
runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)
SWIN_T = "swin_tiny_patch4_window7_224"
MENTIONS = {  # run name -> what its outputs must mention besides the profile (where the gpu path has it)
    "training_performance": [SWIN_T, "bf16"],
    "pretraining": [SWIN_T, "bf16 autocast", "layernorm"],
    **{f"benchmark_{t}": [SWIN_T, STAND_IN] for t in runner.BENCHMARK_TASKS},
    **{f"dense_benchmark_{t}": [SWIN_T, STAND_IN] for t in runner.DENSE_TASKS},
    "volume_benchmark": [SWIN_T, STAND_IN],
}
DETECTION = "dense_benchmark_bccd_cells"  # the dense chapter's detection path (its first run is segmentation)


def dry_runs() -> list:
    "The first run of every source notebook, plus the dense chapter's detection run, in the listed order."
    first = {}
    for run in runner.RUNS: first.setdefault(run.source or run.name, run.name)
    names = set(first.values()) | {DETECTION}
    return [r for r in runner.RUNS if r.name in names]


def test_dry_selection_covers_every_source():
    sources = {r.source or r.name for r in runner.RUNS}
    chosen = dry_runs()
    assert {r.source or r.name for r in chosen} == sources and DETECTION in {r.name for r in chosen}
    assert len(chosen) == len(sources) + 1


def _env() -> dict:
    "The environment of a book build without real data: the chapters use their synthetic stand-ins."
    env = {k: v for k, v in os.environ.items() if k != "UMEDPT_DATA"}
    return {**env, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
            "MPLBACKEND": "Agg"}


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def _outputs(nb: nbformat.NotebookNode) -> str:
    "Everything a notebook printed or displayed as text."
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out: parts.append(out["text"])
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop of the gpu profile on a machine without CUDA")
def test_gpu_profile_stops_at_the_start_without_cuda(tmp_path):
    start = time.time()
    old = os.environ.copy(); os.environ.clear(); os.environ.update(_env())
    try:
        with pytest.raises(pm.PapermillExecutionError) as err:
            pm.execute_notebook(str(ROOT / "book/experiments/shapes_classifier.ipynb"), str(tmp_path / "out.ipynb"),
                                parameters={"profile": "gpu"}, cwd=str(tmp_path), kernel_name="python3",
                                progress_bar=False)
    finally: os.environ.clear(); os.environ.update(old)
    assert err.value.ename == "ConfigError" and "gpu-dry" in err.value.evalue and "CUDA" in err.value.evalue
    assert not (tmp_path / "_preview").exists()  # stopped before any work: not even its output folder
    assert time.time() - start < 120


def test_gpu_dry_runs_every_chapter_on_the_cpu():
    before = _git_status()
    start = time.time()
    runs = dry_runs()
    res = subprocess.run([sys.executable, "tools/run_experiments.py", "--profile", "gpu-dry", "--only",
                          *[r.name for r in runs]], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=1800)  # a guard against a hang, not a benchmark
    seconds = time.time() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    print(res.stdout); print(f"gpu-dry: {seconds:.0f} s")
    for run in runs:
        path = ROOT / "_preview/executed" / f"{run.name}.ipynb"
        assert path.is_file(), f"{run.name}: no executed copy"
        text = _outputs(nbformat.read(path, as_version=4))
        assert "gpu-dry" in text, f"{run.name}: does not report the gpu-dry profile"
        for needed in MENTIONS.get(run.name, []): assert needed in text, f"{run.name}: does not mention {needed!r}"
    assert _git_status() == before  # the dry run writes only git-ignored files (_preview/, book/cache, book/weights)
    # no wall-clock assertion: the time depends on the machine (about 4 minutes on the Intel CPU of earlier CI runs,
    # more than 15 on the slower AMD EPYC of 2026-12-07); the printed seconds are the measurement
