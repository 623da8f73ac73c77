"""Sweep workers started independently (as on several machines) sharing one study in a real
PostgreSQL server: the schema created once, exactly n_trials between them, no trial number run
twice, and the trial of a worker killed mid-trial marked FAIL by the others once its heartbeat
is older than the grace period. The workers run tests/apps/gated.py, whose trials end when the
test says: no timing is left to chance."""
import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import psycopg
import pytest
import yaml

from spectraqlora.sweep.study import make_storage, storage_url
from tests.helpers import ROOT, Gate


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


def make_storage_at(barrier, url: str, errors) -> None:
    barrier.wait()  # all workers at the same instant
    try:
        make_storage(url)
    except Exception as exc:
        errors.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        raise


@pytest.mark.distributed
@pytest.mark.slow
def test_workers_started_together_on_an_empty_database_create_the_schema_once(postgres):
    """Optuna issue #1092: workers that build their RDBStorage at once on a new database race to
    create its tables (UniqueViolation on pg_type); seen in 5 of 8 rounds of 4 such workers
    here before the schema lock."""
    fork = multiprocessing.get_context("fork")
    for round_ in range(4):
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE empty{round_}")
        url = storage_url(f"{postgres.rsplit('/', 1)[0]}/empty{round_}", None)
        barrier, errors = fork.Barrier(4), fork.Queue()
        workers = [fork.Process(target=make_storage_at, args=(barrier, url, errors)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [w.exitcode for w in workers] == [0] * 4, errors.get(timeout=1)
        optuna.create_study(study_name="after", storage=url)  # the schema is complete


@pytest.mark.distributed
@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_killed_workers_trial_fails(tmp_path, postgres):
    """Two workers started together on an empty database. Worker a's first trial is held until
    worker b has finished one trial and started its second; b is SIGKILLed mid-trial just before
    a's last trial ends (trials block until released, so the moments are certain): a, which
    finds b's trial RUNNING with a fresh heartbeat, must wait until it is FAIL (by heartbeat
    when b runs under another host name, by its dead pid otherwise), and then run one more in
    its place: n_trials counts trials that ran to their end."""
    n_trials, gate = 4, Gate(tmp_path / "gate")
    cmd = [sys.executable, str(ROOT / "tests" / "apps" / "gated.py"), "-m", f"gate={gate.path}",
           f"hydra.sweeper.storage={postgres}", f"hydra.sweeper.n_trials={n_trials}",
           "hydra.sweeper.heartbeat_interval=3", "hydra.sweeper.grace_period=6",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    remote = other_host()
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in "ab"}
    a = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=logs["a"], stderr=subprocess.STDOUT)
    b = subprocess.Popen(remote + cmd, cwd=tmp_path, env=env, stdout=logs["b"], stderr=subprocess.STDOUT)
    killed, deadline = None, time.monotonic() + 120
    try:
        while a.poll() is None:
            assert time.monotonic() < deadline, open(tmp_path / "a.log").read()[-3000:]
            started = gate.started()
            held_by_b = [t for t, p in started if p == b.pid and t not in gate.released]
            for trial, pid in started:
                if trial in gate.released or killed is not None and trial == killed:
                    continue
                if pid == b.pid and len(held_by_b) == len([t for t, p in started if p == b.pid]):
                    gate.release(trial)  # b's first trial
                elif pid == a.pid and (killed is not None or held_by_b and len(started) < n_trials):
                    gate.release(trial)  # a's trials once b is in its second
                elif pid == a.pid and held_by_b:  # a's last trial: kill b, then let a end at once
                    b.kill()
                    b.wait()
                    killed = held_by_b[0]
                    gate.release(trial)
            assert killed is not None or b.poll() is None, open(tmp_path / "b.log").read()[-3000:]
            time.sleep(0.05)
        assert a.returncode == 0, open(tmp_path / "a.log").read()[-3000:]
    finally:
        for worker in (a, b):
            worker.kill()
    # each trial started once; b's lost trial was asked again: n_trials ran to their end
    assert [t for t, _ in gate.started()] == list(range(n_trials + 1))
    url = storage_url(postgres, None)
    trials = optuna.load_study(study_name="gated", storage=url).trials
    assert [t.number for t in trials if t.state.name == "RUNNING"] == []  # a waited for b's trial
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert (failed.number, failed.user_attrs["worker_pid"]) == (killed, b.pid)
    assert failed.user_attrs["worker_lost"]  # not a failure of its own
    if remote:  # another host name: only its silence tells
        assert failed.user_attrs["worker_host"] == "worker-b"
        assert "no heartbeat for" in failed.user_attrs["error"], failed.user_attrs["error"]
    assert "died" in failed.user_attrs["error"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials
    assert {t.user_attrs["worker_pid"] for t in complete} == {a.pid, b.pid}  # both did work
    for t in complete:  # every result is in its own run dir
        assert t.user_attrs["run_dir"] == str(tmp_path / "sweep" / str(t.number))
        assert float((tmp_path / "sweep" / str(t.number) / "result.txt").read_text()) == t.value
    assert not (tmp_path / "sweep" / str(killed) / "result.txt").exists()
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["trials"] == {"COMPLETE": n_trials, "FAIL": 1}
    assert results["storage"] == url


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

