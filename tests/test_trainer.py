"""Trainer integration tests: a training process killed with SIGKILL resumes to the same bits; a non-finite loss stops
training and leaves the last checkpoint intact; 2-process data-parallel training equals single-process training; a
batch that fails to load stops training (naming the file) or, with on_bad_batch="skip", is logged, counted and resumed
past."""
import logging, os, signal, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path
import pandas as pd
import pytest
import torch
from umedpt.core import ConfigError, TrainingError
from umedpt.sampler import TaskSampler
from umedpt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_train_script.py"
sys.path.insert(0, str(SCRIPT.parent))
import _train_script  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
       "MPLBACKEND": "Agg"}
ENV.pop("WORLD_SIZE", None)


@contextmanager
def torch_settings():
    "Run `_train_script.main` in this process and put back what it changes globally."
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try: yield
    finally: torch.set_num_threads(threads); torch.use_deterministic_algorithms(deterministic)


def run_inline(*argv: str):
    with torch_settings(): return _train_script.main([str(a) for a in argv])


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert list(a) == list(b)
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert (torch.equal(a[k], b[k]) if atol == 0 else diff <= atol), f"{k} differs by up to {diff:.3g}"


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def logged_step(path: Path) -> int:
    try: return int(pd.read_csv(path).step.max())
    except Exception: return 0


def test_sigkill_and_resume_gives_the_same_parameters(tmp_path):
    steps, args = 24, ["--steps", "24", "--checkpoint-every", "4", "--dropout", "0.2", "--augment"]
    reference = run_inline(tmp_path / "reference", *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), *args, "--sleep", "0.05"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            ckpt = killed / "checkpoint.pt"
            # kill between two checkpoints: one exists, and the run has logged updates after it
            if ckpt.exists() and logged_step(killed / "losses.csv") > checkpoint_step(ckpt): break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL); proc.wait(30)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == -signal.SIGKILL
    at_kill = checkpoint_step(killed / "checkpoint.pt")
    assert 4 <= at_kill < steps and at_kill % 4 == 0
    assert logged_step(killed / "losses.csv") > at_kill   # the killed run got further than its checkpoint
    assert not (killed / "final.pt").exists()

    res = subprocess.run([sys.executable, str(SCRIPT), str(killed), *args, "--resume"], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = torch.load(killed / "final.pt", weights_only=True)
    assert_same(resumed, reference.model.state_dict())   # bit for bit
    ref_log, log = pd.read_csv(tmp_path / "reference" / "losses.csv"), pd.read_csv(killed / "losses.csv")
    assert log[["step", "task", "loss", "lr"]].equals(ref_log[["step", "task", "loss", "lr"]])
    assert [p.name for p in killed.iterdir() if p.name.endswith(".tmp")] == []


def test_resume_checks_the_checkpoint(tmp_path):
    run_inline(tmp_path, "--steps", "2", "--checkpoint-every", "2")
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1])}
    other = Trainer(_train_script.Blocks(), [_train_script.Task("a"), _train_script.Task("x")],
                    TaskSampler({"a": [batch], "x": [batch]}), device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"is for tasks \['a', 'b', 'c'\]"):
        other.load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="broken.pt"): other.load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(ConfigError, match="does not exist"): other.fit(1, resume=tmp_path / "missing.pt")


def test_nan_loss_names_task_and_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    original = _train_script.Task.compute_loss
    calls = {"n": 0}

    def explode_on_b(self, batch, blocks):
        loss = original(self, batch, blocks)
        if self.name == "b":
            calls["n"] += 1
            if calls["n"] >= 7: return loss * float("nan")   # task b's 7th batch belongs to update 7
        return loss

    monkeypatch.setattr(_train_script.Task, "compute_loss", explode_on_b)
    with pytest.raises(TrainingError, match=r"task 'b' gave a non-finite loss \(nan\) at step 7"):
        run_inline(tmp_path / "bad", "--steps", "12", "--checkpoint-every", "4")
    ckpt = torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert logged_step(tmp_path / "bad" / "losses.csv") == 6   # the failed update was not logged
    monkeypatch.setattr(_train_script.Task, "compute_loss", original)
    good = run_inline(tmp_path / "good", "--steps", "12", "--stop", "4")   # the same run, stopped after 4 updates
    assert_same(ckpt["model"], good.model.state_dict())
    assert {int(v["step"]) for v in ckpt["optimizer"]["state"].values()} == {4}   # AdamW's own step counters


