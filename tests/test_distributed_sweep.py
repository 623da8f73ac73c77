"""Sweep workers started independently (as on several machines) sharing one study in a real
PostgreSQL server: exactly n_trials between them, no trial number run twice, and the trial of a
worker killed mid-trial marked FAIL by the others once its heartbeat is older than the grace
period."""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
import yaml

from conftest import ROOT
from test_sweep import QUICK


def server_binaries():
    """initdb and pg_ctl: on the PATH, or where Debian's postgresql package puts them."""
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return found
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(f"{bindir}/initdb"):
            return [f"{bindir}/initdb", f"{bindir}/pg_ctl"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A private PostgreSQL cluster in a temp dir, on a free loopback port; stopped after."""
    binaries = server_binaries()
    if not binaries:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): `apt-get install postgresql`, "
                    "as .ci/run does")
    initdb, pg_ctl = binaries
    base = tempfile.mkdtemp(prefix="spectraqlora-pg-")
    as_postgres = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    data, port = f"{base}/data", free_port()
    subprocess.run([*as_postgres, initdb, "-D", data, "-A", "trust", "-U", "spectra", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, pg_ctl, "-D", data, "-l", f"{base}/server.log", "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://spectra@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def other_host() -> list[str]:
    """A prefix that runs a command under another host name (a UTS namespace), so that its
    worker looks like one on another machine: its death is seen by heartbeat only."""
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        return []
    return ["unshare", "--uts", "sh", "-c", 'hostname worker-b && exec "$@"', "sh"]


def test_two_workers_share_a_postgresql_study_and_a_killed_workers_trial_fails(tmp_path, postgres):
    n_trials, study_name = 4, "shared"
    cmd = [sys.executable, "-m", "spectraqlora.train", "-m", *QUICK, "hparams_search=snr_rank",
           f"hydra.sweeper.storage={postgres}", f"hydra.sweeper.study_name={study_name}",
           f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.heartbeat_interval=1",
           "hydra.sweeper.grace_period=4", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"scan.cache_dir={tmp_path / 'scan'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    remote = other_host()
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in "ab"}
    a = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=logs["a"], stderr=subprocess.STDOUT)
    b = subprocess.Popen(remote + cmd, cwd=tmp_path, env=env, stdout=logs["b"], stderr=subprocess.STDOUT)
    try:
        # kill worker b in the middle of its second trial
        url = postgres.replace("postgresql://", "postgresql+psycopg://")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and b.poll() is None:
            try:
                trials = optuna.load_study(study_name=study_name, storage=url).trials
            except (KeyError, ValueError):  # not created yet
                trials = []
            mine = [t for t in trials if t.user_attrs.get("worker_pid") == b.pid]
            if any(t.state.name == "COMPLETE" for t in mine) and any(t.state.name == "RUNNING" for t in mine):
                break
            time.sleep(0.5)
        assert b.poll() is None, "worker b ended before it could be killed mid-trial"
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert a.wait(timeout=400) == 0, open(tmp_path / "a.log").read()[-3000:]
    finally:
        for worker in (a, b):
            worker.kill()
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(n_trials))  # exactly n_trials
    (killed,) = [t for t in trials if t.state.name == "FAIL"]
    assert killed.user_attrs["worker_pid"] == b.pid
    if remote:  # another host name: only its silence tells
        assert killed.user_attrs["worker_host"] == "worker-b"
        assert "no heartbeat for" in killed.user_attrs["error"], killed.user_attrs["error"]
    assert "died" in killed.user_attrs["error"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials - 1
    assert {t.user_attrs["worker_pid"] for t in complete} == {a.pid, b.pid}  # both did work
    for t in complete:  # every result is in its own run dir
        assert t.user_attrs["run_dir"] == str(tmp_path / "sweep" / str(t.number))
        assert (tmp_path / "sweep" / str(t.number) / "metrics.json").is_file()
    assert not (tmp_path / "sweep" / str(killed.number) / "metrics.json").exists()
    started = [int(n) for name in "ab" for n in re.findall(
        r"\] trial (\d+): \S+=", open(tmp_path / f"{name}.log").read())]
    assert sorted(started) == list(range(n_trials))  # no trial number started twice
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["trials"] == {"COMPLETE": n_trials - 1, "FAIL": 1}
    assert results["storage"] == postgres.replace("postgresql://", "postgresql+psycopg://")


def test_the_slurm_launcher_config_composes_for_submitit():
    from hydra import compose, initialize_config_dir

    from spectraqlora.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hparams_search=snr_rank", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.sweeper.n_jobs=16", "hydra.launcher.array_parallelism=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 4)
    assert launcher.timeout_min == 240 and launcher.tasks_per_node == 1
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # in the sweep dir
    assert cfg.hydra.sweeper.n_jobs == 16

