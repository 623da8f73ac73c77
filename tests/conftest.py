"""Fixtures every test directory shares; helpers live in tests/helpers.py."""
import os

import pytest

from tests.helpers import SECRETS, run_cli

# No hub at test time; generated checkpoints go to a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")


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
