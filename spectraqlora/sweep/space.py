"""The search space: Hydra's sweep overrides as Optuna distributions, the trial's suggestions,
and the sampler, seeded per trial."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
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


SEARCH = "search"  # study user attr: what the study searches (search_record)


def search_record(fixed: list[str], space: dict, repeats) -> dict:
    """What a study searches, as its first sweep gave it: the fixed overrides, the space and the
    repeats (a trial's value means something else with other ones)."""
    from optuna.distributions import distribution_to_json

    return {"fixed": sorted(fixed), "space": {k: distribution_to_json(d) for k, d in sorted(space.items())},
            "repeats": None if repeats is None else {"seeds": repeats.seeds, "key": repeats.key}}


def record_difference(known: dict, record: dict) -> str:
    """How a command's search differs from the one a study records ('' when it does not)."""
    parts = []
    if known["fixed"] != record["fixed"]:
        gone = [o for o in known["fixed"] if o not in record["fixed"]]
        new = [o for o in record["fixed"] if o not in known["fixed"]]
        parts.append("overrides " + "; ".join(filter(None, [f"it has {' '.join(gone)}" if gone else "",
                                                             f"this command has {' '.join(new)}" if new else ""])))
    if known["space"] != record["space"]:
        keys = sorted(k for k in set(known["space"]) | set(record["space"])
                      if known["space"].get(k) != record["space"].get(k))
        parts.append(f"search space differs in {', '.join(keys)}")
    if known.get("repeats") != record["repeats"]:
        parts.append(f"repeats {known.get('repeats')} there, {record['repeats']} here")
    return ", ".join(parts)


def distribution(override: Override):
    """The Optuna distribution of a sweep override (choice, range, interval with tags log/int),
    or None for a plain value."""

    if not override.is_sweep_override():
        return None
    try:
        return _distribution(override)
    except ValueError as exc:  # optuna's, for a reversed interval or range
        raise UserError(f"{override.input_line}: {exc}") from None


def _distribution(override: Override):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

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


def is_training_app(task_function) -> bool:
    """Whether the sweep runs spectraqlora's own training entrypoint (whose schema can check it)."""
    import inspect

    spec = importlib.util.find_spec("spectraqlora.train")
    try:
        return spec is not None and Path(inspect.getsourcefile(task_function)).resolve() == Path(spec.origin).resolve()
    except TypeError:  # a builtin or a callable without source
        return False


def bounds(dist) -> list:
    """The values a distribution's extremes take: every choice, or the two ends."""
    from optuna.distributions import CategoricalDistribution

    return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]


def check_bounds(config_loader, config, fixed: list[str], space: dict) -> None:
    """Every bound of the search space composed as its job will be and checked by the training
    schema, before trial 0: a space that leaves a key's range (selection.top_frac=interval(2,3),
    lora.r=choice(0,-4)) is one line, not a failure per trial."""
    from omegaconf import open_dict

    from spectraqlora.cli import describe
    from spectraqlora.config import to_train_config

    for name, dist in space.items():
        for value in bounds(dist):
            override = f"{name}={value}"
            try:
                job = config_loader.load_sweep_config(config, [*fixed, override])
                with open_dict(job):
                    del job["hydra"]
                to_train_config(job)
            except UserError as exc:
                raise UserError(f"the search space of {name} reaches {override}: {exc}") from None
            except Exception as exc:  # Hydra's, composing it (a wrong type, a key the strategy lacks)
                raise UserError(f"the search space of {name} reaches {override}: {describe(exc, 'train')}") from None


def removed_sampler(name: str, seed=None):
    raise UserError(f"hydra/sweeper/sampler={name}: the '{name}' sampler was removed in Optuna 4.0 "
                    f"(MOTPESampler, deprecated since 2.9); TPESampler handles several objectives: use "
                    f"hydra/sweeper/sampler=tpe (or nsgaii)")


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
