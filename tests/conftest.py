import os
import subprocess
import sys
from pathlib import Path

import pytest

from spectraqlora.config import compose  # noqa: F401 (the tests' import)

# No hub at test time; generated checkpoints go to a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPECTRAQLORA_CACHE"] = str(path)
    return path


def run_cli(module: str, *overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m spectraqlora.<module> overrides...` as a user types it."""
    return subprocess.run([sys.executable, "-m", f"spectraqlora.{module}", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})


SECRETS = {"HF_TOKEN": "hf_FAKEtoken1234567890", "HUGGING_FACE_HUB_TOKEN": "hf_FAKEother0987",
           "WANDB_API_KEY": "FAKEwandbkey" + "0" * 28}


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


class Gate:
    """Drives tests/apps/gated.py: which trial each worker started, and releasing them."""

    def __init__(self, path: Path):
        self.path, self.released = path, set()
        path.mkdir()

    def started(self) -> list[tuple[int, int]]:
        """(trial, worker pid) for every trial started so far, a trial twice if run twice."""
        return sorted((int(num), int(pid)) for _, num, pid in
                      (f.name.split(".") for f in self.path.glob("started.*")))

    def release(self, trial: int) -> None:
        (self.path / f"release.{trial}").touch()
        self.released.add(trial)


def train_run(cfg, run_dir: Path, info=None) -> dict:
    """One training run in this process, as recipe.train runs a single run's plan."""
    from spectraqlora import recipe
    from spectraqlora.telemetry import RunInfo

    return recipe.train(recipe.Plan(cfg, Path(run_dir), info or RunInfo()))
