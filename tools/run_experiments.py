"""Execute the experiment chapters with papermill for one profile; the book renders these executed copies.

Order matters (pretraining writes the weights the benchmarks read), so the runs are listed here, not globbed.
Only the cpu profile writes the published copies (book/executed/, tables in book/data/, both tracked); every other
profile writes to the git-ignored _preview/ (executed/ and data/), so building the book never dirties the tree.
One source notebook may run several times with different parameters (the benchmark, once per target task): each
run writes its own executed copy, book/executed/<run name>.ipynb, and may give it its own page title.
"""
import argparse, json, os, sys, time
from dataclasses import dataclass, field
from pathlib import Path
import nbformat
import papermill as pm

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "cpu", "gpu", "gpu-dry")  # gpu-dry: the gpu code path at toy sizes, on the CPU
PUBLISHED = "cpu"  # the profile whose executed chapters are the published book

def executed_dir(profile: str) -> Path:
    "Where the executed copies of `profile` go: book/executed for the published profile, else _preview/executed."
    return ROOT / ("book" if profile == PUBLISHED else "_preview") / "executed"

@dataclass(frozen=True)
class Run:
    "One papermill execution: book/experiments/<source>.ipynb -> book/executed/<name>.ipynb."
    name: str  # executed copy's file name (without .ipynb); what --only selects
    source: str = ""  # source notebook name; default: `name`
    parameters: dict = field(default_factory=dict)  # papermill parameters on top of `profile`
    title: str | None = None  # replaces the first '# ' heading of the executed copy (its page title)

    @property
    def notebook(self) -> Path: return ROOT / "book/experiments" / f"{self.source or self.name}.ipynb"

PRETRAINING_SEEDS = (0, 1, 2)  # the pretraining chapter runs once per seed; the benchmarks read every seed's weights
BENCHMARK_TASKS = {  # benchmark target task -> page title suffix
    "kermany_pneumonia": "pediatric pneumonia X-ray (in-domain, Pneumo-CXR)",
    "brain_tumor_mri": "brain tumour MRI (out-of-domain, CNS-MRI)",
    "breastmnist": "BreastMNIST ultrasound (out-of-domain)",
    "adrenalmnist3d": "AdrenalMNIST3D CT (out-of-domain)",
}
DENSE_TASKS = {  # dense benchmark target -> page title suffix
    "kvasir_polyps": "Kvasir-SEG polyp segmentation (out-of-domain, PolypSeg)",
    "bccd_cells": "BCCD blood-cell detection (in-domain)",
    "dsb2018_nuclei": "DSB2018 nucleus detection (in-domain, NucleiDet)",
}
ABLATIONS = {  # ablation chapter parameter -> page title suffix (the paper's claim it tests), in the chapter's order
    "norm": "norm layers in the shared blocks (C3)",
    "scheme": "training scheme (C4)",
    "labels": "label types (C6)",
    "size": "image sizes (C7)",
}
RUNS = [
    Run("shapes_classifier"),
    Run("loaders_benchmark"),
    Run("training_performance"),
    Run("recipe_study", title="Pretraining at CPU scale: what transfers"),  # fixes the cpu pretraining recipe
    Run("pretraining"),  # seed 0: the default weights (book/weights/umedpt-<profile>)
    *[Run(f"pretraining_seed{k}", "pretraining", {"seed": k}, f"Pretraining a CPU-scale UMedPT: seed {k}")
      for k in PRETRAINING_SEEDS[1:]],
    *[Run(f"benchmark_{task}", "benchmark", {"task": task}, f"Data-scarcity benchmark: {title}")
      for task, title in BENCHMARK_TASKS.items()],
    *[Run(f"dense_benchmark_{task}", "dense_benchmark", {"task": task}, f"Dense benchmark: {title}")
      for task, title in DENSE_TASKS.items()],
    Run("volume_benchmark", title="3D by slices: AdrenalMNIST3D at 64³ (out-of-domain)"),
    # the ablations pretrain their own variants from the recipe; the findings page reads their verdicts
    *[Run(f"ablation_{name}", "ablations", {"ablation": name}, f"Ablation: {title}")
      for name, title in ABLATIONS.items()],
    Run("findings"),
]

