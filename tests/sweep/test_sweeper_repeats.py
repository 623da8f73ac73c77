"""Repeated trials over shared seeds, pruning across them, the best with its uncertainty and the
confirmation stage, on a trivial objective with noise drawn from the seed (tests/apps/noisy.py):
every figure is checked against the app's own function."""
import csv
import statistics
import subprocess
import sys

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats

from spectraqlora.errors import UserError
from spectraqlora.sweep import repeats as rep
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "apps"))
from noisy import objective  # noqa: E402

APP = ROOT / "tests" / "apps" / "noisy.py"


def sweep(tmp_path, *overrides):
    return subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           f"marker_dir={tmp_path}", *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def study(tmp_path, name="noisy"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")


def results(tmp_path, name="optimization_results.yaml"):
    return yaml.safe_load((tmp_path / "sweep" / name).read_text())


def by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The paired difference a - b: mean and 95% Student-t interval, from scipy directly."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, sem = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    half = stats.t.ppf(0.975, len(diffs) - 1) * sem
    return mean, mean - half, mean + half


@pytest.mark.slow
def test_every_trial_runs_each_shared_seed_and_the_best_comes_with_its_uncertainty(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=grid", "x=range(1,4)", "hydra.sweeper.n_trials=4", "hydra.sweeper.repeats=3")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study(tmp_path).trials
    assert sorted(t.params["x"] for t in trials) == [1, 2, 3, 4]
    for t in trials:
        values = [objective(t.params["x"], s) for s in (1, 2, 3)]
        assert t.user_attrs["repeat_seeds"] == [1, 2, 3]
        assert t.user_attrs["repeat_values"] == [[v] for v in values]
        assert t.value == pytest.approx(statistics.mean(values), abs=1e-12)
        for seed in (1, 2, 3):  # its own run dir per repeat, under the trial's, with the seed
            job = yaml.safe_load((tmp_path / "sweep" / str(t.number) / f"seed_{seed}" / ".hydra" / "config.yaml").read_text())
            assert (job["seed"], job["x"]) == (seed, t.params["x"])
    found = results(tmp_path)
    best = [objective(3, s) for s in (1, 2, 3)]
    second_x = min((2, 4), key=lambda x: statistics.mean(objective(x, s) for s in (1, 2, 3)))
    second = [objective(second_x, s) for s in (1, 2, 3)]
    assert found["best_params"] == {"x": 3} and found["best_value"] == pytest.approx(statistics.mean(best))
    assert found["best_value_sem"] == pytest.approx(statistics.stdev(best) / 3 ** 0.5)
    assert found["runner_up"]["params"] == {"x": second_x}
    assert found["runner_up"]["value_sem"] == pytest.approx(statistics.stdev(second) / 3 ** 0.5)
    mean, low, high = by_hand(best, second)
    assert found["best_vs_runner_up"] == {"mean": pytest.approx(mean), "ci95": [pytest.approx(low), pytest.approx(high)], "n": 3}
    assert found["distinguishable"] is True and high < 0
    with open(tmp_path / "sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["user_attrs_repeat_seeds"] == "[1, 2, 3]" for r in rows)
    assert (tmp_path / "sweep" / "repeats.png").is_file()


@pytest.mark.slow
def test_a_best_within_the_noise_of_its_runner_up_is_said_so(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=grid", "x=choice(2.9,3.1)", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.repeats=3")
    assert result.returncode == 0, result.stderr[-3000:]
    found = results(tmp_path)
    a, b = ([objective(x, s) for s in (1, 2, 3)] for x in (2.9, 3.1))
    if statistics.mean(b) < statistics.mean(a):
        a, b = b, a
    mean, low, high = by_hand(a, b)
    assert low < 0 < high  # the app's noise makes these two indistinguishable over 3 seeds
    assert found["best_vs_runner_up"]["ci95"] == [pytest.approx(low), pytest.approx(high)]
    assert found["distinguishable"] is False
    note = ("the best and the runner-up differ by less than their noise with 3 repeats: raise "
            "hydra.sweeper.repeats or the eval set")
    assert found["note"] == note and note in result.stdout


@pytest.mark.slow
def test_the_wilcoxon_pruner_stops_a_worse_trial_before_its_last_repeat(tmp_path):
    """x=3 is the best; the sampler's seed puts it before another setting, which is pruned after
    2 of its 3 repeats (both worse than x=3's on the same seeds)."""
    result = sweep(tmp_path, "hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=1", "x=choice(0,3,5)",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.repeats=3", "hydra/sweeper/pruner=wilcoxon",
                   "hydra.sweeper.pruner.p_threshold=0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study(tmp_path).trials
    best = next(t for t in trials if t.params["x"] == 3)
    assert best.state.name == "COMPLETE"
    later = [t for t in trials if t.number > best.number]
    assert later  # the seed's order: x=3 is not last
    for worse in later:
        x = worse.params["x"]
        assert worse.state.name == "PRUNED"
        assert worse.user_attrs["repeat_values"] == [[objective(x, 1)], [objective(x, 2)]]  # seed 3 never ran
        assert worse.intermediate_values == {0: objective(x, 1), 1: objective(x, 2)}
        assert not (tmp_path / "sweep" / str(worse.number) / "seed_3").exists()
        assert f"trial {worse.number} pruned after 2 of 3 repeats" in result.stdout


@pytest.mark.slow
def test_a_killed_repeat_is_run_again_not_averaged_out(tmp_path):
    args = ["hydra.sweeper.params=null", "x=3", "hydra.sweeper.n_trials=1", "hydra.sweeper.repeats=3", "die_once=2"]
    killed = sweep(tmp_path, *args)
    assert killed.returncode != 0  # the sweep died with its repeat seed=2
    lost = study(tmp_path).trials[0]
    assert lost.state.name == "RUNNING" and lost.user_attrs["repeat_values"] == [[objective(3, 1)]]
    resumed = sweep(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lost, retry = study(tmp_path).trials
    assert lost.state.name == "FAIL" and lost.user_attrs["worker_lost"]
    assert retry.state.name == "COMPLETE" and retry.user_attrs["retry_of"] == 0
    assert retry.value == pytest.approx(statistics.mean(objective(3, s) for s in (1, 2, 3)), abs=1e-12)
    sweep_dir = tmp_path / "sweep"
    assert retry.user_attrs["repeat_run_dirs"] == [str(sweep_dir / "0" / "seed_1"), str(sweep_dir / "1" / "seed_2"),
                                                   str(sweep_dir / "1" / "seed_3")]  # seed 1 was kept


@pytest.mark.slow
def test_confirmation_writes_its_file_and_a_resumed_sweep_completes_it(tmp_path):
    args = ["hydra/sweeper/sampler=grid", "x=choice(2,3,5)", "hydra.sweeper.n_trials=3", "hydra.sweeper.repeats=2",
            "hydra.sweeper.confirm.top_k=2", "hydra.sweeper.confirm.seeds=[11,12,13]",
            "+hydra.sweeper.confirm.baseline.x=0", "die_once=12"]
    killed = sweep(tmp_path, *args)
    assert killed.returncode != 0  # died in the confirmation of the best setting, at seed 12
    resumed = sweep(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [t.state.name for t in study(tmp_path).trials] == ["COMPLETE"] * 3  # the search was not rerun
    confirmed = results(tmp_path, "confirmation.yaml")
    assert confirmed["seeds"] == [11, 12, 13] and confirmed["unfinished"] == []
    base = [objective(0, s) for s in (11, 12, 13)]
    assert confirmed["baseline"]["params"] == {"x": 0}
    assert confirmed["baseline"]["mean"] == pytest.approx(statistics.mean(base))
    assert [s["params"] for s in confirmed["settings"]] == [{"x": 3}, {"x": 2}]  # the top 2, best first
    for setting in confirmed["settings"]:
        values = [objective(setting["params"]["x"], s) for s in (11, 12, 13)]
        assert setting["values"] == pytest.approx(values) and setting["sem"] == pytest.approx(statistics.stdev(values) / 3 ** 0.5)
        mean, low, high = by_hand(values, base)
        assert setting["vs_baseline"] == {"mean": pytest.approx(mean), "ci95": [pytest.approx(low), pytest.approx(high)], "n": 3}
    assert confirmed["best"] == confirmed["settings"][0]["name"]
    assert resumed.stdout.strip().splitlines()[-1].endswith(
        f"confirmed best: {confirmed['best']} {{'x': 3}}: {statistics.mean(objective(3, s) for s in (11, 12, 13)):.6g} "
        f"+/- {confirmed['settings'][0]['sem']:.2g} (sem, 3 seeds); minus the baseline: "
        f"{confirmed['settings'][0]['vs_baseline']['mean']:+.4g}, 95% interval "
        f"[{confirmed['settings'][0]['vs_baseline']['ci95'][0]:+.4g}, {confirmed['settings'][0]['vs_baseline']['ci95'][1]:+.4g}] over 3 seeds")


@pytest.mark.slow
def test_one_repeat_keeps_the_peers_behaviour(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2", "seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    found = results(tmp_path)
    assert not {"repeats", "best_value_sem", "runner_up"} & set(found)
    assert [t.value for t in study(tmp_path).trials] == [objective(t.params["x"], 7) for t in study(tmp_path).trials]
    assert (tmp_path / "sweep" / "1" / ".hydra").is_dir()  # job number = trial number, no repeat dirs
    assert not any("repeat_values" in t.user_attrs for t in study(tmp_path).trials)


def wilcoxon(p_threshold=0.1, n_startup_steps=2):
    return OmegaConf.create({"_target_": rep.WILCOXON, "p_threshold": p_threshold, "n_startup_steps": n_startup_steps})


def test_repeat_settings_that_cannot_work_are_refused_with_what_to_type():
    median = OmegaConf.create({"_target_": "optuna.pruners.MedianPruner"})
    assert rep.configured(1, None, "seed", median, 1) is None  # the peer's behaviour
    assert rep.configured(3, None, "seed", median, 1).seeds == [1, 2, 3]
    assert rep.configured(2, [5, 9], "seed", median, 1).seeds == [5, 9]
    refused = [
        (2, [1], median, "hydra.sweeper.repeat_seeds has 1 seeds but hydra.sweeper.repeats=2: give hydra.sweeper.repeats=1"),
        (2, [4, 4], median, "repeats a seed"),
        (0, None, median, "expected a positive number"),
        (1, None, wilcoxon(), "prunes across a trial's repeats: set hydra.sweeper.repeats=5 or more"),
        (3, None, wilcoxon(), "can never prune: .* raise hydra.sweeper.repeats to 5 or hydra.sweeper.pruner.p_threshold above 0.25"),
        (4, None, wilcoxon(p_threshold=0.3, n_startup_steps=4), "raise hydra.sweeper.repeats to 5"),
    ]
    for repeats, seeds, pruner, message in refused:
        with pytest.raises(UserError, match=message):
            rep.configured(repeats, seeds, "seed", pruner, 1)
    assert rep.configured(3, None, "seed", wilcoxon(p_threshold=0.3), 1).across  # 0.5^2 < 0.3
    with pytest.raises(UserError, match="repeat_key=trainer.seed with one run per trial: no repeat seed is passed"):
        rep.configured(1, None, "trainer.seed", median, 1)  # accepted and ignored before
    from spectraqlora.sweep.confirm import Confirmation

    with pytest.raises(UserError, match=r"confirm.seeds=\[7, 8\] without confirm.top_k: nothing is confirmed"):
        Confirmation.configured(OmegaConf.create({"top_k": 0, "seeds": [7, 8], "baseline": {}}), None, 1, "seed")
    with pytest.raises(UserError, match="multi-objective studies cannot prune"):
        rep.configured(5, None, "seed", wilcoxon(), 2)
    with pytest.raises(UserError, match=r"^seed=4: seed is set by hydra.sweeper.repeats \(seeds \[1, 2\]\)"):
        rep.check_key(rep.configured(2, None, "seed", median, 1), ["seed=4"], {})


def test_the_first_repeat_reports_to_its_trial_and_the_others_to_none(tmp_path):
    """Pruning inside a run, with repeats: only a search trial's first repeat reports its eval
    losses, to the trial the sweeper named (not the job number, which counts launches)."""
    from hydra.types import RunMode

    from spectraqlora.sweep.study import SWEEPER, current_trial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    created = optuna.create_study(study_name="s", storage=storage)
    for _ in range(3):
        created.ask()

    def job(num, *overrides):
        cfg = OmegaConf.create({"sweeper": {"_target_": SWEEPER, "study_name": "s", "storage": storage,
                                            "pruner": {"_target_": "optuna.pruners.MedianPruner"}, "report_to": None},
                                "sweep": {"dir": str(tmp_path)}, "job": {"num": num},
                                "overrides": {"hydra": list(overrides)}})
        for o in overrides:
            OmegaConf.update(cfg, o.split("=")[0].removeprefix("hydra."), yaml.safe_load(o.split("=")[1]))
        cfg.mode = RunMode.MULTIRUN
        return current_trial(cfg)

    assert job(1).number == 1  # one run per trial: the job number
    assert job(0, "hydra.sweeper.report_to=2").number == 2
    assert job(2, "hydra.sweeper.report_to=null") is None


@pytest.mark.slow
def test_a_remote_launcher_gets_every_repeat_of_a_batch_in_one_launch(tmp_path):
    """submitit's local executor stands in for SLURM: one job array of n_jobs x repeats jobs."""
    result = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra/sweeper/sampler=grid", "x=choice(1,3)",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.repeats=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Submitit 'local' sweep output dir") == 1  # one launch of 4 jobs
    assert sorted(p.name for p in (tmp_path / "sweep").glob("*/seed_*")) == ["seed_1", "seed_1", "seed_2", "seed_2"]
    for t in study(tmp_path).trials:
        assert t.value == pytest.approx(statistics.mean(objective(t.params["x"], s) for s in (1, 2)), abs=1e-12)
