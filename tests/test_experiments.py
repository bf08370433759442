"""Experiment runner (tools/run_experiments.py), the benchmark chapter on synthetic data, and the findings verdicts."""
import importlib.util, json, os, sys
from pathlib import Path
import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_experiments", ROOT / "tools/run_experiments.py")
runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)


def test_runs_order_and_selection():
    names = [r.name for r in runner.RUNS]
    first_benchmark = min(names.index(f"benchmark_{t}") for t in runner.BENCHMARK_TASKS)
    assert names.index("pretraining") < first_benchmark < names.index("findings")
    assert len({r.name for r in runner.RUNS}) == len(runner.RUNS)  # every run has its own executed copy
    picked = runner.select(["findings", "benchmark"])
    # listed order kept
    assert [r.name for r in picked] == [f"benchmark_{t}" for t in runner.BENCHMARK_TASKS] + ["findings"]
    assert [r.name for r in runner.select(["benchmark_breastmnist"])] == ["benchmark_breastmnist"]
    with pytest.raises(SystemExit, match="unknown chapter.*'nope'"): runner.select(["nope"])
    for r in runner.RUNS: assert r.notebook.parent == ROOT / "book/experiments"


def _toc_files(entries) -> list[str]:
    "Every `file` of a jupyter-book toc, sections included, in order."
    out = []
    for e in entries or []:
        if "file" in e: out.append(e["file"])
        out += _toc_files(e.get("sections")) + _toc_files(e.get("chapters"))
    return out


def test_every_run_is_a_page_of_the_book_and_every_experiment_page_a_run():
    import yaml
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [f for f in _toc_files(toc["parts"]) if f.startswith("book/executed/")]
    assert sorted(pages) == sorted(f"book/executed/{r.name}" for r in runner.RUNS)
    published = {p.stem for p in (ROOT / "book/executed").glob("*.ipynb")}
    assert {r.name for r in runner.RUNS} <= published, "a run has no published executed copy"


def _chapter_constant(chapter: str, name: str):
    "The literal value a chapter's source assigns to `name` (e.g. its list of ablations)."
    import ast
    nb = nbformat.read(ROOT / "book/experiments" / f"{chapter}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return ast.literal_eval(node.value)
    raise AssertionError(f"{chapter}: no assignment to {name}")


def test_every_ablation_of_the_chapter_runs_before_the_findings_read_it():
    chapter = _chapter_constant("ablations", "ABLATIONS")
    assert set(_chapter_constant("findings", "ABLATION_CLAIMS")) == set(chapter)
    assert tuple(runner.ABLATIONS) == tuple(chapter)
    names = [r.name for r in runner.RUNS]
    for ablation in runner.ABLATIONS:
        run = runner.RUNS[names.index(f"ablation_{ablation}")]
        assert run.source == "ablations" and run.parameters == {"ablation": ablation}
        assert names.index(run.name) < names.index("findings")


def test_ablation_chapter_rejects_an_unknown_ablation(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(ROOT / "book/experiments/ablations.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"profile": "smoke", "ablation": "dropout"}, cwd=str(tmp_path),
                            kernel_name="python3", progress_bar=False)
    assert err.value.ename == "ConfigError" and "ablation must be one of" in err.value.evalue
    assert "dropout" in err.value.evalue and not (tmp_path / "_preview").exists()


def test_parse_params_and_set_title(tmp_path):
    got = runner.parse_params(['arms={"imagenet": "/w.safetensors", "umedpt": null}', "task=breastmnist", "ft_steps=3"])
    assert got == {"arms": {"imagenet": "/w.safetensors", "umedpt": None}, "task": "breastmnist", "ft_steps": 3}
    with pytest.raises(SystemExit, match="NAME=VALUE"): runner.parse_params(["no-equals-sign"])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_markdown_cell("intro\n# Old title\ntext")])
    path = tmp_path / "n.ipynb"; nbformat.write(nb, path)
    runner.set_title(path, "New title")
    assert nbformat.read(path, as_version=4).cells[1].source == "intro\n# New title\ntext"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("no heading")]), path)
    with pytest.raises(SystemExit, match="no '# ' heading"): runner.set_title(path, "x")


def _run(name: str, cwd: Path, **parameters) -> nbformat.NotebookNode:
    env = {k: v for k, v in os.environ.items() if k != "UMEDPT_DATA"}  # synthetic stand-in, whatever the caller set
    old = os.environ.copy(); os.environ.clear(); os.environ.update(env)
    try:
        return pm.execute_notebook(str(ROOT / f"book/experiments/{name}.ipynb"), str(cwd / f"{name}.out.ipynb"),
                                   parameters=parameters, cwd=str(cwd), kernel_name="python3", progress_bar=False)
    finally: os.environ.clear(); os.environ.update(old)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from umedpt.blocks import SharedBlocks
    from umedpt.weights import save_pretrained
    torch.manual_seed(0)
    return save_pretrained(SharedBlocks(pretrained=True, norm="frozen"), tmp_path_factory.mktemp("w") / "umedpt-test")


