"""The run dir contract (README): what a finished run holds, written so a crash never fakes it."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from spectraqlora.errors import UserError

SNR = "snr.json"
SELECTION = "selection.json"
METRICS = "metrics.json"  # written last: its presence means the run finished
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"  # Trainer checkpoints: adapter + optimizer, scheduler, RNG; no base


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


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (its trainer_state.json, written last, parses)."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*"):
        if match := re.fullmatch(r"checkpoint-(\d+)", path.name):
            found.append((int(match[1]), path))
    for _, path in sorted(found, reverse=True):
        try:
            read_json(path / "trainer_state.json")
        except (OSError, ValueError):
            continue  # killed while saving this one
        return path
    return None


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """Where training continues from; refuses to start over a run dir that holds earlier work."""
    run_dir = Path(run_dir)
    last = last_checkpoint(run_dir)
    if not resume and (last or (run_dir / METRICS).exists()):
        held = "a finished run" if (run_dir / METRICS).exists() else f"checkpoints ({last.name})"
        raise UserError(f"{run_dir} already holds {held}: add trainer.resume=true to continue it, "
                        f"or choose another hydra.run.dir")
    return last
