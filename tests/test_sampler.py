"""TaskSampler integration tests: passes are permutations with and without worker processes, streams are the same
in every process, resuming is exact and cheap, balanced mode follows dataset sizes, ranks split batches exactly,
unreadable samples are skipped on request and a failing loader names its task."""
import io, json, logging, os, subprocess, sys
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from umedpt.core import ConfigError, DataError, collate_samples
from umedpt.sampler import SeededSampler, TaskSampler, make_loader


class Indexed(Dataset):
    "Tiny samples that carry their index; counts how many samples were loaded (in this process)."
    def __init__(self, n): self.n, self.loads = n, 0
    def __len__(self): return self.n
    def __getitem__(self, i):
        self.loads += 1
        return {"image": torch.full((1, 4, 4), i / self.n), "label": i % 3, "meta": {"index": i}}


def ids(sampler, k):
    return [(name, [m["index"] for m in batch["meta"]]) for name, batch in (next(sampler) for _ in range(k))]


def loaders(workers=0, **kw):
    return {"a": make_loader(Indexed(7), 3, num_workers=workers, **kw),
            "b": make_loader(Indexed(5), 2, num_workers=workers, **kw)}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_pass(workers, drop_last):
    stream = ids(TaskSampler(loaders(workers, drop_last=drop_last), seed=3), 40)
    for name, n, bs in (("a", 7, 3), ("b", 5, 2)):
        per_pass = n // bs * bs if drop_last else n
        seen = [i for t, b in stream if t == name for i in b]
        passes = [seen[p:p + per_pass] for p in range(0, len(seen) - per_pass + 1, per_pass)]
        assert len(passes) >= 3
        for p in passes:
            assert len(set(p)) == per_pass, p   # no repeat within a pass
        assert len({tuple(p) for p in passes}) > 1   # reshuffled between passes


def test_workers_do_not_change_the_stream():
    assert ids(TaskSampler(loaders(0), seed=3), 20) == ids(TaskSampler(loaders(2), seed=3), 20)


