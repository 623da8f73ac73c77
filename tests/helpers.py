"""What several test files share: the checkout's root, the CLI as a user types it, fake secrets,
the gated sweep app's driver, one training run in this process. Fixtures stay in conftest.py."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A 4-bit tiny_llama smoke run with checkpoints every 5 steps (the recovery and refusal tests)
SMOKE = ("model=tiny_llama", "trainer=smoke", "selection=random", "trainer.save_steps=5", "dataset.eval_size=64")


def typed_config(*overrides: str):
    """The typed config of these overrides, or the UserError the command line would print: what
    Hydra refuses while composing (a key the strategy does not read) said as the CLI says it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from spectraqlora.cli import describe
    from spectraqlora.config import compose, to_train_config
    from spectraqlora.errors import UserError

    try:
        composed = compose(*overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(describe(exc, "train")) from None
    return to_train_config(composed)


def smoke_config(*overrides):
    return typed_config(*SMOKE, *overrides)


def run_cli(module: str, *overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m spectraqlora.<module> overrides...` as a user types it."""
    return subprocess.run([sys.executable, "-m", f"spectraqlora.{module}", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})


SECRETS = {"HF_TOKEN": "hf_FAKEtoken1234567890", "HUGGING_FACE_HUB_TOKEN": "hf_FAKEother0987",
           "WANDB_API_KEY": "FAKEwandbkey" + "0" * 28}


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
    """One training run in this process: both phases of recipe.run on a plan of this config."""
    from spectraqlora.run import recipe
    from spectraqlora.run.telemetry import RunInfo

    return recipe.run(recipe.Plan(cfg, Path(run_dir), info or RunInfo()))


def reference_snr(weight):
    """Spectrum's formula, fp32 svdvals, written out here independently of spectraqlora.spectrum.snr."""
    import torch

    w = weight.float()
    s = torch.linalg.svdvals(w)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    beta = min(w.shape) / max(w.shape)
    edge = sigma * (1 + beta ** 0.5)
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    if (s > edge).sum() == 0:
        return 0.0
    if (s <= edge).sum() == 0:
        noise = torch.tensor(1.0)
    return float(signal / noise / s[0])
