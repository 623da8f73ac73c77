"""Selection strategies: from the snr.json table to the checkpoint module names that get adapters."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from spectraqlora.config import SelectionConfig, Strategy
from spectraqlora.errors import UserError


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
    if cfg.strategy is Strategy.spectrum:
        chosen = set(spectrum(table, cfg.top_frac))
    else:
        chosen = set(table)
    if not chosen:
        most = max(Counter(row["type"] for row in table.values()).values())
        raise UserError(
            f"selection.top_frac={cfg.top_frac} keeps no module: the most layers a type has "
            f"here is {most}, so use selection.top_frac>={1 / most:.4g}"
        )
    return [name for name in table if name in chosen]
