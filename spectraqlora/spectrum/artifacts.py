"""What a scan leaves for people and other tools: summary table, heatmap, spectrum.py and axolotl files."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from spectraqlora.spectrum.selection import by_type
from spectraqlora.store import rundir


def summary(table: dict[str, dict], chosen: list[str]) -> str:
    """Per type: count, min/median/max SNR, how many selected."""
    keep = set(chosen)
    width = max(len(t) for t in by_type(table))
    lines = [f"  {'type':<{width}}  {'count':>5} {'min':>9} {'median':>9} {'max':>9} {'selected':>8}"]
    for kind, names in by_type(table).items():
        snrs = [table[n]["snr"] for n in names if table[n]["snr"] is not None]
        stats = (f"{min(snrs):9.4f} {statistics.median(snrs):9.4f} {max(snrs):9.4f}" if snrs
                 else f"{'-':>9} {'-':>9} {'-':>9}")
        lines.append(f"  {kind:<{width}}  {len(names):5d} {stats} {sum(n in keep for n in names):8d}")
    return "\n".join(lines)


def slug(model_name: str) -> str:
    """`org-name` for a hub id; the last two folders for a local path."""
    return "-".join(Path(model_name).parts[-2:])


def spectrum_results(table: dict[str, dict]) -> dict:
    """spectrum.py's snr_results_<model>.json: {module: {"snr": x, "type": t}}."""
    return {name: {"snr": row["snr"], "type": row["type"]} for name, row in table.items()}


def unfrozen_parameters_yaml(table: dict[str, dict], chosen: list[str]) -> str:
    """axolotl's `unfrozen_parameters` list (regexes matched against parameter names), grouped
    by type as spectrum.py writes it, embeddings and head included as it does."""
    lines = ["unfrozen_parameters:", "- ^lm_head.weight$", "- ^model.embed_tokens.weight$"]
    keep = set(chosen)
    for kind, names in by_type(table).items():
        picked = [n for n in names if n in keep]
        if picked:
            lines.append(f"# {kind} layers")
            lines += [f"- {n}" for n in picked]
    return "\n".join(lines) + "\n"


def heatmap(table: dict[str, dict], chosen: list[str], path: Path, title: str) -> None:
    """Layers x module types. Colour = SNR over the highest SNR of its type (selection ranks
    within a type, and scales differ between types by orders of magnitude); cells show the SNR
    (mean over experts); selected cells are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    types = list(by_type(table))
    layers = sorted({row["layer"] for row in table.values()})
    cells, marked, keep = defaultdict(list), set(), set(chosen)
    for name, row in table.items():
        cell = (layers.index(row["layer"]), types.index(row["type"]))
        cells[cell].append(row["snr"])
        if name in keep:
            marked.add(cell)
    snr = np.full((len(layers), len(types)), np.nan)
    for (i, j), values in cells.items():
        snr[i, j] = float(np.mean(values))
    top = np.nanmax(snr, axis=0)
    relative = snr / np.where(top > 0, top, 1.0)
    with plt.style.context("default"):  # whatever style another library left set (optuna: ggplot)
        fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(types), 1.5 + 0.3 * len(layers)))
        image = ax.imshow(relative, aspect="auto", cmap="viridis", origin="lower", vmin=0, vmax=1)
        if len(layers) * len(types) <= 600:
            for (i, j), value in np.ndenumerate(snr):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if relative[i, j] < 0.6 else "black")
        for i, j in marked:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: SNR per module (red = selected)", fontsize=9)
        fig.colorbar(image, ax=ax, label="SNR / highest SNR of the type")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def write_snr(run_dir: Path, table: dict[str, dict], chosen: list[str], model_name: str) -> Path | None:
    """snr.json, and snr_heatmap.png when the table has SNRs (its path is returned)."""
    rundir.write_json(run_dir / rundir.SNR, table)
    if any(row["snr"] is None for row in table.values()):
        return None
    heatmap(table, chosen, run_dir / "snr_heatmap.png", model_name)
    return run_dir / "snr_heatmap.png"


def write_all(run_dir: Path, table: dict[str, dict], chosen: list[str], model_slug: str,
              top_frac: float) -> None:
    """write_snr's files and the spectrum.py / axolotl exports (named after model_slug)."""
    write_snr(run_dir, table, chosen, model_slug)
    rundir.write_json(run_dir / f"snr_results_{model_slug}.json", spectrum_results(table))
    pct = f"{top_frac * 100:g}"
    rundir.write_text(run_dir / f"unfrozen_parameters_{pct}percent.yaml",
                      unfrozen_parameters_yaml(table, chosen))
