"""Fixtures every test directory shares; helpers live in tests/helpers.py."""
import os

import pytest

from tests.helpers import SECRETS, run_cli

# No hub at test time; generated checkpoints go to a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

# The tests run on pytest-xdist workers (`-n auto` in pyproject.toml). Each worker gets its share
# of the cores for torch's threads, set before torch is imported so that the runs it starts inherit
# it: two processes with torch's 2 threads each on 2 cores slow each other 3-6x.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (each worker's runs take up to ~3 GB). Whole test
    files go to a worker (`--dist loadfile`), so a module-scoped fixture is built once; a session
    fixture (smoke_run, default_run) once per worker that needs it."""
    return min(CORES, 4)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPECTRAQLORA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One causal-LM smoke train through the CLI, shared by the CLI, telemetry and security
    tests: tiny_llama in 4-bit, logger=wandb (offline), fake tokens in its environment."""
    tmp = tmp_path_factory.mktemp("smoke")
    run_dir = tmp / "run"
    result = run_cli("train", "model=tiny_llama", "selection.top_frac=0.25", "trainer=smoke",
                     "logger=wandb", f"hydra.run.dir={run_dir}", cwd=tmp,
                     env={**SECRETS, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The README's default job (MiniLM on the synthetic set), shared by the CLI and export tests."""
    tmp = tmp_path_factory.mktemp("default")
    run_dir = tmp / "run"
    result = run_cli("train", f"hydra.run.dir={run_dir}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result