def test_benchmark_runs_on_shapes_and_writes_the_table(tmp_path, weights):
    _run("benchmark", tmp_path, profile="smoke", task="breastmnist", arms=["imagenet", "umedpt"], weights=str(weights),
         fractions=[0.5, 1.0], seeds=[0, 1], ft_fractions=[0.5], ft_seeds=[0, 1], ft_epochs=1)
    out = tmp_path / "_preview/data/benchmark/synthetic"  # only the cpu profile writes book/data
    df = pd.read_csv(out / "breastmnist.csv")
    assert list(df.columns) == ["task", "arm", "setting", "fraction", "seed", "metric", "value"]
    # synthetic results never mix with real ones
    assert not (tmp_path / "_preview/data/benchmark/breastmnist.csv").exists()
    assert not (tmp_path / "book/data").exists()  # a smoke run never rewrites the published tables
    # frozen: (2 arms + the majority baseline) × 2 fractions × 2 seeds × 4 metrics; fine-tuned: 2 arms × 1 × 2 × 4
    assert len(df[df.setting == "frozen"]) == 48 and len(df[df.setting == "finetune"]) == 16
    assert set(df.metric) == {"macro_f1", "accuracy", "auroc", "balanced_accuracy"}
    assert df.value.between(0, 1).all() and set(df.arm) == {"majority", "imagenet", "umedpt"}
    meta = json.loads((out / "breastmnist.json").read_text())
    assert meta["real_data"] is False and meta["profile"] == "smoke" and set(meta["arms"]) == {"imagenet", "umedpt"}
    assert list((tmp_path / "book/cache/benchmark").rglob("*.safetensors"))  # frozen features were cached


def test_benchmark_without_weights_says_run_pretraining(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="Run the pretraining chapter first"):
        _run("benchmark", tmp_path, profile="smoke", weights=str(tmp_path / "missing"), fractions=[1.0], seeds=[0])


def _write(folder: Path, task: str, domain: str, means: dict, sd: float = 0.01, profile: str = "cpu",
           settings=("frozen",)):
    "A results table with 5 seeds per (arm, setting, fraction), macro-F1 drawn around `means[arm][fraction]`; its note."
    rng, rows = np.random.default_rng(len(task)), []
    for arm, per_fraction in means.items():
        for fraction, mean in per_fraction.items():
            for seed in range(5):
                rows += [dict(task=task, arm=arm, setting=setting, fraction=fraction, seed=seed, metric="macro_f1",
                              value=mean + sd * rng.standard_normal()) for setting in settings]
    pd.DataFrame(rows).to_csv(folder / f"{task}.csv", index=False)
    arms = {"umedpt": {"weights": "x", "encoder": "e", "norm": "frozen"}}
    (folder / f"{task}.json").write_text(json.dumps(dict(task=task, domain=domain, profile=profile,
                                                         settings={"size": 128}, arms=arms)))


def test_findings_verdicts_follow_the_data(tmp_path):
    folder = tmp_path / "book/data/benchmark"; folder.mkdir(parents=True)
    fr = (0.01, 0.1, 0.5, 1.0)
    # in-domain: UMedPT at 1 % already beats ImageNet's best -> confirmed
    _write(folder, "brain_tumor_mri", "in-domain", {"umedpt": dict(zip(fr, (0.90, 0.92, 0.93, 0.94))),
                                                   "imagenet": dict(zip(fr, (0.60, 0.70, 0.80, 0.85)))})
    # out-of-domain: UMedPT never reaches ImageNet's best and is worse at 1 % -> not confirmed
    _write(folder, "breastmnist", "out-of-domain", {"umedpt": dict(zip(fr, (0.50, 0.55, 0.60, 0.65))),
                                                   "imagenet": dict(zip(fr, (0.70, 0.75, 0.80, 0.85)))})
    # a leftover smoke run where UMedPT wins everything: shown, but not counted
    _write(folder, "kermany_pneumonia", "out-of-domain", {"umedpt": dict(zip(fr, (0.9, 0.9, 0.9, 0.9))),
                                                         "imagenet": dict(zip(fr, (0.1, 0.1, 0.1, 0.1)))},
           profile="smoke", settings=("frozen", "finetune"))
    _run("findings", tmp_path, profile="cpu")
    claims = pd.read_csv(tmp_path / "book/data/findings.csv").set_index("claim")
    row = lambda start: claims.loc[[c for c in claims.index if c.startswith(start)][0]]
    verdict = lambda start: row(start).verdict
    assert verdict("in-domain") == "confirmed"
    assert verdict("out-of-domain") == "not confirmed"
    evidence = row("out-of-domain").evidence
    assert "kermany_pneumonia" in evidence and "smoke run: not counted" in evidence
    assert verdict("frozen:") == "mixed"  # better on one task, worse on the other
    assert verdict("finetune:") == "not testable (smoke run)"  # only the smoke run fine-tuned: computed, not counted
    assert "p = " in row("finetune:").evidence
    assert verdict("memory").startswith("not testable")  # no performance tables in this folder


def test_findings_reports_a_contradicted_ablation_as_contradicted(tmp_path):
    folder = tmp_path / "book/data/ablations"; folder.mkdir(parents=True)
    test = dict(claim="C3", paper="LayerNorm", against="BatchNorm kept", measure="probe", advantage=-0.04, t=-5.0,
                p=1e-5, n=54, groups=2, groups_in_favour=0, verdict="contradicted", primary=True)
    (folder / "norm.json").write_text(json.dumps(dict(ablation="norm", verdict="contradicted", profile="cpu",
                                                      pretraining_seeds=[0, 1], tests=[test])))
    (folder / "size.json").write_text(json.dumps(dict(ablation="size", verdict="not confirmed at this scale",
                                                      profile="cpu", pretraining_seeds=[0, 1],
                                                      tests=[dict(test, verdict="not confirmed at this scale")])))
    executed = _run("findings", tmp_path, profile="cpu")
    claims = pd.read_csv(tmp_path / "book/data/findings.csv").set_index("claim")
    verdict = lambda start: claims.loc[[c for c in claims.index if c.startswith(start)][0]].verdict
    assert verdict("norm layers") == "contradicted" and verdict("image sizes") == "not confirmed"
    assert verdict("training scheme").startswith("not testable")  # no scheme note in this folder
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "0 of the 2 claims of the paper that could be tested here were confirmed, 1 was contradicted" in printed
