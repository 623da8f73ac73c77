"""A run survives what goes wrong while it trains: kills and resumes, signals, non-finite
losses, out of memory; the same seed gives the same run."""
import json
import logging
import math
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from spectraqlora.errors import NonFiniteLoss, OutOfMemory, UserError
from spectraqlora.store import checkpoint, rundir
from tests.helpers import SMOKE, train_run
from tests.helpers import smoke_config as config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted smoke run, in process."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, train_run(config(), run_dir)


@pytest.mark.slow
def test_same_seed_gives_the_same_selection_and_loss(reference, tmp_path):
    ref_dir, ref = reference
    again = train_run(config(), tmp_path)
    assert again["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    selected = json.loads((tmp_path / "selection.json").read_text())["modules"]
    assert selected == json.loads((ref_dir / "selection.json").read_text())["modules"]
    from spectraqlora.spectrum.scanner import scan_and_select

    files = checkpoint.safetensors_files(checkpoint.resolve(config().model))
    assert scan_and_select(files, config("seed=7"))[1] != selected  # the seed does matter


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path, caplog):
    _, ref = reference
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "spectraqlora.train", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while rundir.last_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    saved = {p.name for p in rundir.last_checkpoint(run_dir).iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= saved
    assert not any(name.startswith("model") for name in saved)  # never the 4-bit base

    with pytest.raises(UserError, match=r"already holds checkpoints \(checkpoint-\d+\): add trainer.resume=true"):
        train_run(config(), run_dir)

    with caplog.at_level(logging.INFO, logger="spectraqlora"):
        resumed = train_run(config("trainer.resume=true"), run_dir)  # the command it printed, in process
    assert "resuming from" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == resumed
    assert metrics["train_steps"] == 20
    assert metrics["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-4)
    assert not (run_dir / "checkpoints").exists()  # trainer.keep_checkpoints=false
    assert train_run(config("trainer.resume=true"), run_dir) == metrics  # finished: nothing to do


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_without_a_result(tmp_path):
    # inf, not a large finite rate: whether 1e9 overflows to NaN depends on the CPU's kernels (on an
    # AMX-BF16 EPYC the logits saturate to a uniform softmax instead, loss ln(vocab), and train on)
    cfg = config("trainer.learning_rate=inf", "trainer.max_grad_norm=0")
    with pytest.raises(NonFiniteLoss, match=r"training loss became nan at step \d+.*trainer.on_nonfinite_loss=skip"):
        train_run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


class Toy(torch.nn.Module):
    """Regression whose loss is poisoned (NaN) on the rows that say so."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, labels, poison):
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean() + poison.sum()}


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_nonfinite_loss_policy(tmp_path, policy):
    from transformers import TrainingArguments

    from spectraqlora.run.loop import Trainer

    rows = [{"x": [1.0, float(i)], "labels": float(i), "poison": math.nan if i == 3 else 0.0}
            for i in range(6)]
    trainer = Trainer(model=Toy(), train_dataset=rows, on_nonfinite_loss=policy,
                      args=TrainingArguments(output_dir=str(tmp_path), max_steps=6, report_to="none",
                                             per_device_train_batch_size=1, save_strategy="no",
                                             remove_unused_columns=False, learning_rate=0.01))
    before = trainer.model.w.weight.detach().clone()
    if policy == "error":
        with pytest.raises(NonFiniteLoss, match="loss became nan"):
            trainer.train()
        return
    trainer.train()
    assert trainer.skipped_steps == 1
    assert torch.isfinite(trainer.model.w.weight).all()
    assert not torch.equal(trainer.model.w.weight, before)


@pytest.mark.slow
def test_out_of_memory_names_the_configuration(tmp_path, monkeypatch):
    import transformers

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", oom)
    with pytest.raises(OutOfMemory, match=r"out of memory \(CUDA out of memory. Tried to allocate "
                       r"20.00 GiB\) with model=.*tiny-llama.*selection=random top_frac=0.25, "
                       r"lora.r=8, .*per_device_train_batch_size=8"):
        train_run(config(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_sigint_and_sigterm_stop_after_the_step_and_a_second_one_at_once():
    """In process, both signals; the run as a whole is checked with SIGTERM below."""
    import os

    from transformers import TrainerControl

    from spectraqlora.run.loop import StopOnSignal

    for sig in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(sig)
        with StopOnSignal() as stopper:
            os.kill(os.getpid(), sig)
            control = TrainerControl()
            stopper.on_step_end(None, None, control)
            assert stopper.signum == sig and control.should_save and control.should_training_stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
        assert signal.getsignal(sig) == before


@pytest.mark.slow
def test_a_signal_keeps_a_checkpoint_and_says_how_to_resume(tmp_path):
    sig = signal.SIGTERM  # what schedulers send (SIGINT: the same handler, tested above)
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "spectraqlora.train", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while rundir.last_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    stopped = re.fullmatch(rf"error: stopped by {sig.name} at step (\d+) of 20; kept (\S+); "
                           r"resume with: (.*)", line)
    assert stopped, line
    assert stopped[2] == str(rundir.last_checkpoint(run_dir)) == str(run_dir / "checkpoints" / f"checkpoint-{stopped[1]}")
    assert shlex.split(stopped[3]) == ["python", "-m", "spectraqlora.train", *args, "trainer.resume=true"]
    assert not (run_dir / "metrics.json").exists()
    assert line in (run_dir / "train.log").read_text()


def test_resuming_past_a_checkpoint_cut_while_saving_says_so(tmp_path, caplog):
    caplog.set_level("INFO")
    cut = tmp_path / "checkpoints" / "checkpoint-10"
    cut.mkdir(parents=True)
    (cut / "trainer_state.json").write_text('{"global_st')  # the run was killed mid-write
    assert rundir.resume_point(tmp_path, resume=True) is None
    assert "checkpoint-10 is incomplete (killed while saving): training starts over from step 0" in caplog.text
    whole = tmp_path / "checkpoints" / "checkpoint-5"
    whole.mkdir()
    (whole / "trainer_state.json").write_text("{}")
    caplog.clear()
    assert rundir.resume_point(tmp_path, resume=True) == whole
    assert "checkpoint-10 is incomplete (killed while saving): training continues from checkpoint-5" in caplog.text