def select(names: list[str] | None, runs: list[Run] = RUNS) -> list[Run]:
    "The runs named (by run name, or by source name for all its runs), in the listed order."
    if not names: return list(runs)
    known = {r.name for r in runs} | {r.source for r in runs if r.source}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown chapter(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return [r for r in runs if r.name in names or (r.source and r.source in names)]

def set_title(path: Path, title: str) -> None:
    "Replace the first '# ' heading of a notebook's markdown cells by `title`."
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown": continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("# "):
                lines[i] = f"# {title}"; cell.source = "\n".join(lines); nbformat.write(nb, path); return
    raise SystemExit(f"{path}: no '# ' heading to replace with the title {title!r}")

def relative_paths(path: Path, root: Path = ROOT, data: str | None = None) -> None:
    "Write an executed copy's paths of this machine relative to the project (`.`) or the data root (`$UMEDPT_DATA`)."
    data = data if data is not None else os.environ.get("UMEDPT_DATA", "").strip()
    pairs = [(str(Path(data).resolve()), "$UMEDPT_DATA")] if data else []
    pairs += [(f"{root}/", ""), (str(root), ".")]  # warnings and tracebacks name files under the project too
    text = path.read_text()
    for machine, shown in pairs: text = text.replace(machine, shown)
    path.write_text(text)

# Warnings about the interpreter's installation, not about the chapter: they name files inside the virtualenv
ENVIRONMENT_WARNINGS = ("IProgress not found",)  # tqdm.auto without ipywidgets

def drop_environment_warnings(path: Path) -> None:
    "Remove stderr outputs of an executed copy that only carry an `ENVIRONMENT_WARNINGS` message (and its source)."
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        cell.outputs = [o for o in cell.outputs if not (o.get("name") == "stderr"
                                                        and any(w in o.get("text", "") for w in ENVIRONMENT_WARNINGS))]
    nbformat.write(nb, path)

def hide_injected(path: Path) -> None:
    "Collapse papermill's injected-parameters cell in the book (its values are shown in each chapter's settings)."
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags: cell.metadata["tags"] = [*tags, "hide-input"]
    nbformat.write(nb, path)

def parse_params(items: list[str]) -> dict:
    "NAME=VALUE pairs from the command line; VALUE is JSON when it parses (null, numbers, lists, dicts), else text."
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier(): raise SystemExit(f"--param {item!r}: expected NAME=VALUE")
        try: out[name] = json.loads(value)
        except json.JSONDecodeError: out[name] = value
    return out

def execute(run: Run, profile: str, out_dir: Path, extra: dict | None = None) -> Path:
    "Run one chapter with papermill (`extra` parameters only where it declares them); returns the executed copy."
    if not run.notebook.is_file():
        raise SystemExit(f"{run.name}: source notebook {run.notebook.relative_to(ROOT)} not found")
    declared = set(pm.inspect_notebook(str(run.notebook))) if extra else set()
    out = out_dir / f"{run.name}.ipynb"
    parameters = {"profile": profile, **{k: v for k, v in (extra or {}).items() if k in declared}, **run.parameters}
    pm.execute_notebook(run.notebook, out, parameters=parameters, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    if run.title: set_title(out, run.title)
    drop_environment_warnings(out)
    hide_injected(out)
    relative_paths(out)
    return out

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=PROFILES)
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these chapters (run names, or a source name for all its runs)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="extra papermill parameter for every selected chapter that declares NAME "
                         "(VALUE as JSON or text)")
    ap.add_argument("--list", action="store_true", help="print the runs in order and exit")
    args = ap.parse_args(argv)
    # the kernels inherit this: no warning about the installation (e.g. tqdm without ipywidgets) reaches the book
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", "")]
                                                       + [f"ignore:{w}" for w in ENVIRONMENT_WARNINGS]))
    runs, extra = select(args.only), parse_params(args.param)
    if args.list:
        for r in runs: print(f"{r.name:32s} {r.notebook.relative_to(ROOT)} {r.parameters or ''}")
        return 0
    out_dir = executed_dir(args.profile); out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{args.profile}] executed copies -> {out_dir.relative_to(ROOT)}", flush=True)
    for run in runs:
        start = time.time()
        print(f"[{args.profile}] {run.name} ...", flush=True)
        execute(run, args.profile, out_dir, extra)
        print(f"[{args.profile}] {run.name}: {time.time() - start:.0f} s", flush=True)
    return 0

if __name__ == "__main__": sys.exit(main())
