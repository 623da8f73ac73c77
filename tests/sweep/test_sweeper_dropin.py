"""The sweeper on a trivial Hydra app (tests/apps/gated.py, no model): what a config written for
hydra-optuna-sweeper expects, and the defects found by running its suite and ours."""
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from spectraqlora.sweep.space import trial_seed
from tests.helpers import ROOT, Gate

APP = ROOT / "tests" / "apps" / "gated.py"


def sweep(tmp_path, *overrides):
    result = subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                             *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    sweep_dir = tmp_path / "sweep"
    return result, sweep_dir, yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def trials(sweep_dir, name="gated"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials


@pytest.mark.slow
def test_a_wrong_number_of_returned_values_fails_the_trial_with_a_clear_error(tmp_path):
    result, sweep_dir, results = sweep(tmp_path, "returns=[1.0,2.0]", "hydra.sweeper.n_trials=1")
    assert result.returncode == 2  # the one trial failed: more than max_failure_rate
    (trial,) = trials(sweep_dir)
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["error"] == ("the task returned 2 value(s) [1.0, 2.0] for 1 objective(s) "
                                         "(hydra.sweeper.direction)")
    assert results["trials"] == {"FAIL": 1}


@pytest.mark.slow
def test_multi_objective_results_carry_the_peers_solutions(tmp_path):
    result, sweep_dir, results = sweep(tmp_path, "returns=[1.0,2.0]", "hydra.sweeper.n_trials=2",
                                       "hydra.sweeper.direction=[minimize,maximize]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert results["name"] == "optuna" and results["trials"] == {"COMPLETE": 2}
    assert [s["values"] for s in results["solutions"]] == [[1.0, 2.0], [1.0, 2.0]]
    assert all(set(s["params"]) == {"x"} for s in results["solutions"])
    assert (sweep_dir / "pareto_front.png").is_file()


@pytest.mark.slow
def test_int_range_includes_its_end_and_a_grid_is_built_from_it(tmp_path):
    """As hydra-optuna-sweeper reads range(1, 3): 1, 2 and 3 (Hydra's basic sweeper stops at 2)."""
    result, sweep_dir, results = sweep(tmp_path, "hydra/sweeper/sampler=grid", "x=range(1,3)",
                                       "hydra.sweeper.n_trials=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(t.params["x"] for t in trials(sweep_dir)) == [1, 2, 3]  # the grid ran out
    assert results["best_params"] == {"x": 1} and results["best_value"] == 1


@pytest.mark.slow
def test_no_study_name_and_no_search_space_run_the_fixed_config(tmp_path):
    began = time.monotonic()
    result, sweep_dir, results = sweep(tmp_path, "hydra.sweeper.study_name=null",
                                       "hydra.sweeper.params=null", "x=0.5", "hydra.sweeper.n_trials=20")
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr[-3000:]
    assert results["study_name"] == f"{tmp_path.name}_sweep"  # from the sweep dir
    done = trials(sweep_dir, results["study_name"])
    assert [(t.state.name, t.params, t.value) for t in done] == [("COMPLETE", {}, 0.5)] * 20
    print(f"20 trivial trials: {took:.1f} s")  # docs/benchmarks.md: the peer took 1.6 s, we 9.2 s before


@pytest.mark.slow
def test_a_custom_search_space_adds_params_and_fixed_ones_are_user_attrs(tmp_path):
    result, sweep_dir, _ = sweep(tmp_path, "hydra.sweeper.custom_search_space=__main__.configure",
                                 "hydra.sweeper.n_trials=3", "returns=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    for t in trials(sweep_dir):
        assert set(t.params) == {"x", "y"} and abs(t.params["y"] - t.params["x"]) <= 0.5
        assert t.user_attrs["returns"] == "0.25"  # a fixed param, as the peer records it
        job = yaml.safe_load((sweep_dir / str(t.number) / ".hydra" / "config.yaml").read_text())
        assert job["y"] == t.params["y"]  # what it suggested reached the job
    bad = subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'bad'}",
                          "hydra.sweeper.custom_search_space=nowhere.configure"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: hydra.sweeper.custom_search_space=nowhere.configure: " in bad.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_hydra_callbacks_run_once_for_a_sweep_with_local_workers(tmp_path):
    result, _, results = sweep(tmp_path, "hydra.sweeper.workers=2", "hydra.sweeper.n_trials=4",
                               "+hydra.callbacks.mark._target_=__main__.Mark")
    assert result.returncode == 0, result.stderr[-3000:]
    assert results["trials"] == {"COMPLETE": 4}
    assert (tmp_path / "callbacks.log").read_text().split() == ["start", "end"]  # not per worker


@pytest.mark.distributed
@pytest.mark.slow
def test_workers_start_from_the_app_not_from_the_driver_that_called_it(tmp_path):
    """A driver script that calls the Hydra app: workers used to re-run sys.argv (the driver,
    or pytest), which started workers of their own without end. The first trial is held until
    the second worker has started one, so both surely take part."""
    import os

    gate = Gate(tmp_path / "gate")
    driver = ("import sys; print('DRIVER', flush=True); import gated; "
              f"sys.argv = ['gated', '-m', 'hydra.sweep.dir={tmp_path / 'sweep'}', 'hydra.sweeper.workers=2', "
              f"'hydra.sweeper.n_trials=4', 'gate={gate.path}']; gated.main()")
    env = {**os.environ, "PYTHONPATH": f"{APP.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        started = gate.started()
        if len({pid for _, pid in started}) == 2:
            for trial, _ in started:
                if trial not in gate.released:
                    gate.release(trial)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("DRIVER") == 1  # the worker ran the app, not the driver
    done = trials(tmp_path / "sweep")
    assert [t.state.name for t in done] == ["COMPLETE"] * 4
    assert len({t.user_attrs["worker_pid"] for t in done}) == 2  # both processes took trials


def test_trial_seeds_of_neighbouring_study_seeds_are_unrelated():
    """seed + trials-so-far made seed 124's trials 0-6 those of seed 123's trials 1-7."""
    a = [trial_seed(123, n) for n in range(8)]
    b = [trial_seed(124, n) for n in range(8)]
    assert not set(a) & set(b) and len(set(a)) == 8
    assert a == [trial_seed(123, n) for n in range(8)]  # reproducible


def sampler_of(*overrides):
    """The sampler spectraqlora's sweeper builds for `hparams_search=snr_rank` + overrides."""
    from hydra import compose, initialize_config_dir

    from spectraqlora.config import CONF_DIR
    from spectraqlora.sweep.space import make_sampler

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hparams_search=snr_rank", *overrides])
    return make_sampler(cfg.hydra.sweeper.sampler, {}, 0)


def test_the_peers_sampler_keys_are_ours():
    tpe = sampler_of("hydra.sweeper.sampler.n_startup_trials=5", "hydra.sweeper.sampler.multivariate=true",
                     "hydra.sweeper.sampler.constant_liar=false", "hydra.sweeper.sampler.seed=1")
    assert type(tpe).__name__ == "TPESampler"
    assert (tpe._n_startup_trials, tpe._multivariate, tpe._constant_liar) == (5, True, False)
    nsga = sampler_of("hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.population_size=8")
    assert (type(nsga).__name__, nsga._population_size) == ("NSGAIISampler", 8)
    assert type(sampler_of("hydra/sweeper/sampler=qmc", "hydra.sweeper.sampler.scramble=true")).__name__ == "QMCSampler"


def test_removed_and_uninstalled_samplers_are_one_line():
    import importlib.util

    import pytest

    from spectraqlora.errors import UserError

    with pytest.raises(UserError, match=r"^hydra/sweeper/sampler=motpe: the 'motpe' sampler was removed in Optuna 4.0 "):
        sampler_of("hydra/sweeper/sampler=motpe")
    if importlib.util.find_spec("cmaes") is None:
        with pytest.raises(UserError, match=r'CmaEsSampler needs the cmaes package: pip install "spectraqlora\[cmaes\]"'):
            sampler_of("hydra/sweeper/sampler=cmaes")
    else:
        assert type(sampler_of("hydra/sweeper/sampler=cmaes")).__name__ == "CmaEsSampler"


@pytest.mark.slow
def test_launch_jobs_in_process_through_hydras_sweep_runner(hydra_sweep_runner):
    """hydra-optuna-sweeper's test_launch_jobs with our sweeper: Hydra's own test fixture runs
    the sweep inside pytest; n_jobs=3 is three trials per launch (workers would have started
    pytest again before)."""
    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="hydra.test_utils.a_module", config_path="configs",
        config_name="compose.yaml", task_function=None,
        overrides=["hydra/sweeper=spectraqlora_optuna", "hydra/launcher=basic",
                   "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=3", "hydra.sweeper.study_name=launch"])
    with sweep:  # the runner's sweep dir lives while it does
        assert sweep.returns is None
        study = optuna.load_study(study_name="launch", storage=f"sqlite:///{sweep.temp_dir}/optuna.db")
        assert [(t.number, t.state.name) for t in study.trials] == [(n, "COMPLETE") for n in range(8)]
        assert (Path(sweep.temp_dir) / "7" / ".hydra").is_dir()  # batches of 3, 3 and 2 launched


@pytest.mark.slow
def test_a_reversed_interval_is_one_line_before_any_trial(tmp_path):
    result = subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                             "x=interval(0.5,0.1)"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: x=interval(0.5,0.1): `low <= high` must hold, but got (low=0.5, high=0.1).")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 is out of range: expected a positive integer"),
    ("hydra.sweeper.max_failure_rate=1.5", "hydra.sweeper.max_failure_rate=1.5 is out of range: expected a fraction in [0, 1]"),
    ("hydra.sweeper.grace_period=30", "hydra.sweeper.heartbeat_interval=60 and grace_period=30: the grace period must "
                                      "be longer than the interval (default: twice the interval)"),
])
def test_a_sweeper_key_out_of_its_schemas_range_is_one_line_before_any_trial(tmp_path, override, message):
    result = subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", override],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "sweep" / "0").exists()


