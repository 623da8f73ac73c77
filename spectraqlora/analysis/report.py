"""`python -m spectraqlora.report <multirun or sweep dir>`: what every finished run under it
found, as one table (mean and std over seeds per swept setting), paired comparisons, and plots.

Reads each run's `.hydra/overrides.yaml`, `metrics.json` and `selection.json`; runs without
metrics.json (unfinished, failed, pruned) are counted and skipped. Writes report.md and
report_metric_vs_{params,memory,step_time}.png into the dir and prints the tables.
`--compare A:B` (repeatable) adds, for two settings run with the same seeds, the per-seed
difference A - B of eval loss and accuracy: its mean and 95% Student-t interval over the seeds.
Runs that evaluated at several steps (their metrics.jsonl) add the same comparison at every
evaluated step, and report_curves.png (curves.py). `experiment=strategy_study`, `llm_study` and
`llm_curve` run it at the end of their sweeps (ReportCallback, with their comparisons).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from spectraqlora.analysis import curves
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.store import rundir

log = logging.getLogger(__name__)

REPORT = "report.md"
IGNORED = {"seed", "hparams_search", "experiment"}  # not settings to group by
COLUMNS = [("eval_loss", "eval loss", "{:.4f}"), ("eval_accuracy", "accuracy", "{:.4f}"),
           ("eval_perplexity", "perplexity", "{:.2f}"), ("trainable_params", "trainable", "{:,.0f}"),
           ("step_time_s", "s/step", "{:.2f}"), ("tokens_per_sec", "tokens/s", "{:.0f}"),
           ("peak_mem_gb", "peak GB", "{:.3f}")]
COMPARED = [("eval_loss", "eval loss", "{:+.4f}"), ("eval_accuracy", "accuracy", "{:+.4f}")]


def collect(root: Path) -> tuple[list[dict], int]:
    """One row per finished run under root: its overrides (key -> value), metrics and selection
    strategy; and how many runs were skipped as unfinished."""
    rows, unfinished = [], 0
    for overrides_file in sorted(root.rglob(".hydra/overrides.yaml")):
        run = overrides_file.parent.parent
        if not (run / rundir.METRICS).is_file():
            unfinished += 1
            continue
        overrides = dict(o.lstrip("+~").split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [])
        selection = rundir.read_json(run / rundir.SELECTION)
        rows.append({"run": str(run.relative_to(root)), "overrides": overrides, "curve": curves.evaluations(run),
                     "strategy": selection["strategy"], **rundir.read_json(run / rundir.METRICS)})
    return rows, unfinished


def swept(rows: list[dict]) -> list[str]:
    """Override keys whose values differ between runs (seeds excluded): the settings compared."""
    keys = {k for row in rows for k in row["overrides"]} - IGNORED
    return sorted(k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1)


def summarize(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Rows grouped by the swept settings: n, and mean and std of each metric present."""
    keys = swept(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["overrides"].get(k, "") for k in keys), []).append(row)
    table = []
    for setting, members in groups.items():
        entry = {**dict(zip(keys, setting)), "strategy": members[0]["strategy"], "n": len(members)}
        if "selected_modules" in members[0]:
            entry["selected_modules"] = statistics.mean(m["selected_modules"] for m in members)
        for metric, _, _ in COLUMNS:
            values = [m[metric] for m in members if metric in m]
            if values:
                entry[metric] = statistics.mean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return keys, sorted(table, key=lambda e: (e["strategy"], e.get("trainable_params", 0)))


def setting_name(row: dict, keys: list[str]) -> str:
    """A run's setting as compare names it: its swept values joined by commas (arm=spectrum: spectrum)."""
    return ",".join(str(row["overrides"].get(k, "")) for k in keys)


