"""Every number a run reports, and its names: measured here, named once.

A run's figures have plain names (`tokens_per_sec`, `peak_rss_gb`), as in metrics.json; the
logged stream (metrics.jsonl, W&B) puts each under its section (`perf/tokens_per_sec`,
`mem/peak_rss_gb`) with `logged`. The Trainer's own log names map through TRAINER_KEYS.
docs/runs.md, "Telemetry", lists them all.
"""
from __future__ import annotations

import math
import resource
import statistics
import sys
from pathlib import Path

# Trainer log keys -> logged keys
TRAINER_KEYS = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
                "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy",
                "eval_tokens_per_sec": "perf/eval_tokens_per_sec"}
SECTIONS = {"step_time_s": "perf", "tokens_per_sec": "perf", "samples_per_sec": "perf", "train_tokens": "perf",
            "peak_rss_gb": "mem", "peak_allocated_gb": "mem", "peak_reserved_gb": "mem",
            "eval_perplexity": "eval"}


def logged(values: dict) -> dict:
    """The values under their logged names (`perf/tokens_per_sec`, `eval/perplexity`)."""
    return {f"{SECTIONS[k]}/{k.removeprefix(SECTIONS[k] + '_')}": v for k, v in values.items()}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def throughput(step_times: list[float], tokens: int, samples_per_step: int) -> dict:
    """Over training steps only: the median step time, tokens (non-padding) and rows per second."""
    busy = sum(step_times)
    return {"step_time_s": statistics.median(step_times), "tokens_per_sec": tokens / busy,
            "samples_per_sec": len(step_times) * samples_per_step / busy}


def reset_peak_memory() -> None:
    """Start the memory peaks over, at the start of a run: a multirun on Hydra's basic launcher
    (and a sweep's local trials) runs its jobs one after another in one process, whose lifetime
    peak would otherwise carry over from job to job. Linux resets the resident-set peak (VmHWM)
    through /proc/self/clear_refs; elsewhere the peak stays the process's. torch is not imported
    for it (a run resets before its config is checked): without torch there is no CUDA peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_gb() -> float:
    """The resident-set peak since the last reset (VmHWM); the process's lifetime peak where
    /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory() -> dict:
    """peak_rss_gb everywhere; CUDA's peak allocated and reserved where there is a GPU (peaks
    since the run began: reset_peak_memory)."""
    import torch

    out = {"peak_rss_gb": _peak_rss_gb()}
    if torch.cuda.is_available():
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def resources() -> dict:
    """This run's memory figures, with `peak_mem_gb`: GPU memory allocated where there is a
    GPU, else the resident-set peak (what a sweep's memory objective compares)."""
    mem = memory()
    return {"peak_mem_gb": mem.get("peak_allocated_gb", mem["peak_rss_gb"]), **mem}


def final(after: dict, before: dict, **figures) -> dict:
    """metrics.json: the eval metrics after training, those before as `<key>_before`, and the
    run's figures (trainable_params, train_steps, tokens_per_sec, peak_mem_gb, ...)."""
    return {**after, **{f"{k}_before": v for k, v in before.items()}, **figures, **resources()}


def format_metrics(metrics: dict) -> str:
    """The eval metrics of a log line (loss=0.6504  accuracy=0.6000); timings are the summary's."""
    return "  ".join(f"{k.removeprefix('eval_')}={v:.4f}" for k, v in metrics.items() if not k.endswith("_per_sec"))


def format_summary(metrics: dict, run_dir: Path, adapter: Path, wall_s: float, wandb: str | None = None) -> str:
    """The block a finished run ends with: where it is, what it reached, what it cost."""
    evals = "   ".join(f"{key.removeprefix('eval_')} " + (f"{metrics[key + '_before']:.4f} -> " if key + "_before" in metrics else "")
                       + f"{metrics[key]:.4f}" for key in metrics
                       if key.startswith("eval_") and not key.endswith("_before") and key != "eval_tokens_per_sec")
    rows = {"run dir": run_dir, "eval": evals,
            "training": f"{metrics['train_steps']} steps in {metrics['train_runtime_s']:.1f} s"
                        + (f", {metrics['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in metrics else "")
                        + (f" (evaluation {metrics['eval_tokens_per_sec']:,.0f} tokens/s)"
                           if "eval_tokens_per_sec" in metrics else ""),
            "wall time": f"{wall_s:.1f} s", "peak memory": f"{metrics['peak_mem_gb']:.2f} GB",
            "adapter": adapter, **({"W&B": wandb} if wandb else {})}
    return "\n".join(f"  {name:<12} {value}" for name, value in rows.items())
