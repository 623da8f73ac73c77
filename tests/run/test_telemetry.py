"""metrics.jsonl and W&B: the same keys, offline by itself, never failing or merging runs."""
import json
import logging
import math

import pytest

from spectraqlora.config import compose, to_train_config
from spectraqlora.run import telemetry
from tests.helpers import SECRETS, train_run

KEYS = ["train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity",
        "perf/tokens_per_sec", "perf/samples_per_sec", "perf/step_time_s", "perf/train_tokens",
        "mem/peak_rss_gb", "params/trainable", "params/trainable_frac", "selection/num_modules",
        "selection/top_frac", "lora/r"]
QUICK = ("model=tiny_llama", "trainer=smoke", "trainer.max_steps=4", "trainer.logging_steps=2",
         "trainer.eval_steps=0", "dataset.eval_size=32")


def test_metrics_jsonl_has_every_key_with_sane_values(smoke_run):
    run_dir, _ = smoke_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {k for row in rows for k in row}
    assert set(KEYS) <= seen
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]  # trainer=smoke logs every 5 steps
    assert all(r["perf/tokens_per_sec"] > 0 and r["perf/step_time_s"] > 0 for r in train_rows)
    assert all(r["mem/peak_rss_gb"] > 0.1 for r in rows if "mem/peak_rss_gb" in r)
    assert all(math.isfinite(r["eval/loss"]) for r in rows if "eval/loss" in r)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert train_rows[-1]["perf/train_tokens"] == metrics["train_tokens"] > 20 * 8  # > 1 token a row
    assert metrics["tokens_per_sec"] > 0 and metrics["peak_rss_gb"] > 0.1


def test_offline_smoke_run_holds_the_same_keys(smoke_run):
    run_dir, result = smoke_run
    (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw = record.read_bytes()
    for key in KEYS + ["selection", "snr_heatmap"]:
        assert key.encode() in raw, key
    assert (run_dir / "wandb_id").read_text() in record.name
    where = f"offline run in {record.parent}; upload later: wandb sync {record.parent}"
    assert f"W&B: {where}" in result.stdout  # the dir itself, not a placeholder
    assert f"  W&B          {where}" in result.stdout.split("run finished\n")[1]  # and in the run's summary


def test_secrets_in_the_environment_never_reach_run_files(smoke_run):
    run_dir, result = smoke_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files)  # the W&B files are among those checked
    for secret in SECRETS.values():
        assert secret not in result.stdout + result.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def test_progress_bars_stay_quiet_when_output_is_not_a_terminal(smoke_run):
    _, result = smoke_run
    assert "it/s]" not in result.stderr and "examples/s]" not in result.stderr


def test_without_an_api_key_wandb_goes_offline_and_says_so(monkeypatch, tmp_path, caplog):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with caplog.at_level(logging.INFO):
        assert telemetry.wandb_mode() == "offline"
    assert "no API key, logging offline" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert telemetry.wandb_mode() is None  # W&B's own default: online


@pytest.mark.slow
def test_two_runs_in_one_process_are_two_wandb_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = to_train_config(compose(*QUICK, "logger=wandb"))
    for name in ("a", "b"):
        train_run(cfg, tmp_path / name, telemetry.RunInfo(name=name, group="g", job_type="sweep-trial"))
    import wandb

    assert wandb.run is None  # finished, not left open for the next trial
    ids = {(tmp_path / n / "wandb_id").read_text() for n in ("a", "b")}
    assert len(ids) == 2
    for n in ("a", "b"):
        assert len(list((tmp_path / n).glob("wandb/offline-run-*/run-*.wandb"))) == 1


@pytest.mark.slow
def test_a_wandb_failure_does_not_fail_training(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with caplog.at_level(logging.WARNING):
        metrics = train_run(to_train_config(compose(*QUICK, "logger=wandb")), tmp_path)
    assert "W&B could not start" in caplog.text
    assert (tmp_path / "metrics.json").is_file() and math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "metrics.jsonl").is_file()


def test_a_library_warning_repeated_per_forward_is_shown_once(caplog):
    import logging

    from spectraqlora.run.telemetry import quiet_libraries

    quiet_libraries()
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(3):
        cast.warning("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization")
    cast.warning("another message")
    assert [r.getMessage()[:12] for r in caplog.records if r.name == cast.name] == ["MatMul8bitLt", "another mess"]


def test_a_runs_memory_peak_starts_with_the_run_not_with_the_process():
    """Jobs of a multirun share a process: each run's peak RSS starts over (VmHWM reset)."""
    import numpy as np

    from spectraqlora.run.metrics import memory, reset_peak_memory

    big = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    high = memory()["peak_rss_gb"]
    del big
    reset_peak_memory()
    assert memory()["peak_rss_gb"] < high - 0.3


def test_piped_progress_counts_evaluations_to_come_and_speaks_during_long_ones(monkeypatch, caplog):
    from types import SimpleNamespace

    from spectraqlora.run import loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    progress = loop.LogProgress()
    args = SimpleNamespace(eval_strategy="steps", eval_steps=10)
    state = SimpleNamespace(global_step=0, max_steps=30)
    with caplog.at_level("INFO", logger="spectraqlora.run.loop"):
        for step in range(1, 6):  # 5 steps of 2 s, no evaluation measured yet
            progress.on_step_begin(args, state, None)
            clock[0] += 2.0
            state.global_step = step
            progress.on_step_end(args, state, None)
        progress.on_log(args, state, None, logs={"loss": 1.0, "learning_rate": 1e-3})
        assert caplog.messages[-1].endswith("2.00 s/step  00:00:50 left (+ 3 evaluations)")  # at 10, 20, 30
        loader = [None] * 20
        for _ in loader:  # an evaluation of 20 batches, 1 s each
            clock[0] += 1.0
            progress.on_prediction_step(args, state, None, eval_dataloader=loader)
        progress.on_evaluate(args, state, None)
        said = [m for m in caplog.messages if m.startswith("evaluating")]
        assert said == ["evaluating: batch 6/20, 00:00:14 left", "evaluating: batch 12/20, 00:00:08 left",
                        "evaluating: batch 18/20, 00:00:02 left"]
        progress.on_log(args, state, None, logs={"loss": 1.0, "learning_rate": 1e-3})
        assert caplog.messages[-1].endswith("00:01:50 left (with 3 evaluations)")  # 50 s + 3 x 20 s
        state.global_step = 30
        assert loop.evaluations_left(args, state) == 0  # the one at step 30 is reused after training
        state.max_steps, state.global_step = 25, 20
        assert loop.evaluations_left(args, state) == 1  # none at a multiple of 10 left: the final one