def paired_interval(diffs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean of paired differences (one per seed) and the half-width of its Student-t
    interval; NaN for the half-width of a single difference."""
    from scipy import stats

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf((1 + confidence) / 2, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5


def _pair(rows: list[dict], keys: list[str], pair: str) -> tuple[str, str, dict, list]:
    """`A:B` -> A, B, {side: {seed: run}} and the seeds both ran. A setting that no run has, or no
    seed in common, is an error."""
    a, sep, b = pair.partition(":")
    names = sorted({setting_name(r, keys) for r in rows})
    if not sep or a not in names or b not in names:
        raise UserError(f"report compare {pair!r}: expected A:B with A and B among the settings "
                        f"here: {', '.join(names)}")
    by_seed = {side: {r["overrides"].get("seed"): r for r in rows if setting_name(r, keys) == side} for side in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]), key=str)
    if not seeds:
        raise UserError(f"report compare {pair}: no seed was run for both {a} and {b}")
    return a, b, by_seed, seeds


def _interval(diffs: list[float], confidence: float, **what) -> dict:
    mean, half = paired_interval(diffs, confidence)
    return {**what, "n": len(diffs), "mean": mean, "low": mean - half, "high": mean + half, "diffs": diffs}


def compare(rows: list[dict], keys: list[str], pair: str, confidence: float = 0.95) -> list[dict]:
    """`A:B`: per metric of COMPARED, the differences A - B between runs of the same seed (their
    final metrics), their mean and its Student-t interval."""
    a, b, by_seed, seeds = _pair(rows, keys, pair)
    out = []
    for metric, title, fmt in COMPARED:
        diffs = [by_seed[a][s][metric] - by_seed[b][s][metric] for s in seeds
                 if metric in by_seed[a][s] and metric in by_seed[b][s]]
        if diffs:
            out.append(_interval(diffs, confidence, a=a, b=b, metric=metric, title=title, fmt=fmt))
    return out


def compare_steps(rows: list[dict], keys: list[str], pair: str, confidence: float = 0.95) -> list[dict]:
    """compare at every step where both settings evaluated for a seed (the runs' curves): one
    result per metric and step, in step order."""
    a, b, by_seed, seeds = _pair(rows, keys, pair)
    out = []
    for metric, title, fmt in COMPARED:
        runs = [(by_seed[a][s]["curve"], by_seed[b][s]["curve"]) for s in seeds]
        for step in sorted({step for ca, _ in runs for step in ca}):
            diffs = [ca[step][metric] - cb[step][metric] for ca, cb in runs
                     if metric in ca.get(step, {}) and metric in cb.get(step, {})]
            if diffs:
                out.append(_interval(diffs, confidence, a=a, b=b, metric=metric, title=title, fmt=fmt, step=step))
    return out


def comparison_markdown(results: list[dict]) -> str:
    at_steps = any("step" in r for r in results)
    step = ["step"] if at_steps else []
    lines = ["| " + " | ".join(["A - B", "metric", *step, "seeds", "mean difference", "95% interval", "per seed"]) + " |",
             "|" + "---|" * (6 + len(step))]
    for r in results:
        interval = "n/a (one seed)" if r["n"] < 2 else \
            f"[{r['fmt'].format(r['low'])}, {r['fmt'].format(r['high'])}]"
        cells = [f"{r['a']} - {r['b']}", r["title"], *([str(r["step"])] if at_steps else []), str(r["n"]),
                 r["fmt"].format(r["mean"]), interval, " ".join(r["fmt"].format(d) for d in r["diffs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best(table: list[dict]) -> dict | None:
    """The setting of lowest mean eval loss."""
    return min((e for e in table if "eval_loss" in e), key=lambda e: e["eval_loss"], default=None)


def _setting(value: str) -> str:
    """A swept value as shown: numbers to 3 significant digits (top_frac 0.1667 -> 0.167)."""
    try:
        return f"{float(value):.3g}" if "." in value else value
    except ValueError:
        return value


def markdown(keys: list[str], table: list[dict]) -> str:
    metrics = [c for c in COLUMNS if any(c[0] in e for e in table)]
    head = [*keys, "strategy", "n", "modules", *(title for _, title, _ in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    winner = best(table)
    for e in table:
        cells = [_setting(str(e[k])) for k in keys] + [e["strategy"], str(e["n"]),
                                                       f"{e['selected_modules']:.0f}" if "selected_modules" in e else ""]
        for metric, _, fmt in metrics:
            if metric not in e:
                cells.append("")
            elif e["n"] > 1 and metric not in ("trainable_params",):
                cells.append(f"{fmt.format(e[metric])} ± {fmt.format(e[metric + '_std'])}")
            else:
                cells.append(fmt.format(e[metric]))
        if e is winner:  # bold: the lowest eval loss
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], keys: list[str], x: str, xlabel: str, path: Path) -> None:
    """Eval loss (log scale: it separates runs long after accuracy saturates) against x, one
    colour per strategy, each point labelled by its setting, with the std over seeds as error
    bars; points are not joined (settings are not a sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    metric = "eval_loss"
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        for strategy in sorted({e["strategy"] for e in table}):
            points = [e for e in table if e["strategy"] == strategy and metric in e and x in e]
            ax.errorbar([e[x] for e in points], [e[metric] for e in points], linestyle="none",
                        yerr=[e[f"{metric}_std"] for e in points], marker="o", capsize=3, label=strategy)
            for e in points:
                label = ",".join(_setting(str(e[k])) for k in keys) or strategy
                ax.annotate(label, (e[x], e[metric]), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set_yscale("log")
        ax.set_xscale("log" if x == "trainable_params" else "linear")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # plain numbers on log axes, not 9.3x10^0
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        if x == "trainable_params":  # labels at 1, 2 and 5 x 10^k only: the minor ones overlapped
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(which="minor", labelsize=7)
        ax.set(xlabel=xlabel, ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} vs {xlabel}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        curves.save(fig, path)


def write_report(root: Path, comparisons: list[str] = ()) -> str:
    """report.md and the plots in root; returns the tables."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (give a multirun or sweep dir)")
    rows, unfinished = collect(root)
    if not rows:
        raise UserError(f"{root} holds no finished run (no */metrics.json; {unfinished} unfinished)")
    keys, table = summarize(rows)
    text = markdown(keys, table)
    if comparisons:
        paired = comparison_markdown([r for pair in comparisons for r in compare(rows, keys, pair)])
        text += ("\n\nPaired by seed (same data order and initialisation): the difference A - B per "
                 "seed, its mean and 95% Student-t interval over the seeds.\n\n" + paired)
    images = []
    if curves.has_curves(rows):
        steps = [r for pair in comparisons for r in compare_steps(rows, keys, pair)]
        if steps:
            text += (f"\n\nThe same pairs at every evaluated step (each run's metrics.jsonl). {len(steps)} intervals: "
                     f"at 95% about one in twenty excludes 0 by chance alone, so a single one that does is no "
                     f"finding.\n\n" + comparison_markdown(steps))
        by_setting: dict[str, list[dict]] = {}
        for row in rows:
            by_setting.setdefault(setting_name(row, keys) or row["strategy"], []).append(row["curve"])
        curves.plot(by_setting, steps, root / curves.PLOT)
        images.append(("learning curves", curves.PLOT))
    plots = [(metric, label, name) for metric, label, name in [
        ("trainable_params", "trainable parameters", "params"), ("peak_mem_gb", "peak memory (GB)", "memory"),
        ("step_time_s", "step time (s)", "step_time")] if any(metric in e for e in table)]
    for metric, label, name in plots:
        plot(table, keys, metric, label, root / f"report_metric_vs_{name}.png")
        images.append((f"metric vs {label}", f"report_metric_vs_{name}.png"))
    rundir.write_text(root / REPORT, "\n".join([
        f"# Report: {root}", "",
        f"{len(rows)} finished runs ({unfinished} unfinished skipped); mean ± std over the runs "
        f"of each setting (seeds); bold: the lowest eval loss.", "", text, "",
        *(f"![{alt}]({name})" for alt, name in images), ""]))
    return (f"{len(rows)} finished runs, {unfinished} unfinished skipped; written: {root / REPORT}"
            + "".join(f", {name}" for _, name in images) + f"\n{text}")


class ReportCallback(Callback):
    """Hydra callback: the report of a multirun, written when it ends (`compare`: A:B pairs)."""

    def __init__(self, compare: list[str] = ()):
        self.compare = list(compare)

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            log.info("%s", write_report(Path(config.hydra.sweep.dir), self.compare))
        except UserError as exc:
            log.warning("no report: %s", exc)


class Pointer(Callback):
    """Hydra callback (conf/train.yaml): a multirun's last line says how many runs finished
    under its dir and how to table them."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        done = len(list(root.rglob(rundir.METRICS)))
        log.info("multirun ended: %d finished runs under %s; python -m spectraqlora.report %s tables them "
                 "(mean and std per setting; --compare A:B pairs two settings by seed)", done, root, root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spectraqlora.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun or sweep dir")
    parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                        help="paired by seed: the difference A - B of two settings (e.g. spectrum:random); repeatable")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        print(write_report(args.dir, args.compare))


if __name__ == "__main__":
    main(sys.argv[1:])
