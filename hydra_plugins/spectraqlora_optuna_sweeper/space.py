"""The search space: Hydra's sweep overrides as Optuna distributions, the trial's suggestions,
and the sampler, seeded per trial."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from spectraqlora.errors import UserError

log = logging.getLogger(__name__)
_SAMPLER_PACKAGES = {"CmaEsSampler": ("cmaes", "cmaes")}  # optuna sampler -> (package, our extra)


def search_space(params: dict, arguments: list[str]) -> tuple[list[str], dict]:
    """Fixed overrides and {name: distribution}: `params` first, the command line wins."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    by_key = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(lines)}
    fixed, space = [], {}
    for key, override in by_key.items():
        dist = distribution(override)
        if dist is None:
            fixed.append(f"{key}={override.get_value_element_as_str()}")
        else:
            space[key] = dist
    return fixed, space


def distribution(override: Override):
    """The Optuna distribution of a sweep override (choice, range, interval with tags log/int),
    or None for a plain value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        # range(a, b, step) includes b when it is on the step grid, for ints and floats alike, as
        # hydra-optuna-sweeper reads it (Hydra's basic sweeper, like Python, stops before b)
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"{override.input_line}: not a search space Optuna can sample")


def removed_sampler(name: str, seed=None):
    raise UserError(f"hydra/sweeper/sampler={name}: MOTPESampler was removed from Optuna (deprecated "
                    f"since 2.9); TPESampler handles several objectives: use hydra/sweeper/sampler=tpe "
                    f"(or nsgaii)")


def trial_seed(seed: int, trial: int) -> int:
    """The sampler's seed before it asks trial `trial` of a study seeded `seed`: a hash, so that
    different seeds give unrelated sequences (seed + trial made seed 124's trials 0-6 those of
    seed 123's 1-7) and every trial, whichever worker asks it, has a stream of its own."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{trial}".encode()).digest()[:4], "little")


def grid_values(name: str, dist) -> list:
    """A grid sampler's values for one param: its choices, or every point of a stepped range."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if dist.step is None or dist.log:
        raise UserError(f"sampler=grid needs choice(...) or range(...) params; {name} is an interval")
    count = round((dist.high - dist.low) / dist.step) + 1
    return [dist.low + i * dist.step for i in range(count)]


def suggest(trial: optuna.Trial, name: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def make_sampler(sampler_cfg, space: dict, existing: int):
    """The configured sampler, seeded for the trial it is about to ask (trial_seed): a resumed
    study does not replay its parameters, and workers sharing a study never draw from the same
    random stream."""
    kwargs = {}
    seed = sampler_cfg.get("seed")
    if seed is not None:
        kwargs["seed"] = trial_seed(seed, existing)
    if sampler_cfg._target_.endswith("GridSampler") and not sampler_cfg.get("search_space"):
        kwargs["search_space"] = {k: grid_values(k, d) for k, d in space.items()}
    for cls, (package, extra) in _SAMPLER_PACKAGES.items():  # optuna imports them at the first ask
        if sampler_cfg._target_.endswith(cls) and importlib.util.find_spec(package) is None:
            raise UserError(f"hydra/sweeper/sampler: {cls} needs the {package} package: "
                            f"pip install \"spectraqlora[{extra}]\"")
    try:
        return instantiate(sampler_cfg, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, UserError):  # sampler=motpe
            raise exc.__cause__ from None
        raise UserError(f"hydra/sweeper/sampler: {str(exc).splitlines()[0]}") from None
