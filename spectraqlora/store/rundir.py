"""The run dir contract (docs/runs.md): what a finished run holds, written so a crash never fakes it."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback

from spectraqlora.errors import UserError, exit_on_user_error

SNR = "snr.json"
SELECTION = "selection.json"
METRICS = "metrics.json"  # written last: its presence means the run finished
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"  # Trainer checkpoints: adapter + optimizer, scheduler, RNG; no base
LOCK = ".run.lock"  # flock'ed by the process that runs in the dir
RECORD = ".hydra"  # the run's record (config.yaml, hydra.yaml, overrides.yaml), written by the run itself
# What a run writes before it trains: a run refused by then holds nothing more.
BEFORE_TRAINING = {".hydra", "train.log", LOCK, SNR, "snr_heatmap.png"}

_held: dict[Path, int] = {}  # run dir -> fd of its lock, in this process
log = logging.getLogger("spectraqlora.train")


class RunLog(logging.FileHandler):
    """The run's log file (Hydra's `file` handler, conf/train.yaml), opened only once the run has
    claimed its dir and passed its checks on it (open_log): a command refused before that (the dir in use, a resume that does not
    match) never appends to the log of the run it was refused. Records held until then go to
    the file when it opens; the terminal has them either way."""

    def __init__(self, filename, mode="a", encoding=None, delay=False, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is None:
            super().emit(record)
        else:
            self.held.append(record)

    def open_for(self, run_dir: Path) -> None:
        if self.held is not None and Path(self.baseFilename).resolve().parent == run_dir:
            held, self.held = self.held, None
            for record in held:
                super().emit(record)


def write_record(run_dir: Path, files: dict[str, str]) -> None:
    """The run's record, written by the run once it has claimed its dir and starts from step 0
    (never by a refused or resumed command: Hydra's own copy is off, hydra.output_subdir=null)."""
    (Path(run_dir) / RECORD).mkdir(exist_ok=True)
    for name, text in files.items():
        write_text(Path(run_dir) / RECORD / name, text)


def write_text(path: Path, text: str) -> None:
    """Write atomically (temp file in the same dir, fsync, rename): whole or absent."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a result file is as readable as any
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@contextmanager
def building(path: Path):
    """A temp dir beside `path` to write a dir's files into, renamed to `path` at the end of the
    block (whole or absent; another process that finished first wins), removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finished_run(run_dir: Path | None, command: str) -> Path:
    """The run dir a `python -m spectraqlora.<command> run_dir=...` is about, checked finished."""
    if run_dir is None:
        raise UserError(f"which run? python -m spectraqlora.{command} run_dir=<finished run dir> "
                        f"(e.g. outputs/<date>/<time>)")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir}: no such directory")
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir} is not a finished run: it has no {METRICS}")
    return run_dir


def last_checkpoint(run_dir: Path, cut: list[Path] | None = None) -> Path | None:
    """The newest complete Trainer checkpoint (its trainer_state.json, written last, parses);
    the newer ones that are not (killed while saving) are added to `cut`."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*"):
        if match := re.fullmatch(r"checkpoint-(\d+)", path.name):
            found.append((int(match[1]), path))
    for _, path in sorted(found, reverse=True):
        try:
            read_json(path / "trainer_state.json")
        except (OSError, ValueError):
            if cut is not None:
                cut.append(path)
            continue
        return path
    return None


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """Where training continues from; refuses to start over a run dir that holds earlier work."""
    run_dir = Path(run_dir)
    cut: list[Path] = []
    last = last_checkpoint(run_dir, cut)
    if resume and cut:
        log.info("%s %s incomplete (killed while saving): training %s", ", ".join(p.name for p in cut),
                 "is" if len(cut) == 1 else "are", f"continues from {last.name}" if last else
                 "starts over from step 0 (no complete checkpoint is left)")
    if not resume and (last or (run_dir / METRICS).exists()):
        held = "a finished run" if (run_dir / METRICS).exists() else f"checkpoints ({last.name})"
        raise UserError(f"{run_dir} already holds {held}: add trainer.resume=true to continue it, "
                        f"or choose another hydra.run.dir")
    return last


def claim(run_dir: Path) -> None:
    """Lock the run dir for this process's run, or refuse: two runs in one dir would interleave
    their files. An flock on LOCK: the OS drops it on any exit, a crash included, so it never
    goes stale. Released by `release`."""
    import fcntl

    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another run ({holder}): wait for it to end, or "
                        f"choose another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _held[run_dir] = fd


def open_log(run_dir: Path) -> None:
    """The run's log file opens (RunLog): the command has passed its checks on the dir."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLog):
            handler.open_for(Path(run_dir).resolve())


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def finish(run_dir: Path, keep_checkpoints: bool) -> None:
    """After metrics.json: the Trainer's checkpoints go unless trainer.keep_checkpoints."""
    if not keep_checkpoints:
        shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


class CheckDirs(Callback):
    """Hydra callback (conf/train.yaml): the run or sweep dir is created here, before Hydra's
    job starts, so a path that cannot be one (an existing file, a read-only place, /proc) is one
    `error:` line and exit 2, not Hydra's traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        self._create(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._create(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _create(path: str, key: str) -> None:
        with exit_on_user_error():
            if Path(path).exists() and not Path(path).is_dir():
                raise UserError(f"{key}={path} is a file, not a directory: give another {key}")
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{key}={path} cannot be created ({exc.strerror}): give a writable {key}") from None
            if not os.access(path, os.W_OK):
                raise UserError(f"{key}={path} is not writable: give a writable {key}")


def discard_if_untrained(run_dir: Path) -> bool:
    """Remove a run dir that a refused command left with nothing but what comes before training
    (Hydra's .hydra/ and log, the SNR table), unless another run holds it; also Hydra's
    outputs/[scan/]<date>/ folders when that leaves them empty. True when removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= BEFORE_TRAINING:
        return False
    try:
        claim(run_dir)
    except UserError:
        return False
    release(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in list(run_dir.parents)[:3]:  # Hydra's outputs/[scan/]<date>/, if empty
        if folder.name not in ("outputs", "scan") and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", folder.name):
            break
        try:
            folder.rmdir()
        except OSError:  # not empty
            break
    return True