@pytest.mark.slow
def test_a_second_search_on_a_study_is_refused_and_a_complete_one_says_so(tmp_path):
    """Two sweeps on one storage and study name: the second reported the first's best as its own."""
    result, sweep_dir, first = sweep(tmp_path, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    kept = {p.name: p.read_bytes() for p in sweep_dir.iterdir() if p.is_file()}
    refused = subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=2",
                              "sleep=0.01", "x=interval(0.0,2.0)"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: study gated in sqlite:///{sweep_dir.resolve() / 'optuna.db'} searches something else (overrides "
        f"this command has sleep=0.01, search space differs in x): give this search its own "
        f"hydra.sweeper.study_name (or sweep dir), or drop the differing overrides")
    assert {p.name: p.read_bytes() for p in sweep_dir.iterdir() if p.is_file()} == kept  # nothing rewritten
    again, _, results = sweep(tmp_path, "hydra.sweeper.n_trials=2")
    assert again.returncode == 0 and results["best_value"] == first["best_value"]
    assert "study gated already has its hydra.sweeper.n_trials=2 trials: nothing new runs" in again.stdout
    assert len(trials(sweep_dir)) == 2


@pytest.mark.slow
def test_the_peers_custom_search_space_example_loads_from_a_hyphenated_app_module(tmp_path):
    """hydra-optuna-sweeper's example/custom-search-space-objective.py names its function
    `custom-search-space-objective.configure`: a module name with hyphens, imported from the
    app's own directory as Hydra's get_method does for the peer."""
    import shutil

    app = tmp_path / "app" / "custom-search-space-objective.py"
    app.parent.mkdir()
    shutil.copy(APP, app)
    shutil.copy(APP.with_suffix(".yaml"), app.parent / "gated.yaml")
    result = subprocess.run([sys.executable, str(app), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                             "hydra.sweeper.custom_search_space=custom-search-space-objective.configure",
                             "hydra.sweeper.n_trials=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(set(t.params) == {"x", "y"} for t in trials(tmp_path / "sweep"))
