"""spectraqlora's Optuna sweeper, driven as a user types it: `python -m spectraqlora.train -m`."""
import csv
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml

from tests.helpers import ROOT, run_cli

QUICK = ["model=tiny_llama", "trainer=smoke", "trainer.max_steps=4", "trainer.eval_steps=2",
         "trainer.logging_steps=2", "dataset.eval_size=16", "dataset.train_size=64"]


def sweep(tmp_path, *overrides, env=None):
    result = run_cli("train", "-m", *QUICK, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     f"scan.cache_dir={tmp_path / 'scan'}", *overrides, cwd=tmp_path, env=env)
    return result, tmp_path / "sweep"


def load(sweep_dir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def states(study):
    return sorted(t.state.name for t in study.trials)


@pytest.mark.slow
def test_snr_rank_sweep_scans_once_writes_results_and_resumes(tmp_path):
    args = ["hparams_search=snr_rank", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=3"]
    result, sweep_dir = sweep(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir, "snr_rank")
    assert states(study) == ["COMPLETE"] * 3
    assert {"selection.top_frac", "lora.r"} == set(study.trials[0].params)
    logs = [(sweep_dir / str(n) / "train.log").read_text() for n in range(3)]
    assert sum("spectrum scan: computed" in log for log in logs) == 1  # one scan for the sweep
    assert sum("spectrum scan: cached" in log for log in logs) == 2
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(t.value for t in study.trials)
    assert results["best_run_dir"] == str(sweep_dir / str(results["best_trial"]))
    with open(sweep_dir / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for name in ("multirun.yaml", "optimization_history.png", "param_importances.png"):
        assert (sweep_dir / name).is_file(), name
    assert (f"multirun ended: 3 finished runs under {sweep_dir}; python -m spectraqlora.report {sweep_dir} "
            f"tables them") in result.stdout

    # a trial left RUNNING by a sweep that was killed (its process is gone)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = study.ask()
    orphan.set_user_attr("worker_host", socket.gethostname())
    orphan.set_user_attr("worker_pid", int(dead))

    # max_failure_rate=0.0 (the peer's default): a trial lost with its worker is no failure
    result, _ = sweep(tmp_path, *args, "hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.0",
                      "hydra/sweeper/pruner=none")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir, "snr_rank")
    assert states(study) == ["COMPLETE"] * 4 + ["FAIL"]  # n_trials in total, the lost one asked again
    lost = study.trials[3]
    assert lost.state.name == "FAIL" and "died" in lost.user_attrs["error"] and lost.user_attrs["worker_lost"]
    assert (sweep_dir / "4" / ".hydra").is_dir()  # jobs numbered on
    first = [t.params for t in study.trials[:3]]
    assert study.trials[4].params not in first  # the seeded sampler moved on


@pytest.mark.slow
def test_failed_and_pruned_trials_of_a_job_array_are_recorded_and_the_sweep_goes_on(tmp_path):
    """Through a remote launcher (submitit's local executor stands in for SLURM: the same
    launcher code, jobs as local processes): n_jobs trials per launch, one job array, and the
    trials' errors and pruning come back across processes."""
    result, sweep_dir = sweep(
        tmp_path, "hydra/sweeper=spectraqlora_optuna", "hydra/sweeper/sampler=grid",
        "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.upper=10.1",
        "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4",
        "lora.r=choice(1024,8)", "trainer.learning_rate=choice(1e-7,1e-2)", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Submitit 'local' sweep output dir") == 2  # 2 x 2
    study = load(sweep_dir, f"{tmp_path.name}_sweep")  # study_name null: from the sweep dir
    assert states(study) == ["COMPLETE", "FAIL", "FAIL", "PRUNED"]
    for t in study.trials:
        assert t.user_attrs["run_dir"] == str(sweep_dir / str(t.number))  # job n = trial n
        if t.state.name == "FAIL":
            assert t.params["lora.r"] == 1024  # within the schema, beyond tiny_llama's shapes
            assert "rank 1024 is larger than the smaller dimension" in t.user_attrs["error"]
        if t.state.name == "PRUNED":  # lr 1e-7 leaves the loss above the threshold
            assert t.params["trainer.learning_rate"] == 1e-7
            assert t.value == t.intermediate_values[2] > 10.1


@pytest.mark.slow
def test_too_many_failures_stop_the_sweep_with_a_clear_error(tmp_path):
    result, sweep_dir = sweep(tmp_path, "hydra/sweeper=spectraqlora_optuna", "hydra.sweeper.n_trials=8",
                              "hydra.sweeper.max_failure_rate=0.25", "lora.r=choice(512,1024)")
    assert result.returncode != 0
    assert "error: sweep stopped: 3 trials failed, more than hydra.sweeper.max_failure_rate=0.25 " \
           "of n_trials=8" in result.stderr
    assert "Traceback" not in result.stderr
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["trials"] == {"FAIL": 3}


@pytest.mark.distributed
@pytest.mark.slow
def test_pareto_sweep_with_two_workers_on_a_journal_file_and_a_wandb_summary(tmp_path):
    journal = tmp_path / "journal.log"
    result, sweep_dir = sweep(tmp_path, "hparams_search=snr_rank_pareto", "hydra.sweeper.n_trials=4",
                              "hydra.sweeper.workers=2", "hydra.sweeper.sampler.seed=1", "logger=wandb",
                              f"hydra.sweeper.storage=journal://{journal}", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="snr_rank_pareto", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert states(study) == ["COMPLETE"] * 4  # exactly n_trials, shared by the two workers
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 2
    assert len({tuple(t.params.items()) for t in study.trials}) == 4  # no shared random stream
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    front = results["pareto_front"]
    assert front and {"eval_loss", "peak_mem_gb"} == set(front[0]["values"])
    assert {p["trial"] for p in front} == {t.number for t in study.best_trials}
    assert (sweep_dir / "pareto_front.png").is_file()
    (summary,) = sweep_dir.glob("wandb/offline-run-*/run-*.wandb")  # trials log in their own dirs
    assert b"sweep-summary" in summary.read_bytes() and b"pareto_front" in summary.read_bytes()
    assert all(list((sweep_dir / str(n)).glob("wandb/offline-run-*")) for n in range(4))


@pytest.mark.slow
def test_the_plugin_is_found_in_an_installed_wheel(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("spectraqlora-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # a namespace package
    # Only the wheel and the dependencies: -S skips the .pth that points at this checkout.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper;"
            "import spectraqlora, hydra_plugins.spectraqlora_optuna_sweeper as p;"
            "print(spectraqlora.__file__, p.__file__);"
            "print([c.__name__ for c in Plugins.instance().discover(Sweeper)])")
    found = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *deps])})
    assert found.returncode == 0, found.stderr[-2000:]
    assert str(ROOT) not in found.stdout and str(site) in found.stdout
    assert "SpectraOptunaSweeper" in found.stdout


def test_search_space_syntax_matches_hydra_optuna_sweeper():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from spectraqlora.sweep.space import distribution

    def parsed(line):
        return distribution(OverridesParser.create().parse_override(line))

    assert parsed("a=interval(0.05, 1.0)") == FloatDistribution(0.05, 1.0)
    assert parsed("a=int(interval(1, 10))") == IntDistribution(1, 10)
    assert parsed("a=tag(log, interval(1e-5, 1e-2))") == FloatDistribution(1e-5, 1e-2, log=True)
    assert parsed("a=choice(4, 8, 16)") == CategoricalDistribution([4, 8, 16])
    # range includes its end, as the peer reads it (Hydra's basic sweeper and Python stop before)
    assert parsed("a=range(1, 5)") == IntDistribution(1, 5)
    assert parsed("a=range(1, 9, 2)") == IntDistribution(1, 9, step=2)
    assert parsed("a=range(0.5, 5.5, step=1)") == FloatDistribution(0.5, 5.5, step=1)
    assert parsed("a=3") is None


def test_storage_passwords_stay_out_of_results_and_logs():
    from spectraqlora.sweep.results import shown_url

    shown = shown_url("postgresql://optuna:s3cret@db.example:5432/studies")
    assert "s3cret" not in shown and "db.example:5432/studies" in shown


@pytest.mark.slow
def test_optuna_dashboard_serves_a_sweeps_sqlite_study(tmp_path):
    """docs/sweeps.md's `optuna-dashboard sqlite:///<sweep dir>/optuna.db` ([dashboard] extra), on
    loopback, for a few seconds."""
    import json
    import socket
    import time
    import urllib.request

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="snr_rank", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1",
                               "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline, studies = time.monotonic() + 30, None
        while studies is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
            except OSError:
                time.sleep(0.2)
    finally:
        server.kill()
        server.wait()
    assert studies is not None, "optuna-dashboard did not answer within 30 s"
    assert [(s["study_name"], s["directions"]) for s in studies] == [("snr_rank", ["minimize"])]


def test_optunas_plot_style_does_not_leak_into_later_figures(tmp_path):
    """optuna's matplotlib plots set ggplot globally: in a sweep, later trials' SNR heatmaps got
    grid lines through their cells. Each figure now draws in a style context of its own."""
    import matplotlib.pyplot as plt

    from spectraqlora.sweep.results import plot_study

    before = dict(plt.rcParams)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("r", 1, 8), n_trials=3)
    written = plot_study(study, ["eval_loss"], 3, tmp_path)
    assert [p.name for p in written] == ["optimization_history.png", "param_importances.png"]
    changed = {k for k, v in plt.rcParams.items() if str(before.get(k)) != str(v)}
    assert not changed & {"axes.facecolor", "axes.grid", "axes.edgecolor", "grid.color"}, changed


@pytest.mark.slow
@pytest.mark.parametrize("param, message", [
    ("selection.top_frac=interval(2,3)", "the search space of selection.top_frac reaches selection.top_frac=2.0: "
                                         "selection.top_frac=2.0 is out of range: expected "),
    ("lora.r=choice(8,0,-4)", "the search space of lora.r reaches lora.r=0: lora.r=0 is out of range: expected "),
])
def test_a_search_space_outside_the_schema_is_one_line_before_trial_0(tmp_path, param, message):
    result, sweep_dir = sweep(tmp_path, "hparams_search=snr_rank", param)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (sweep_dir / "0").exists()
