"""The confirmation stage (hydra.sweeper.confirm): once the search has ended, its top_k settings
and a baseline each run once per fresh seed. They are the trials of a study of their own
(`<study name>-confirm`, in the same storage), so a resumed sweep continues an unfinished
confirmation and workers share it; confirmation.yaml compares each setting with the baseline,
paired by seed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from spectraqlora.errors import UserError
from spectraqlora.store import rundir
from spectraqlora.sweep import repeats as rep

log = logging.getLogger(__name__)
CONFIRMATION = "confirmation.yaml"
DEFAULT_SEEDS = [101, 102, 103, 104, 105]  # config.ConfirmConfig's
SETTINGS = "settings"  # confirmation study user attr: what it runs, chosen once


@dataclass
class Confirmation:
    top_k: int
    seeds: list[int]
    baseline: dict
    key: str

    @classmethod
    def configured(cls, cfg, repeats: rep.Repeats | None, n_directions: int, key: str) -> Confirmation | None:
        if cfg is None or not cfg.get("top_k"):
            if cfg is not None and list(cfg.get("seeds") or []) != DEFAULT_SEEDS:
                raise UserError(f"hydra.sweeper.confirm.seeds={list(cfg.seeds)} without confirm.top_k: nothing "
                                f"is confirmed; add hydra.sweeper.confirm.top_k=3 (or drop the seeds)")
            return None
        seeds = list(cfg.seeds or [])
        if cfg.top_k < 0:
            raise UserError(f"hydra.sweeper.confirm.top_k={cfg.top_k}: expected the number of best settings to confirm")
        if n_directions > 1:
            raise UserError("hydra.sweeper.confirm: a multi-objective study has a Pareto front, not a best "
                            "setting to confirm; set hydra.sweeper.confirm.top_k=0")
        if len(seeds) < 2 or len(set(seeds)) != len(seeds):
            raise UserError(f"hydra.sweeper.confirm.seeds={seeds}: give at least two distinct seeds "
                            f"(a paired interval needs two)")
        if repeats and set(seeds) & set(repeats.seeds):
            raise UserError(f"hydra.sweeper.confirm.seeds={seeds} shares seeds with hydra.sweeper."
                            f"repeat_seeds={repeats.seeds}: confirmation needs fresh seeds")
        return cls(cfg.top_k, seeds, _dotted(OmegaConf.to_container(cfg.baseline or {})), key)

    def repeats(self) -> rep.Repeats:
        return rep.Repeats(self.seeds, self.key, across=False)

    def settings(self, study: optuna.Study, fixed: list[str]) -> list[dict]:
        """The search's top_k distinct settings, best first, then the baseline: each with its
        overrides (the sweep's fixed ones, then its own)."""
        chosen, seen = [], []
        for trial in rep.ranked(study):
            if trial.params not in seen and len(chosen) < self.top_k:
                seen.append(trial.params)
                chosen.append({"name": f"trial {trial.number}", "params": trial.params})
        if not chosen:
            raise UserError("hydra.sweeper.confirm: no search trial completed, nothing to confirm")
        chosen.append({"name": "baseline", "params": self.baseline})
        for setting in chosen:
            merged = dict(o.split("=", 1) for o in fixed) | {k: str(v) for k, v in setting["params"].items()}
            setting["overrides"] = [f"{k}={v}" for k, v in merged.items()]
        return chosen

    def results(self, study: optuna.Study) -> dict:
        """confirmation.yaml: each setting's mean and sem over the seeds, and its paired
        difference from the baseline's."""
        finished = {t.user_attrs[rep.CONFIRM]["name"]: t for t in
                    study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
        out = {"seeds": self.seeds, "direction": study.direction.name.lower(), "settings": [],
               "unfinished": [s["name"] for s in study.user_attrs[SETTINGS] if s["name"] not in finished]}
        base = finished.get("baseline")
        for setting in study.user_attrs[SETTINGS]:
            trial = finished.get(setting["name"])
            if trial is None:
                continue
            values = rep.per_seed(trial)
            entry = {"name": setting["name"], "params": setting["params"], "mean": trial.value,
                     "sem": rep.sem(values), "values": values, "run_dirs": trial.user_attrs[rep.RUN_DIRS]}
            if setting["name"] == "baseline":
                out["baseline"] = entry
            else:
                if base is not None:
                    entry["vs_baseline"] = rep.difference(values, rep.per_seed(base))
                out["settings"].append(entry)
        ranked = rep.ranked(study, [finished[s["name"]] for s in out["settings"]])
        if ranked:
            out["best"] = ranked[0].user_attrs[rep.CONFIRM]["name"]
        return out

    def write(self, study: optuna.Study, sweep_dir: Path) -> dict:
        results = self.results(study)
        rundir.write_text(sweep_dir / CONFIRMATION, OmegaConf.to_yaml(OmegaConf.create(results)))
        return results


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{selection: {top_frac: 0.25}} (as `+hydra.sweeper.confirm.baseline.selection.top_frac=0.25`
    builds it) -> {selection.top_frac: 0.25}, the overrides it stands for."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary(results: dict) -> str:
    """The log's last word on a confirmation: the confirmed best and its difference from the baseline."""
    best = next((s for s in results["settings"] if s["name"] == results.get("best")), None)
    if best is None:
        return "confirmation: no setting finished on every seed"
    line = (f"confirmed best: {best['name']} {best['params']}: {best['mean']:.6g} +/- "
            f"{best['sem']:.2g} (sem, {len(best['values'])} seeds)")
    diff = best.get("vs_baseline")
    if diff:
        ci = "n/a" if diff["ci95"] is None else f"[{diff['ci95'][0]:+.4g}, {diff['ci95'][1]:+.4g}]"
        line += f"; minus the baseline: {diff['mean']:+.4g}, 95% interval {ci} over {diff['n']} seeds"
    return line
