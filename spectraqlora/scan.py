"""Spectrum scan: SNR (and condition number) of every candidate weight, read tensor by tensor
from safetensors files.

The model is never loaded: each 2-D weight inside the transformer blocks is read alone, cast to
fp32 and reduced to its singular values, so memory stays at the size of the largest single tensor.

Module type rule: the exact name suffix after the layer index (`model.layers.3.self_attn.q_proj`
has type `self_attn.q_proj`). Spectrum's own script groups by substring, which in BERT merges
`attention.output.dense` into `output.dense`; here they are two types. When a checkpoint has more
than one stack of layers (T5's encoder and decoder, vision and text towers) the stack is part of
the type (`encoder.block.layer.0.SelfAttention.q`), since equal suffixes there are different
matrices. Mixture-of-experts weights drop the expert index (`mlp.experts.5.gate_proj` has type
`mlp.experts.gate_proj`), so every expert matrix is ranked against the same projection of all
experts of all layers.

Results are cached under `scan.cache_dir`, keyed by the checkpoint's identity and SCAN_VERSION.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
import torch
from tqdm.auto import tqdm

from spectraqlora import checkpoint, rundir
from spectraqlora.config import CONF_DIR, RankAllocation, ScanConfig, TrainConfig, to_train_config
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.selection import NEEDS_SNR, select, selection_record
from spectraqlora.snr import condition_number, singular_values, snr_from_singular_values
from spectraqlora.telemetry import show_progress

log = logging.getLogger("spectraqlora.scan")

SCAN_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json"]
SCAN_VERSION = 2  # bump when the table's fields, the SNR, the candidate rule or the type rule change
_LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<suffix>.+)\.weight$")
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Candidate:
    name: str  # module name as in the checkpoint, without `.weight`
    stack: str
    layer: int
    suffix: str
    shape: tuple[int, ...]
    file: Path
    dtype: str
    offsets: tuple[int, int]  # absolute byte range of the tensor in the file


def read_header(file: Path) -> tuple[int, dict, bytes]:
    """(where tensor data starts, the parsed header, its raw bytes) of a safetensors file."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            raw = f.read(length)
        if len(raw) != length:
            raise ValueError("header shorter than announced")
        header = json.loads(raw)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    needed = 8 + length + max((m["data_offsets"][1] for m in header.values()), default=0)
    if (size := file.stat().st_size) < needed:
        raise UserError(f"{file} is truncated: {size} bytes, its header describes {needed}")
    return 8 + length, header, raw


def read_tensor(f, c: Candidate) -> torch.Tensor:
    """One tensor, read with plain file reads into its own buffer. Not mmap: mapped pages of a
    checkpoint count as the process's resident memory for as long as the file stays open."""
    begin, end = c.offsets
    buffer = bytearray(end - begin)
    f.seek(begin)
    if f.readinto(buffer) != len(buffer):
        raise UserError(f"{c.file} is truncated: {c.name}.weight runs past its end")
    return torch.frombuffer(buffer, dtype=_DTYPES[c.dtype]).reshape(c.shape)


def candidates(files: list[Path]) -> list[Candidate]:
    """Every 2-D float weight inside a numbered layer block, from the files' headers only."""
    found = []
    for file in files:
        start, header, _ = read_header(file)
        for key, meta in header.items():
            m = _LAYER.match(key)
            if not m or len(meta["shape"]) != 2 or meta["dtype"] not in _DTYPES:
                continue
            begin, end = meta["data_offsets"]
            found.append(Candidate(key[: -len(".weight")], m["stack"], int(m["layer"]), m["suffix"],
                                   tuple(meta["shape"]), file, meta["dtype"],
                                   (start + begin, start + end)))
    return found


def module_type(c: Candidate, multi_stack: bool) -> str:
    suffix = _EXPERT.sub(r"\1experts.", c.suffix)
    return f"{c.stack}.{suffix}" if multi_stack else suffix