def test_same_seed_same_stream_in_another_process():
    code = ("import json; from tests.test_sampler import ids, loaders; from umedpt.sampler import TaskSampler;"
            "print(json.dumps(ids(TaskSampler(loaders(), seed=11, mode='balanced'), 15)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    here = ids(TaskSampler(loaders(), seed=11, mode="balanced"), 15)
    assert [tuple(x) for x in json.loads(out.stdout)] == [(n, b) for n, b in here]
    assert here != ids(TaskSampler(loaders(), seed=12, mode="balanced"), 15)


@pytest.mark.parametrize("mode,workers", [("cyclic", 0), ("balanced", 0), ("concat", 0), ("cyclic", 2)])
def test_resume_mid_pass_is_exact(mode, workers):
    full = ids(TaskSampler(loaders(workers), mode=mode, seed=5, shuffle_rounds=True), 25)
    first = TaskSampler(loaders(workers), mode=mode, seed=5, shuffle_rounds=True)
    head = ids(first, 11)
    buf = io.BytesIO(); torch.save(first.state_dict(), buf); buf.seek(0)
    state = torch.load(buf, weights_only=True)   # plain data: loads without unpickling code
    again = TaskSampler(loaders(workers), mode=mode, seed=5, shuffle_rounds=True)
    again.load_state_dict(state)
    assert head + ids(again, 14) == full


def test_resume_loads_no_skipped_samples():
    first = TaskSampler(loaders(), seed=1)
    ids(first, 9)
    fresh = loaders()
    again = TaskSampler(fresh, seed=1); again.load_state_dict(first.state_dict())
    name, batch = next(again)
    assert fresh[name].dataset.loads == len(batch["label"])   # fast-forward touched no data


def test_plain_dataloader_resumes_by_replaying():
    make = lambda: {"a": DataLoader(Indexed(6), batch_size=4, shuffle=True, collate_fn=collate_samples)}
    full = ids(TaskSampler(make(), seed=2), 7)
    first = TaskSampler(make(), seed=2); head = ids(first, 3)
    again = TaskSampler(make(), seed=2); again.load_state_dict(first.state_dict())
    assert head + ids(again, 4) == full


def test_balanced_follows_dataset_sizes():
    big, small = Indexed(90), Indexed(10)
    sampler = TaskSampler({"big": make_loader(big, 1), "small": make_loader(small, 1)}, mode="balanced", seed=0)
    names = [next(sampler)[0] for _ in range(1000)]
    share = names.count("big") / len(names)
    assert abs(share - 0.9) < 0.03, share   # binomial sd ≈ 0.0095
    assert sampler.round_size == 2


def test_ranks_split_every_batch_exactly():
    single = ids(TaskSampler({"a": make_loader(Indexed(12), 4)}, seed=9), 6)
    ranks = [ids(TaskSampler({"a": make_loader(Indexed(12), 2, num_replicas=2, rank=r)}, seed=9), 6) for r in (0, 1)]
    for (_, whole), (_, r0), (_, r1) in zip(single, *ranks):
        assert sorted(r0 + r1) == sorted(whole) and not set(r0) & set(r1)


def test_seeded_sampler_pads_like_distributed_sampler():
    shares = [list(SeededSampler(5, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3 and set(shares[0] + shares[1]) == set(range(5))


def test_bad_state_and_options():
    a = TaskSampler(loaders(), seed=1)
    with pytest.raises(ConfigError, match="this sampler has"):
        TaskSampler({"a": loaders()["a"]}, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="mode"): TaskSampler(loaders(), mode="random")
    with pytest.raises(ConfigError, match="'x'"): TaskSampler({"x": iter([1, 2])})
    with pytest.raises(ConfigError, match="batch_size"): make_loader(Indexed(3), batch_size=-1)


class Unreadable(Indexed):
    "Indexed samples, except that the samples in `bad` fail like a corrupt file (a DataError naming the file)."
    def __init__(self, n, bad): super().__init__(n); self.bad = set(bad)
    def __getitem__(self, i):
        if i in self.bad: raise DataError(f"cannot read image /data/broken/{i:03d}.png: truncated file")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_unreadable_replaces_a_bad_sample_by_the_next(workers, caplog):
    loader = make_loader(Unreadable(7, bad=[2, 6]), 3, shuffle=False, num_workers=workers, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger="umedpt.sampler"):
        got = [[m["index"] for m in b["meta"]] for b in loader]
    assert got == [[0, 1, 3], [3, 4, 5], [0]]   # 2 -> 3; 6 -> 0 (wraps around)
    if workers == 0:   # records of worker processes do not reach this process's handlers
        msgs = [r.getMessage() for r in caplog.records if r.name == "umedpt.sampler"]
        assert len(msgs) == 2 and "sample 2 " in msgs[0] and "broken/002.png" in msgs[0], msgs
    assert len(loader.dataset) == 7 and loader.dataset.bad == {2, 6}   # the wrapper forwards attributes


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_sample_raises_by_default_naming_the_file(workers):
    with pytest.raises(DataError, match="broken/002.png"):
        list(make_loader(Unreadable(7, bad=[2]), 3, shuffle=False, num_workers=workers))
    with pytest.raises(DataError, match="none of the 3 samples"):
        list(make_loader(Unreadable(3, bad=[0, 1, 2]), 3, skip_unreadable=True))


def test_failing_loader_names_its_task_and_resumes_past_the_failure():
    def make():
        return TaskSampler({"a": make_loader(Indexed(7), 3), "b": make_loader(Unreadable(5, bad=[1]), 2)}, seed=4)
    def draws(sampler, k):
        out = []
        while len(out) < k:
            try: out.append(ids(sampler, 1)[0])
            except DataError as e: out.append((e.task, "failed"))
        return out
    full = draws(make(), 12)
    assert ("b", "failed") in full and all(t == "b" for t, r in full if r == "failed")
    assert [t for t, r in full if r != "failed"] == ["a", "b"] * ((len(full) - full.count(("b", "failed"))) // 2)
    first = make(); head = draws(first, 5)
    resumed = make(); resumed.load_state_dict(first.state_dict())
    assert head + draws(resumed, 7) == full   # failed batches count as drawn, so a resume skips them too
