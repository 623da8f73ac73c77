"""Selection strategies: from the snr.json table to the checkpoint module names that get adapters,
and the optional SNR-driven rank allocation.

Each strategy is a small function of the table (rows with "type", "layer", "snr", "shape"),
found through STRATEGIES; its keys are its schema's (config.SELECTIONS). The fraction-based ones
(spectrum, spectrum_global, kappa_per_type, alpha, random) keep at least `min_per_type` modules of
every candidate type; kappa ranks as peft's KappaTuneSelector does.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from spectraqlora.config import AlphaOrder, SelectionConfig, Strategy
from spectraqlora.errors import UserError


@dataclass
class Selection:
    """What a run adapts: the candidate table (snr.json), the chosen checkpoint module names in
    checkpoint order, their ranks when lora.rank_allocation=snr, and the SNR heatmap's path."""

    table: dict[str, dict]
    chosen: list[str]
    ranks: dict[str, int] | None = None
    heatmap: Path | None = None

    def digest(self) -> str:
        """A short fingerprint of the chosen names: equal on every rank that trains the same modules."""
        return hashlib.sha256("\n".join(self.chosen).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """The chosen modules, a line per type: how many of the type's, their layers in order and
        their SNR range (every module with its SNR: selection.json)."""
        chosen = defaultdict(list)
        for name in self.chosen:
            chosen[self.table[name]["type"]].append(name)
        totals = Counter(row["type"] for row in self.table.values())
        width = max((len(t) for t in chosen), default=4)
        lines = []
        for kind in sorted(chosen):
            names = chosen[kind]
            layers = sorted(self.table[n]["layer"] for n in names if self.table[n].get("layer") is not None)
            where = f"layers {layer_ranges(layers)}" if len(layers) == len(names) else ", ".join(names)
            snrs = [self.table[n]["snr"] for n in names if self.table[n]["snr"] is not None]
            snr = f"  (snr {min(snrs):.3g}-{max(snrs):.3g})" if snrs else ""
            lines.append(f"  {kind:<{width}}  {len(names):>3} of {totals[kind]:<3} {where}{snr}")
        return "\n".join(lines)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def restrict_types(table: dict[str, dict], module_types: list[str] | None) -> dict[str, dict]:
    """Only the rows of the candidate types; an unknown type is an error listing the known."""
    if module_types is None:
        return table
    known = sorted({row["type"] for row in table.values()})
    unknown = [t for t in module_types if t not in known]
    if unknown:
        raise UserError(f"selection.module_types: {', '.join(unknown)} matches no module of "
                        f"this model; its types are: {', '.join(known)}")
    return {name: row for name, row in table.items() if row["type"] in module_types}


def by_type(table: dict[str, dict]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, row in table.items():
        groups[row["type"]].append(name)
    return groups


def keep_count(n: int, top_frac: float, min_per_type: int = 0) -> int:
    """Spectrum's floor(n x fraction), raised to min_per_type (never above n)."""
    return min(n, max(math.floor(n * top_frac + 1e-9), min_per_type))


def by_snr(table: dict[str, dict], names: list[str]) -> list[str]:
    """Highest SNR first; a stable sort, so ties keep checkpoint order."""
    return sorted(names, key=lambda n: -table[n]["snr"])


def spectrum(table: dict[str, dict], top_frac: float, min_per_type: int = 0) -> list[str]:
    """Per module type, the top floor(count x top_frac) modules by SNR."""
    return [name for names in by_type(table).values()
            for name in by_snr(table, names)[:keep_count(len(names), top_frac, min_per_type)]]


def spectrum_global(table: dict[str, dict], top_frac: float, min_per_type: int = 0) -> list[str]:
    """One ranking across every candidate; then the best of each type up to min_per_type."""
    chosen = by_snr(table, list(table))[:keep_count(len(table), top_frac)]
    return _at_least(table, chosen, min_per_type, lambda names: by_snr(table, names))


def by_kappa(table: dict[str, dict], names: list[str]) -> list[str]:
    """Lowest condition number first (KappaTune); a stable sort, so ties keep checkpoint order."""
    return sorted(names, key=lambda n: table[n]["kappa"])


def kappa(table: dict[str, dict], top_frac: float, num_modules: int | None = None) -> list[str]:
    """KappaTune as peft.helpers.KappaTuneSelector.get_best_targets ranks: one ranking across
    every candidate, the num_modules best, or max(1, int(count x top_frac))."""
    if num_modules is not None and num_modules > len(table):
        raise UserError(f"selection.num_modules={num_modules}, but the model has {len(table)} candidate "
                        f"modules: give at most {len(table)} (or top_frac)")
    k = num_modules if num_modules is not None else max(1, int(len(table) * top_frac))
    return by_kappa(table, list(table))[:k]


def kappa_per_type(table: dict[str, dict], top_frac: float, min_per_type: int = 0) -> list[str]:
    """Per module type, the floor(count x top_frac) lowest condition numbers (Spectrum's budget
    rule with KappaTune's score)."""
    return [name for names in by_type(table).values()
            for name in by_kappa(table, names)[:keep_count(len(names), top_frac, min_per_type)]]


def by_alpha(table: dict[str, dict], names: list[str], order: AlphaOrder) -> list[str]:
    """Highest alpha first (high_first) or lowest first; a module without a fit (too few nonzero
    eigenvalues) last; a stable sort, so ties keep checkpoint order."""
    sign = -1 if order is AlphaOrder.high_first else 1
    return sorted(names, key=lambda n: (table[n]["alpha"] is None, sign * (table[n]["alpha"] or 0)))


def alpha_per_type(table: dict[str, dict], top_frac: float, order: AlphaOrder,
                   min_per_type: int = 0) -> list[str]:
    """Per module type, the floor(count x top_frac) modules first by heavy-tail alpha (Spectrum's
    budget rule with WeightWatcher's exponent, as AlphaLoRA and OwLore allocate)."""
    return [name for names in by_type(table).values()
            for name in by_alpha(table, names, order)[:keep_count(len(names), top_frac, min_per_type)]]


def snr_cutoff(table: dict[str, dict], cutoff: float) -> list[str]:
    return [name for name, row in table.items() if row["snr"] >= cutoff]


def at_random(table: dict[str, dict], top_frac: float, seed: int, min_per_type: int = 0) -> list[str]:
    """The control: per type, as many modules as spectrum keeps, drawn at random (seeded)."""
    rng = random.Random(seed)
    return [name for names in by_type(table).values()
            for name in rng.sample(names, keep_count(len(names), top_frac, min_per_type))]


def check_layers(indices: list[int] | None, last_k: int | None, n: int) -> None:
    """selection.layers / last_k against a model of n layers (before the model loads, when its
    config names n; again against the scanned layers)."""
    if last_k is not None and last_k > n:
        raise UserError(f"selection.last_k={last_k} but the model has {n} layers")
    bad = [i for i in indices or [] if not -n <= i < n]
    if bad:
        raise UserError(f"selection.layers: {bad} out of range; this model has layers "
                        f"0..{n - 1} (or -{n}..-1 from the end)")


def layers(table: dict[str, dict], indices: list[int] | None, last_k: int | None,
           top_frac: float = 1.0) -> list[str]:
    """Every candidate of exactly the given layers (negative indices count from the end), of
    the last k, or, with neither, of the last floor(n x top_frac) layers (at least one): the
    same number of modules per type as spectrum keeps at that top_frac."""
    present = sorted({row["layer"] for row in table.values()})
    n = len(present)
    check_layers(indices, last_k, n)
    if indices is None:
        wanted = set(present[-(last_k or keep_count(n, top_frac, 1)):])
    else:
        wanted = {present[i] for i in indices}
    return [name for name, row in table.items() if row["layer"] in wanted]


def _at_least(table, chosen: list[str], min_per_type: int, order) -> list[str]:
    have = Counter(table[n]["type"] for n in chosen)
    extra = []
    for kind, names in by_type(table).items():
        missing = min(min_per_type, len(names)) - have[kind]
        if missing > 0:
            extra += [n for n in order(names) if n not in chosen][:missing]
    return chosen + extra


def from_layer(table: dict[str, dict], min_layer: int | None) -> dict[str, dict]:
    """The candidates of layer min_layer and above (all when None)."""
    if min_layer is None:
        return table
    present = sorted({row["layer"] for row in table.values()})
    if min_layer > present[-1]:
        raise UserError(f"selection.min_layer={min_layer} but the model's layers are "
                        f"{present[0]}..{present[-1]}")
    return {name: row for name, row in table.items() if row["layer"] >= min_layer}


# strategy -> (its function of the candidates, its schema and the run's seed; whether it needs
# the scan's singular values: SNR, kappa, alpha)
STRATEGIES = {
    Strategy.spectrum: (lambda t, c, seed: spectrum(t, c.top_frac, c.min_per_type), True),
    Strategy.spectrum_global: (lambda t, c, seed: spectrum_global(t, c.top_frac, c.min_per_type), True),
    Strategy.snr_cutoff: (lambda t, c, seed: snr_cutoff(t, c.snr_cutoff), True),
    Strategy.kappa: (lambda t, c, seed: kappa(t, c.top_frac, c.num_modules), True),
    Strategy.kappa_per_type: (lambda t, c, seed: kappa_per_type(t, c.top_frac, c.min_per_type), True),
    Strategy.alpha: (lambda t, c, seed: alpha_per_type(t, c.top_frac, c.alpha_order, c.min_per_type), True),
    Strategy.random: (lambda t, c, seed: at_random(t, c.top_frac, seed, c.min_per_type), False),
    Strategy.layers: (lambda t, c, seed: layers(t, c.layers, c.last_k, c.top_frac), False),
    Strategy.all: (lambda t, c, seed: list(t), False),
    Strategy.none: (lambda t, c, seed: [], False),
}
NEEDS_SNR = {strategy for strategy, (_, needs_snr) in STRATEGIES.items() if needs_snr}


def select(table: dict[str, dict], cfg: SelectionConfig, seed: int = 0) -> list[str]:
    """Module names chosen by the configured strategy (among the candidates from
    selection.min_layer up, where the strategy takes it), in checkpoint order."""
    full, table = table, from_layer(table, getattr(cfg, "min_layer", None))
    choose, _ = STRATEGIES[cfg.strategy]
    keep = set(choose(table, cfg, seed))
    if not keep and cfg.strategy is not Strategy.none:
        raise UserError(f"selection={cfg.strategy.value} keeps no module ({_why_empty(table, cfg)}); "
                        f"the types here are: {', '.join(sorted(by_type(table)))}")
    return [name for name in full if name in keep]


def _why_empty(table: dict[str, dict], cfg: SelectionConfig) -> str:
    if table and cfg.strategy is Strategy.snr_cutoff:
        best = max(row["snr"] for row in table.values())
        return f"no SNR reaches selection.snr_cutoff={cfg.snr_cutoff}; the highest is {best:.4g}"
    if not table or not hasattr(cfg, "top_frac"):
        return "no candidate module"
    most = max(len(names) for names in by_type(table).values())
    return (f"selection.top_frac={cfg.top_frac} with selection.min_per_type={cfg.min_per_type}; "
            f"the most layers a type has is {most}: use selection.top_frac>={1 / most:.4g} "
            f"or selection.min_per_type=1")


def selection_record(cfg: SelectionConfig, chosen: list[str], **extra) -> dict:
    """selection.json: the strategy, its keys and the chosen checkpoint module names."""
    keys = {k: v.value if isinstance(v, Enum) else v for k, v in asdict(cfg).items()}
    return {**keys, "modules": chosen, **extra}


def check_ranks_fit(table: dict[str, dict], chosen: list[str], r: int,
                    ranks: dict[str, int] | None = None) -> None:
    """A LoRA rank above the smaller side of its matrix adds parameters, not capacity: refused,
    naming the module and its shape."""
    for name in chosen:
        rank, shape = (ranks or {}).get(name, r), table[name]["shape"]
        if rank > min(shape):
            key = "lora.r_max (rank_allocation=snr gave it)" if ranks else "lora.r"
            fits = min(min(table[n]["shape"]) for n in chosen)
            raise UserError(f"{key}: rank {rank} is larger than the smaller dimension of {name} "
                            f"(shape {shape[0]}x{shape[1]}); use lora.r<={fits}"
                            + (f" and lora.r_max<={fits}" if ranks else ""))


def lora_params(shape: list[int], r: int) -> int:
    return r * (shape[0] + shape[1])


def snr_ranks(table: dict[str, dict], chosen: list[str], r: int, r_min: int, r_max: int) -> dict[str, int]:
    """Ranks that grow with SNR relative to the other chosen modules of the same type.

    Rule: weight_i = snr_i / mean SNR of the chosen modules of i's type (1 for a type's only
    module, or when they all score 0); rank_i = clamp(round(s x r x weight_i), r_min, r_max),
    with one scale s for all modules, searched so that the LoRA parameters match uniform rank r
    as closely as the clamps allow. Within a type all shapes are equal, so the average rank of a
    type stays near r.
    """
    weights = {}
    for names in by_type({n: table[n] for n in chosen}).values():
        mean = sum(table[n]["snr"] for n in names) / len(names)
        for n in names:
            weights[n] = table[n]["snr"] / mean if mean > 0 else 1.0
    target = sum(lora_params(table[n]["shape"], r) for n in chosen)

    def ranks_at(scale: float) -> dict[str, int]:
        return {n: min(r_max, max(r_min, round(scale * r * w))) for n, w in weights.items()}

    def params(ranks: dict[str, int]) -> int:
        return sum(lora_params(table[n]["shape"], k) for n, k in ranks.items())

    lo, hi = 1e-3, 1e3
    best = ranks_at(1.0)
    for _ in range(60):  # bisection on the scale; params grow monotonically with it
        mid = math.sqrt(lo * hi)
        ranks = ranks_at(mid)
        if abs(params(ranks) - target) < abs(params(best) - target):
            best = ranks
        lo, hi = (mid, hi) if params(ranks) < target else (lo, mid)
    return best