def compute(files: list[Path], *, with_snr: bool = True, device: str = "cpu",
            progress: bool = True) -> dict[str, dict]:
    """The snr.json table: {name: {"snr", "kappa", "type", "layer", "shape"}} for every
    candidate, computed (no cache): Spectrum's SNR and KappaTune's condition number, both from
    one set of singular values per matrix.

    Without with_snr the table lists the candidates with snr and kappa None (strategies that
    ignore them).
    """
    found = candidates(files)
    if not found:
        raise UserError("the checkpoint has no 2-D weights inside numbered layer blocks to adapt")
    multi_stack = len({c.stack for c in found}) > 1
    table = {}
    bar = tqdm(total=len(found), desc="spectrum scan", unit="matrix",
               disable=not (progress and with_snr))
    for file, group in itertools.groupby(found, key=lambda c: c.file):  # found is in file order
        with open(file, "rb") as f:
            for c in group:
                snr = kappa = None
                if with_snr:
                    s = singular_values(read_tensor(f, c).to(device))
                    snr, kappa = snr_from_singular_values(s, *c.shape), condition_number(s)
                    bar.update()
                table[c.name] = {"snr": snr, "kappa": kappa, "type": module_type(c, multi_stack),
                                 "layer": c.layer, "shape": list(c.shape)}
    bar.close()
    return table


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


def scan(files: list[Path], cfg: ScanConfig, *, with_snr: bool = True,
         progress: bool = True) -> dict[str, dict]:
    """The SNR table, from the cache when this checkpoint was scanned before."""
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"scan.device={cfg.device} but torch sees no GPU; use scan.device=cpu")
    if not cfg.cache:
        return compute(files, with_snr=with_snr, device=cfg.device, progress=progress)
    key = identity(files)
    entry = Path(cfg.cache_dir) / f"{key}.json"
    table = read_cache(entry, key)
    if table is not None:
        log.info("spectrum scan: cached (%s)", entry)
        return table
    table = compute(files, with_snr=with_snr, device=cfg.device, progress=progress)
    if with_snr:
        log.info("spectrum scan: computed %d matrices, cached as %s", len(table), entry)
        entry.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_json(entry, {"key": key, "version": SCAN_VERSION, "table": table,
                                  "sha256": _digest(table)})
    return table


def restrict_types(table: dict[str, dict], module_types: list[str] | None) -> dict[str, dict]:
    """Only the rows of the candidate types; an unknown type is an error listing the known."""
    if module_types is None:
        return table
    known = sorted({row["type"] for row in table.values()})
    unknown = [t for t in module_types if t not in known]
    if unknown:
        raise UserError(f"selection.module_types: {', '.join(unknown)} matches no module of "
                        f"this model; its types are: {', '.join(known)}")
    return {name: row for name, row in table.items() if row["type"] in module_types}


def scan_and_select(files: list[Path], cfg: TrainConfig) -> tuple[dict[str, dict], list[str]]:
    """The candidate table (restricted to selection.module_types) and the chosen names."""
    with_snr = (cfg.selection.strategy in NEEDS_SNR
                or cfg.lora.rank_allocation is RankAllocation.snr)
    table = scan(files, cfg.scan, with_snr=with_snr, progress=show_progress(cfg.logger))
    table = restrict_types(table, cfg.selection.module_types)
    return table, select(table, cfg.selection, cfg.seed)


def run(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Scan (fetching only safetensors from a hub), select, and write the scan's run dir."""
    from spectraqlora import exports, telemetry

    telemetry.configure_progress(show_progress(cfg.logger))  # a GGUF conversion's bars too
    path = checkpoint.resolve(cfg.model, SCAN_PATTERNS)
    table, chosen = scan_and_select(checkpoint.safetensors_files(path), cfg)
    exports.write_all(run_dir, table, chosen, exports.slug(cfg.model.name_or_path),
                      cfg.selection.top_frac)
    rundir.write_json(run_dir / rundir.SELECTION, selection_record(cfg.selection, chosen))
    log.info("spectrum scan of %s: %d candidates, %d selected (%s)\n%s", cfg.model.name_or_path,
             len(table), len(chosen), cfg.selection.strategy.value, exports.summary(table, chosen))
    log.info("wrote %s", run_dir)
    return chosen


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="scan")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        run(to_train_config(cfg), Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
