"""Selection strategies: from the snr.json table to the checkpoint module names that get adapters."""
from __future__ import annotations

import math
from collections import defaultdict

from spectraqlora.config import SelectionConfig, Strategy
from spectraqlora.errors import UserError


def restrict_types(table: dict[str, dict], module_types: list[str] | None) -> dict[str, dict]:
    """Only the rows of the candidate types; unknown types are an error that lists the known."""
    if module_types is None:
        return table
    known = sorted({row["type"] for row in table.values()})
    unknown = [t for t in module_types if t not in known]
    if unknown:
        raise UserError(
            f"selection.module_types: {', '.join(unknown)} matches no module of this model; "
            f"its types are: {', '.join(known)}"
        )
    return {name: row for name, row in table.items() if row["type"] in module_types}


def spectrum(table: dict[str, dict], top_frac: float) -> list[str]:
    """Per module type, the floor(count * top_frac) modules of highest SNR (ties: file order)."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for name, row in table.items():
        by_type[row["type"]].append(name)
    chosen = []
    for names in by_type.values():
        keep = math.floor(len(names) * top_frac + 1e-9)
        chosen += sorted(names, key=lambda n: -table[n]["snr"])[:keep]
    return chosen


def select(table: dict[str, dict], cfg: SelectionConfig) -> list[str]:
    """Module names chosen by the configured strategy, in checkpoint order."""
    rows = restrict_types(table, cfg.module_types)
    if cfg.strategy is Strategy.spectrum:
        chosen = set(spectrum(rows, cfg.top_frac))
    else:
        chosen = set(rows)
    if not rows:
        raise UserError("the checkpoint has no 2-D weights inside numbered layer blocks to adapt")
    if not chosen:
        counts = defaultdict(int)
        for row in rows.values():
            counts[row["type"]] += 1
        most = max(counts.values())
        raise UserError(
            f"selection.top_frac={cfg.top_frac} keeps no module: the most layers a type has "
            f"here is {most}, so use selection.top_frac>={1 / most:.4g}"
        )
    return [name for name in table if name in chosen]
