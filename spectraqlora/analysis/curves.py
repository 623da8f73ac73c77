"""Learning curves: the evaluations each run logged along training (its metrics.jsonl), and their
plot: eval loss against step per setting with a band of one std over seeds, beside the paired
differences A - B against step with their 95% interval bands (report.compare_steps)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from spectraqlora.run.metrics import TRAINER_KEYS
from spectraqlora.run.telemetry import JSONL

LOGGED = {key: TRAINER_KEYS[key] for key in ("eval_loss", "eval_accuracy")}  # metrics.json key -> logged name
PLOT = "report_curves.png"


def evaluations(run: Path) -> dict[int, dict[str, float]]:
    """{step: {"eval_loss": x, "eval_accuracy": y}} at every step the run evaluated (0: before
    training); a step evaluated twice (a resumed run) keeps its last values."""
    path = Path(run) / JSONL
    out: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        found = {metric: entry[name] for metric, name in LOGGED.items() if name in entry}
        if found:
            out.setdefault(entry["step"], {}).update(found)
    return out


def has_curves(rows: list[dict]) -> bool:
    """Whether some run evaluated at more than one step."""
    return any(len(row["curve"]) > 1 for row in rows)


def _band(runs: list[dict], metric: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over the runs that evaluated there."""
    steps = sorted({step for run in runs for step, values in run.items() if metric in values})
    means, stds = [], []
    for step in steps:
        values = [run[step][metric] for run in runs if metric in run.get(step, {})]
        means.append(statistics.mean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return steps, means, stds


def plot(curves: dict[str, list[dict]], differences: list[dict], path: Path, metric: str = "eval_loss") -> None:
    """curves: setting -> its runs' evaluations; differences: compare_steps results for metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = metric.replace("_", " ")
    with plt.style.context("default"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
        for setting in sorted(curves):
            steps, means, stds = _band(curves[setting], metric)
            line, = left.plot(steps, means, marker="o", markersize=3, label=f"{setting} (n={len(curves[setting])})")
            left.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.15)
        left.set(xlabel="step", ylabel=label, title=f"{label} per setting (band: ± 1 std over seeds)")
        pairs = sorted({(d["a"], d["b"]) for d in differences if d["metric"] == metric})
        for a, b in pairs:
            points = sorted((d for d in differences if (d["a"], d["b"]) == (a, b) and d["metric"] == metric),
                            key=lambda d: d["step"])
            steps = [d["step"] for d in points]
            line, = right.plot(steps, [d["mean"] for d in points], marker="o", markersize=3,
                               label=f"{a} - {b} (n={points[-1]['n']})")
            if all(d["n"] > 1 for d in points):
                right.fill_between(steps, [d["low"] for d in points], [d["high"] for d in points],
                                   color=line.get_color(), alpha=0.15)
        right.axhline(0, color="black", linewidth=0.8)
        right.set(xlabel="step", ylabel=f"difference in {label}",
                  title="paired by seed: A - B (band: 95% interval)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        save(fig, path)


def save(fig, path: Path) -> None:
    """A figure written beside path and renamed into place: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
