"""Publish the weights behind the published book (cpu profile, pretraining seed 0) into the package, as umedpt-lite0.

Run after `make book PROFILE=cpu` (the Makefile does): it reads book/weights/umedpt-cpu, the pretraining database
table (book/data/pretraining/database.csv) for the model card's licences, and the benchmark tables for its published
numbers; writes umedpt/pretrained/umedpt-lite0/ (fp16 safetensors, config.json, MODEL_CARD.md) replacing the previous
folder; and records the embedding of two fixed synthetic images (tests/data/umedpt_lite0_embedding.json), which
tests/test_weights.py checks `from_pretrained` reproduces from the shipped file.
"""
import argparse, json, sys
from pathlib import Path
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
NAME = "umedpt-lite0"
REFERENCE = ROOT / "tests/data/umedpt_lite0_embedding.json"  # what the shipped weights must reproduce


def reference_images() -> torch.Tensor:
    "Two fixed synthetic images (shapes, seed 0, 96 px): the input of the reference embedding."
    from umedpt.shapes import ShapesDataset
    ds = ShapesDataset("classification", n=2, size=96, seed=0)
    return torch.stack([ds[i]["image"] for i in range(2)])


def embed_reference(name_or_path) -> list[list[float]]:
    from umedpt.weights import from_pretrained
    blocks = from_pretrained(name_or_path, device="cpu")
    with torch.no_grad(): return blocks.embed(reference_images()).tolist()


def headline_numbers(bench: Path) -> dict:
    "Frozen macro-F1 and AUROC of the umedpt arm (seed-0 weights) at 1 % and 100 % on each benchmark task."
    numbers = {}
    for csv in sorted(bench.glob("*.csv")):
        df = pd.read_csv(csv)
        arm = "umedpt-s0" if "umedpt-s0" in set(df.arm) else "umedpt"
        for metric in ("macro_f1", "auroc"):
            for fraction in (0.01, 1.0):
                v = df[(df.arm == arm) & (df.setting == "frozen") & (df.metric == metric) & (df.fraction == fraction)]
                if len(v): numbers[f"{csv.stem}: frozen {metric} at {fraction:.0%} (mean over subsets)"] = \
                    round(float(v.value.mean()), 4)
    return numbers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(ROOT / "book/weights/umedpt-cpu"))
    ap.add_argument("--data", default=str(ROOT / "book/data"))
    args = ap.parse_args(argv)
    from umedpt.core import atomic_write
    from umedpt.weights import PRETRAINED_DIR, publish_weights
    src, data = Path(args.weights), Path(args.data)
    db = pd.read_csv(data / "pretraining/database.csv")
    database = dict(zip(db.task, db.source))
    card = ("## Evaluation\n\nThe book's benchmark chapters (data-scarcity protocol, frozen and fine-tuned) and its "
            "findings page report what these weights do against ImageNet, per target task and pretraining seed. The "
            "weights are reproducible: the pretraining chapter re-creates them bit for bit with seed 0 on the same CPU "
            "model and library build (another CPU model may round differently and give slightly different weights).\n")
    dest = publish_weights(src, NAME, database, dest=PRETRAINED_DIR / NAME,
                           results=headline_numbers(data / "benchmark"), extra_card=card)
    reference = {"images": "umedpt.shapes.ShapesDataset('classification', n=2, size=96, seed=0), both images",
                 "sha256": json.loads((dest / "config.json").read_text())["published"]["sha256"],
                 "embedding": embed_reference(NAME)}
    REFERENCE.parent.mkdir(exist_ok=True)
    with atomic_write(REFERENCE) as tmp: tmp.write_text(json.dumps(reference))
    size = (dest / "model.safetensors").stat().st_size
    print(f"published {NAME} -> {dest.relative_to(ROOT)} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__": sys.exit(main())
