"""The run dir contract (README): what a finished run holds, written so a crash never fakes it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SNR = "snr.json"
SELECTION = "selection.json"
METRICS = "metrics.json"  # written last: its presence means the run finished
ADAPTER = "adapter"


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