def test_two_processes_equal_one(tmp_path):
    args = ["--steps", "3", "--checkpoint-every", "0", "--batch", "8"]
    single = run_inline(tmp_path / "one", *args).model.state_dict()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), str(tmp_path / "two"), *args],
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    assert_same(two, single, atol=1e-5)
    init = run_inline(tmp_path / "init", *args[:2], "--stop", "0").model.state_dict()
    for k in ("tasks.a.head.weight", "tasks.b.head.weight", "tasks.c.head.weight", "blocks.extra.weight",
              "blocks.net.0.weight"):
        assert (two[k] - init[k]).abs().max() > 1e-4, f"{k} was not trained"   # so the equality above is not trivial
    assert torch.equal(two["blocks.never_used"], init["blocks.never_used"])   # no task uses it: no gradient, no update


def test_progress_bar_shows_running_losses(capsys):
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1]), "labels": torch.ones(2, 3)}
    tasks = [_train_script.Task("a"), _train_script.Task("b", multilabel=True)]
    trainer = Trainer(_train_script.Blocks(), tasks, TaskSampler({"a": [batch], "b": [batch]}), device="cpu",
                      progress=True)
    trainer.fit(3)
    err = capsys.readouterr().err
    assert "3/3" in err and "a=" in err and "b=" in err, err[-500:]
    assert trainer.item == 6 and len(trainer.losses.frame()) == 6   # logs kept in memory without out_dir


def test_bad_batch_raises_by_default_naming_the_file(tmp_path):
    with pytest.raises(OSError, match="broken_3.png"):
        run_inline(tmp_path, "--steps", "4", "--broken", "3")


def test_bad_batch_skip_logs_counts_and_resumes_to_the_same_bits(tmp_path, caplog):
    args = ["--steps", "8", "--checkpoint-every", "4", "--broken", "3", "--on-bad-batch", "skip", "--dropout", "0.2"]
    with caplog.at_level(logging.WARNING, logger="umedpt.trainer"): full = run_inline(tmp_path / "full", *args)
    warnings = [r.getMessage() for r in caplog.records if r.name == "umedpt.trainer"]
    assert full.step == 8 and full.skipped_batches >= 4 and len(warnings) == full.skipped_batches
    assert all("task 'c'" in w and "broken_3.png" in w for w in warnings), warnings
    log = pd.read_csv(tmp_path / "full" / "losses.csv")
    assert log.task.value_counts().to_dict() == {"a": 8, "b": 8, "c": 8}   # every round still has each task once
    run_inline(tmp_path / "split", *args, "--stop", "4")
    resumed = run_inline(tmp_path / "split", *args, "--resume")
    assert resumed.start_step == 4 and resumed.skipped_batches == full.skipped_batches
    assert_same(resumed.model.state_dict(), full.model.state_dict())
    with pytest.raises(ConfigError, match="on_bad_batch"):
        Trainer(_train_script.Blocks(), [_train_script.Task("a")], [], on_bad_batch="ignore", device="cpu")


def _losses_with(**options) -> list[float]:
    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0]), "labels": torch.ones(4, 3)}
    tasks = [_train_script.Task("a"), _train_script.Task("b", multilabel=True)]
    trainer = Trainer(_train_script.Blocks(), tasks, TaskSampler({"a": [batch], "b": [batch]}), device="cpu",
                      progress=False, **options)
    return trainer.fit(4).losses.frame().loss.tolist()


def test_precision_and_memory_format_options():
    fp32 = _losses_with(precision="fp32")
    assert _losses_with() == fp32  # "auto" is fp32 on the CPU
    bf16 = _losses_with(precision="bf16")  # bf16 autocast on the CPU: the gpu profile's code path, tried here
    assert bf16 != fp32 and all(abs(a - b) < 0.05 for a, b in zip(bf16, fp32)), (bf16, fp32)
    nchw = _losses_with(channels_last=False)  # the default is channels-last: same maths, another memory layout
    assert all(abs(a - b) < 1e-4 for a, b in zip(nchw, fp32)), (nchw, fp32)
    with pytest.raises(ConfigError, match="precision must be one of"): _losses_with(precision="fp16")
