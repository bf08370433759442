"""A small multi-task training run used by tests/test_trainer.py.

    python tests/_train_script.py OUT --steps 24 [--stop 8] [--checkpoint-every 4] [--resume] [--sleep 0.1]
        [--dropout 0.2] [--augment] [--broken 3 [--on-bad-batch skip]]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_script.py OUT ...   (data-parallel)

Three tasks share stand-in blocks: a classification and a multi-label task on the embedding, and a second
classification task that also runs an extra shared layer no other task uses; one shared parameter is used by no
task. Rank 0 writes OUT/final.pt (the model state) at the end. `--broken i` makes sample i of task 'c' a corrupt file.
"""
from __future__ import annotations
import argparse, math, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from umedpt.core import seed_everything
from umedpt.distributed import cleanup_distributed, init_distributed, shard
from umedpt.sampler import TaskSampler, make_loader
from umedpt.shapes import ShapesDataset
from umedpt.trainer import Trainer


class Blocks(nn.Module):
    "Stand-in shared blocks with an extra layer only task 'c' uses and a parameter no task uses."
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.extra = nn.Linear(16, 16)
        self.never_used = nn.Parameter(torch.ones(4))
    def embed(self, x): return self.net(x).mean((2, 3))


class Task(nn.Module):
    "Classification (CE / ln C) or multi-label (BCE / ln 2) head; optionally through `blocks.extra`; optionally slow."
    def __init__(self, name: str, multilabel: bool = False, extra: bool = False, sleep: float = 0.0):
        super().__init__()
        self.name, self.head, self.multilabel, self.extra, self.sleep = name, nn.Linear(16, 3), multilabel, extra, sleep
    def compute_loss(self, batch, blocks):
        if self.sleep: time.sleep(self.sleep)
        z = blocks.embed(batch["image"])
        logits = self.head(blocks.extra(z) if self.extra else z)
        if self.multilabel: return F.binary_cross_entropy_with_logits(logits, batch["labels"]) / math.log(2)
        return F.cross_entropy(logits, batch["label"]) / math.log(3)


class Flipped(Dataset):
    "Random horizontal flips drawn from torch's global generator (so resuming must restore it)."
    def __init__(self, data): self.data = data
    def __len__(self): return len(self.data)
    def __getitem__(self, i):
        s = self.data[i]
        if torch.rand(()) < 0.5: s = {**s, "image": s["image"].flip(-1)}
        return s


class Broken(Dataset):
    "Sample `bad` is read from a corrupt PNG file (PIL raises an OSError naming the file); the others are `data`'s."
    def __init__(self, data, bad: int, folder: Path):
        self.data, self.bad, self.file = data, bad, folder / f"broken_{bad}.png"
        folder.mkdir(parents=True, exist_ok=True); self.file.write_bytes(b"not a png")
    def __len__(self): return len(self.data)
    def __getitem__(self, i):
        if i == self.bad:
            from PIL import Image
            Image.open(self.file)
        return self.data[i]


def parse(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=24, help="length of the run (cosine horizon)")
    ap.add_argument("--stop", type=int, default=None, help="stop after this many updates (default: --steps)")
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per task batch (to give a test time to kill)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--batch", type=int, default=8, help="global batch size per task")
    ap.add_argument("--broken", type=int, default=None, help="this sample of task 'c' is a corrupt file")
    ap.add_argument("--on-bad-batch", default="raise")
    return ap.parse_args(argv)


def main(argv: list[str]) -> Trainer:
    args = parse(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world = init_distributed()
    seed_everything(0)  # same initial weights in every process and every run
    blocks = Blocks(args.dropout)
    tasks = [Task("a", sleep=args.sleep), Task("b", multilabel=True, sleep=args.sleep),
             Task("c", extra=True, sleep=args.sleep)]
    data = {"a": ShapesDataset("classification", n=32, size=32, seed=1),
            "b": ShapesDataset("multilabel", n=24, size=32, seed=2),
            "c": ShapesDataset("classification", n=16, size=32, seed=3)}
    wrap = Flipped if args.augment else (lambda d: d)
    if args.broken is not None: data["c"] = Broken(data["c"], args.broken, args.out / "data")
    loaders = {k: make_loader(wrap(d), args.batch // world, **shard(rank, world)) for k, d in data.items()}
    trainer = Trainer(blocks, tasks, TaskSampler(loaders, seed=7), total_steps=args.steps, warmup_steps=2,
                      out_dir=args.out, checkpoint_every=args.checkpoint_every, progress=False, device="cpu",
                      on_bad_batch=args.on_bad_batch)
    trainer.fit(args.steps if args.stop is None else args.stop, resume=args.resume)
    if rank == 0: torch.save(trainer.model.state_dict(), args.out / "final.pt")
    cleanup_distributed()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
