"""Crash safety, resume, numerical faults, security and determinism (small models, smoke runs)."""
import json
import logging
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import compose, run_cli, train_run
from spectraqlora import checkpoint, modeling, rundir
from spectraqlora.config import to_train_config
from spectraqlora.errors import NonFiniteLoss, OutOfMemory, UserError

SMOKE = ("model=tiny_llama", "trainer=smoke", "selection=random", "trainer.save_steps=5", "dataset.eval_size=64")


def config(*overrides):
    return to_train_config(compose(*SMOKE, *overrides))


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
    from spectraqlora.scanner import scan_and_select

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

    from spectraqlora.training import Trainer

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


def test_pickle_adapters_are_refused_unless_allowed(tmp_path):
    from transformers import AutoModelForCausalLM

    path = checkpoint.resolve(config().model)
    cfg = config()
    net = modeling.add_lora(AutoModelForCausalLM.from_pretrained(path),
                            ["model.layers.0.self_attn.q_proj"], cfg.lora, cfg.model)
    net.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(UserError, match=r"pickle adapter \(adapter_model.bin\).*allow_pickle=true"):
        modeling.load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path)
    loaded = modeling.load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path, allow_pickle=True)
    assert "model.layers.0.self_attn.q_proj" in str(loaded.targeted_module_names)


def _tiny_llama_copy(tmp_path):
    src = checkpoint.resolve(config().model)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _without_weights(tmp_path):
    dst = _tiny_llama_copy(tmp_path)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    return [f"model.name_or_path={dst}"]


def _truncated(tmp_path):
    dst = _tiny_llama_copy(tmp_path)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [f"model.name_or_path={dst}"]


def _empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return ["dataset=file", f"dataset.path={tmp_path / 'empty.jsonl'}"]


def _no_column(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"question": "a", "response": "b"}\n' * 20)
    return ["dataset=file", f"dataset.path={tmp_path / 'rows.jsonl'}"]


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (_without_weights, "holds no *.safetensors weights"),
    (_truncated, "is truncated"),
    (_empty_file, "is empty"),
    (_no_column, "its columns are: question, response"),
    (lambda _: ["selection.strategy=spectrum", "selection.top_frac=0.1", "selection.min_per_type=0"],
     "selection=spectrum keeps no module"),
    (lambda _: ["selection.module_types=[mlp.foo]"], "mlp.foo matches no module of this model"),
    (lambda _: ["selection.strategy=layers", "selection.layers=[9]"], "[9] out of range; this model has layers 0..3"),
    (lambda _: ["trainer.per_device_train_batch_size=-1"], "trainer.per_device_train_batch_size=-1 is out of range"),
    (lambda _: ["trainer.max_steps=-5"], "trainer.max_steps=-5 is out of range"),
    (lambda _: ["lora.dropout=1.0"], "lora.dropout=1.0 is out of range: expected a probability in [0, 1)"),
    (lambda _: ["lora.alpha=0"], "lora.alpha=0 is out of range: expected a positive integer"),
    (lambda _: ["lora.r=100000"], "rank 100000 is larger than the smaller dimension of model.layers."),
    (lambda _: ["dataset.max_length=2"], "dataset.max_length=2 leaves no response token in any of"),
])
def test_bad_input_is_one_clear_error_and_no_result(tmp_path, make, message):
    with pytest.raises(UserError) as caught:
        train_run(config(*make(tmp_path)), tmp_path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "metrics.json").exists()


def test_quantization_without_a_working_bitsandbytes_is_refused_early(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a broken install
    with pytest.raises(UserError, match="quant=nf4 needs a working bitsandbytes.*use quant=none"):
        train_run(config(), tmp_path)


def test_layers_out_of_range_are_refused_before_the_scan(tmp_path):
    with pytest.raises(UserError, match=r"\[9\] out of range; this model has layers 0..3"):
        train_run(config("selection=layers", "selection.layers=[9]"), tmp_path)
    assert not (tmp_path / "snr.json").exists()  # the checkpoint's config.json told


def test_a_run_dir_in_use_is_refused_and_its_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spectraqlora import rundir; "
         "rundir.claim(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in ("false", "true"):
            with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on .*\): "
                                                r"wait for it to end, or choose another hydra.run.dir"):
                train_run(config(f"trainer.resume={resume}"), tmp_path)
        assert not rundir.discard_if_untrained(tmp_path)  # never removed under a live run
    finally:
        holder.kill()  # as a crash: the OS drops the lock, none goes stale
        holder.wait()
    rundir.claim(tmp_path)
    rundir.release(tmp_path)
    assert rundir.discard_if_untrained(tmp_path) and not tmp_path.exists()


def test_only_run_dirs_refused_before_training_are_discarded(tmp_path):
    untrained = tmp_path / "outputs" / "2026-11-29" / "12-00-00"
    (untrained / ".hydra").mkdir(parents=True)
    (untrained / "snr.json").write_text("{}")
    (tmp_path / "outputs" / "2026-11-29" / "12-30-00" / rundir.CHECKPOINTS).mkdir(parents=True)
    assert rundir.discard_if_untrained(untrained)
    assert not untrained.exists() and (tmp_path / "outputs" / "2026-11-29").is_dir()
    assert not rundir.discard_if_untrained(tmp_path / "outputs" / "2026-11-29" / "12-30-00")


@pytest.mark.slow
def test_a_refused_command_prints_one_line_and_leaves_no_run_dir(tmp_path):
    result = run_cli("train", "+lora.rank=16", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key lora.rank: did you mean lora.r? (the keys of lora are: r, alpha, "
        "dropout, bias, use_rslora, rank_allocation, r_min, r_max)"]
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/ left behind


def test_sigint_and_sigterm_stop_after_the_step_and_a_second_one_at_once():
    """In process, both signals; the run as a whole is checked with SIGTERM below."""
    import os

    from transformers import TrainerControl

    from spectraqlora.training import StopOnSignal

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


@pytest.mark.slow
def test_a_decoder_lm_as_a_classifier_trains_its_new_score_head_whole_and_unquantized(tmp_path):
    """model.task=classification with no model.head_modules: the new head (Llama: `score`) is
    kept out of 4-bit and trained whole, not left random and frozen."""
    from safetensors import safe_open

    metrics = train_run(config("model.task=classification", "trainer.max_steps=4", "trainer.eval_steps=0",
                               "trainer.save_steps=0"), tmp_path)
    assert 0 <= metrics["eval_accuracy"] <= 1
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(k.endswith("score.weight") for k in saved), saved  # the head is in the adapter
    assert modeling.heads(config("model.task=classification").model) == modeling.NEW_HEADS
    assert "score" in modeling.bnb_config(config().quant, config("model.task=classification").model).llm_int8_skip_modules


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
