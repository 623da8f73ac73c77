"""The scan's cache: one SNR table per checkpoint under scan.cache_dir, keyed by what the scan
reads (identity) and SCAN_VERSION; an entry that is not whole is scanned again."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from spectraqlora.store import rundir
from spectraqlora.store.tensors import read_header

log = logging.getLogger("spectraqlora.scan")

SCAN_VERSION = 3  # 3: alpha added. Bump when the table's fields, the SNR, the candidate rule or the type rule change


def identity(files: list[Path]) -> str:
    """A key for what the scan reads: per file its name, size, mtime and the sha256 of its
    safetensors header (names, dtypes, shapes, offsets); for files in a hub cache, the blob name,
    which is the content's sha256. Hashing every byte of a 140 GB checkpoint on each run would
    cost minutes; a rewritten file changes its mtime, so the scan is redone (never trusted)."""
    parts = [f"spectraqlora-scan-v{SCAN_VERSION}"]
    for file in files:
        stat = file.stat()
        header = hashlib.sha256(read_header(file)[2]).hexdigest()
        blob = Path(os.path.realpath(file))
        blob_id = blob.name if blob.parent.name == "blobs" else ""
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:{header}:{blob_id}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _digest(table: dict) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def read_cache(entry: Path, key: str) -> dict | None:
    """The cached table, or None when absent or not whole (truncated, edited, other key)."""
    try:
        cached = rundir.read_json(entry)
        if cached["key"] == key and cached["sha256"] == _digest(cached["table"]):
            return cached["table"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        pass
    log.warning("scan cache entry %s is corrupt; scanning again", entry)
    return None


def write_cache(entry: Path, key: str, table: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(entry, {"key": key, "version": SCAN_VERSION, "table": table, "sha256": _digest(table)})
