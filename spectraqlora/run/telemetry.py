"""Where a run's numbers go: metrics.jsonl in the run dir and, with logger=wandb, a W&B run.

Both sinks get the same keys (docs/runs.md, "Telemetry"). W&B is never allowed to fail or stall a
training run: without an API key it logs offline under the run dir, and any W&B error becomes
one warning after which the run goes on with metrics.jsonl alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from spectraqlora.config import Logger, TrainConfig
from spectraqlora.store import rundir

log = logging.getLogger(__name__)

JSONL = "metrics.jsonl"
WANDB_ID = "wandb_id"  # the run's W&B id, so a resumed run continues the same W&B run


@dataclasses.dataclass
class RunInfo:
    """How this run is named and grouped in W&B (from Hydra's overrides and mode)."""

    name: str | None = None
    group: str | None = None
    job_type: str = "train"


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _LibraryNotes(logging.Filter):
    """Library warnings a run's log should carry as one plain line, or not at all:
    bitsandbytes' note that the hub's optional CPU kernel (package `kernels`) is absent, said once
    as what it means; transformers' load report, without its ANSI bold codes, and dropped when
    all it says is that the new classification head is not in the checkpoint (it is trained
    whole: the run says so)."""

    said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "gemm_4bit_forward from kernels-community" in message:
            if "kernels" in self.said:
                return False
            self.said.add("kernels")
            record.msg, record.args = ("bitsandbytes: the CPU 4-bit kernel from the package, not the hub's "
                                       "optional one (pip install kernels)"), ()
            record.levelno, record.levelname = logging.INFO, "INFO"  # a note, nothing to fix
            return True
        if "LOAD REPORT" in message:
            plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
            rows = [line.split("|") for line in plain.splitlines() if line.count("|") >= 2]
            statuses = [(r[0].strip(), r[1].strip()) for r in rows[1:]]  # rows[0]: the header
            from spectraqlora.run.modeling import NEW_HEADS

            if statuses and all(status == "MISSING" and key.split(".")[0] in NEW_HEADS for key, status in statuses):
                return False
            record.msg, record.args = plain, ()
        return True


# Libraries' loggers that repeat one warning per forward pass (quant=int8: 672 casts in 20 steps)
_REPEATERS = ("bitsandbytes.autograd._functions",)
_NOTES = ("bitsandbytes.backends.cpu.ops", "transformers.modeling_utils")  # _LibraryNotes


def quiet_libraries() -> None:
    """Library noise a user cannot act on, said once or not at all: bitsandbytes' per-call cast
    warning once; its kernel note and transformers' load report as _LibraryNotes says;
    FutureWarnings about transformers/peft internals that spectraqlora calls, not the user, not
    at all."""
    import warnings

    for names, kind in ((_REPEATERS, _Once), (_NOTES, _LibraryNotes)):
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


def configure_progress(enabled: bool) -> None:
    """Turn the libraries' own bars (downloads, checkpoint writing, weight loading, dataset
    maps) on or off with ours, without importing the heavy ones before they are needed:
    transformers takes the hub's setting when imported, datasets reads its variable."""
    from huggingface_hub import utils as hub

    quiet_libraries()
    hub.enable_progress_bars() if enabled else hub.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.enable_progress_bar() if enabled else tf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()
    else:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if enabled else "1"


class Telemetry:
    """The sinks of one run: metrics.jsonl (appended, so a resumed run keeps its history) and
    an optional W&B run; none at all for run_dir None (the other ranks of a distributed run)."""

    def __init__(self, run_dir: Path | None, wandb_run=None):
        self.path = None if run_dir is None else Path(run_dir) / JSONL
        self.wandb = wandb_run
        self.location = wandb_location(wandb_run)  # where the W&B run is, for the run's summary

    def log(self, metrics: dict, step: int) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.to_wandb(lambda run: run.log(metrics, step=step))

    def summary(self, metrics: dict) -> None:
        self.to_wandb(lambda run: run.summary.update(metrics))

    def selection(self, table: dict[str, dict], chosen: list[str], heatmap: Path | None) -> None:
        """The SNR table with what was selected, and the heatmap, as W&B media."""
        def send(run):
            import wandb

            picked = set(chosen)
            rows = [[n, e["type"], e["layer"], e["snr"], n in picked] for n, e in table.items()]
            media = {"selection": wandb.Table(columns=["module", "type", "layer", "snr", "selected"],
                                              data=rows)}
            if heatmap is not None and heatmap.is_file():
                media["snr_heatmap"] = wandb.Image(str(heatmap))
            run.log(media, step=0)

        self.to_wandb(send)

    def finish(self, failed: bool) -> None:
        self.to_wandb(lambda run: run.finish(exit_code=1 if failed else 0))
        self.wandb = None

    def to_wandb(self, call) -> None:
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as exc:  # W&B must never fail training
            log.warning("W&B: %s; going on without it (metrics.jsonl keeps every value)",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.wandb = None


@contextlib.contextmanager
def session(cfg: TrainConfig, run_dir: Path, info: RunInfo, main: bool = True):
    """Telemetry for one run; its W&B run is finished however the run ends, so trials of a
    sweep in one process never merge into one W&B run. Only the main process of a distributed
    run logs (`main`)."""
    if not main:
        yield Telemetry(None)
        return
    telemetry = Telemetry(run_dir, start_wandb(cfg, run_dir, info) if cfg.logger.name is Logger.wandb else None)
    if telemetry.location:
        log.info("W&B: %s", telemetry.location)
    failed = True
    try:
        yield telemetry
        failed = False
    finally:
        telemetry.finish(failed)


def start_wandb(cfg: TrainConfig, run_dir: Path, info: RunInfo):
    """A W&B run for this training job, or None (with one warning) when W&B cannot start."""
    return init_wandb(
        project=cfg.logger.project, entity=cfg.logger.entity,
        name=info.name, group=info.group, job_type=info.job_type,
        tags=[cfg.model.name_or_path.rstrip("/").split("/")[-1][:64],
              cfg.selection.strategy.value, cfg.quant.mode.value],
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True),
        dir=str(run_dir), id=_wandb_id(run_dir), resume="allow")


def init_wandb(*, project, entity, **kwargs):
    try:
        import wandb

        return wandb.init(
            project=project or os.environ.get("WANDB_PROJECT"),
            entity=entity or os.environ.get("WANDB_ENTITY"),
            mode=wandb_mode(),
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=60, silent=True),
            **kwargs)
    except Exception as exc:
        log.warning("W&B could not start (%s); going on without it (the files on disk keep every value)",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def wandb_mode() -> str | None:
    """WANDB_MODE when set; offline when no API key is set up (said in one line); else W&B's own."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        return None
    log.info("W&B: no API key, logging offline in the run dir")
    return "offline"


def wandb_location(run) -> str | None:
    """The W&B run's URL, or for an offline run its dir and the command that uploads it."""
    if run is None:
        return None
    if url := getattr(run, "url", None):
        return url
    offline = Path(run.dir).parent  # <run dir>/wandb/offline-run-<time>-<id>
    return f"offline run in {offline}; upload later: wandb sync {offline}"


def _wandb_id(run_dir: Path) -> str:
    """The W&B run id kept in the run dir, made on the first start."""
    path = Path(run_dir) / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    rundir.write_text(path, run_id)
    return run_id
