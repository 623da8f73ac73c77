"""The entrypoints' shell around Hydra: what Hydra refuses while composing (a mistyped key or
option, a value of the wrong type, an override it cannot parse) becomes one `error:` line with
the nearest valid key or option and exit 2, as the schema's own refusals are, instead of Hydra's
multi-line report and exit 1. HYDRA_FULL_ERROR=1 keeps Hydra's own traces."""
from __future__ import annotations

import difflib
import os
import signal
from typing import Callable

from spectraqlora.errors import Interrupted, UserError, exit_on_user_error


def run(hydra_main: Callable, config_name: str):
    """hydra_main(), its composition errors said in one line (config_name: whose keys they are)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return hydra_main()
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it would print: said below
    with exit_on_user_error():
        try:
            return hydra_main()
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(describe(exc, config_name)) from None
        except KeyboardInterrupt:  # a single run says this itself (Interrupted); here: a multirun's
            raise Interrupted(f"stopped by SIGINT: finished runs keep their dirs{_sweep_dir()}; an Optuna "
                              f"sweep's finished trials stay in its study, and the same command with that "
                              f"hydra.sweep.dir (or the same hydra.sweeper.storage) continues it",
                              signal.SIGINT) from None
        finally:
            if before is None:
                del os.environ["HYDRA_FULL_ERROR"]
            else:
                os.environ["HYDRA_FULL_ERROR"] = before


def _sweep_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return f" under {HydraConfig.get().sweep.dir}" if HydraConfig.initialized() else ""


def nearest(word: str, valid: list[str], aliases: dict[str, str] | None = None) -> str | None:
    """The valid word a typo most likely meant: a known alias (lr -> learning_rate), else the
    closest spelling."""
    if aliases and aliases.get(word) in valid:
        return aliases[word]
    return next(iter(difflib.get_close_matches(word, valid, n=1, cutoff=0.5)), None)


def describe(exc: Exception, config_name: str) -> str:
    """One line for a composition error: the key or option, what is valid, the nearest."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options is not None:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        near = nearest(option, exc.options)
        return (f"{group}={option}: no such option" + (f"; did you mean {group}={near}?" if near else "")
                + f" (the options of {group} are: {', '.join(exc.options)})")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        group, _, name = cause.full_key.rpartition(".")
        strategy_schema = getattr(cause, "object_type", None) if group == "selection" else None
        valid, aliases = keys_of(config_name, group, strategy_schema)
        if other := _read_by_another_strategy(cause, name, str(exc)):
            return other
        near = nearest(name, valid, aliases)
        return (f"unknown key {cause.full_key}" + (f": did you mean {'.'.join(filter(None, [group, near]))}?" if near else "")
                + (f" (the keys of {group or 'the top level'} are: {', '.join(valid)})" if valid else ""))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    return f"{first}: {detail}" if detail else first


def _read_by_another_strategy(cause, name: str, message: str) -> str | None:
    """A key of another selection strategy's schema, said as the schema's own refusals say it:
    `selection.layers=[0] is read by selection=layers only, not selection=spectrum: ...`."""
    import re

    from spectraqlora import config

    strategy = getattr(getattr(cause, "object_type", None), "strategy", None)
    if not isinstance(strategy, config.Strategy):
        return None
    typed = re.search(rf"\+{re.escape(cause.full_key)}=(.*)$", message, re.M)  # Hydra: "use +key=value"
    return config.read_by_another_strategy(name, strategy, typed[1] if typed else None)


def keys_of(config_name: str, group: str, schema=None) -> tuple[list[str], dict[str, str]]:
    """The keys valid under group in the command's schema (or in `schema`: the selection
    strategy's own), and the aliases users bring from other tools."""
    import dataclasses

    from spectraqlora import config

    if dataclasses.is_dataclass(schema):
        return [f.name for f in dataclasses.fields(schema)], config._ALIASES
    schema, aliases = {"export": (config.ExportConfig, config.RUN_DIR_ALIASES),
                       "evaluate": (config.EvaluateConfig, config.RUN_DIR_ALIASES)}.get(
        config_name, (config.TrainConfig, config._ALIASES))  # train and scan
    try:
        schema = config._schema_at(group, schema)
    except (KeyError, TypeError):
        return [], {}
    return [f.name for f in dataclasses.fields(schema)], aliases
