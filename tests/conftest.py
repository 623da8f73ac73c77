import os
import subprocess
import sys
from pathlib import Path

import pytest

# No hub at test time; generated checkpoints go to a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPECTRAQLORA_CACHE"] = str(path)
    return path


def run_cli(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m spectraqlora.<module> overrides...` as a user types it."""
    return subprocess.run([sys.executable, "-m", f"spectraqlora.{module}", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def compose(*overrides: str):
    """The composed train config, as Hydra builds it for those overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from spectraqlora.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))
