"""Spectrum scan: SNR, condition number and heavy-tail alpha of every candidate weight, read tensor by tensor
from safetensors files.

The model is never loaded: each 2-D weight inside the transformer blocks (module_types.py) is
read alone, cast to fp32 and reduced to its singular values, so memory stays at the size of the
largest single tensor. Results are cached (cache.py).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

from tqdm.auto import tqdm

from spectraqlora.config import RankAllocation, ScanConfig, TrainConfig, show_progress
from spectraqlora.errors import UserError
from spectraqlora.spectrum import cache
from spectraqlora.spectrum.module_types import candidates, module_type
from spectraqlora.spectrum.selection import NEEDS_SNR, restrict_types, select
from spectraqlora.spectrum.snr import condition_number, heavy_tail_alpha, singular_values, snr_from_singular_values
from spectraqlora.store.tensors import read_tensor

log = logging.getLogger("spectraqlora.scan")


def compute(files: list[Path], *, with_snr: bool = True, device: str = "cpu",
            progress: bool = True) -> dict[str, dict]:
    """The snr.json table: {name: {"snr", "kappa", "alpha", "type", "layer", "shape"}} for every
    candidate, computed (no cache): Spectrum's SNR, KappaTune's condition number and the
    heavy-tail exponent alpha, all from one set of singular values per matrix.

    Without with_snr the table lists the candidates with snr, kappa and alpha None (strategies
    that ignore them).
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
                snr = kappa = alpha = None
                if with_snr:
                    s = singular_values(read_tensor(f, c.file, c.name, c.dtype, c.shape, c.offsets).to(device)).cpu()
                    snr, kappa, alpha = snr_from_singular_values(s, *c.shape), condition_number(s), heavy_tail_alpha(s)
                    bar.update()
                table[c.name] = {"snr": snr, "kappa": kappa, "alpha": alpha, "type": module_type(c, multi_stack),
                                 "layer": c.layer, "shape": list(c.shape)}
    bar.close()
    return table


def scan(files: list[Path], cfg: ScanConfig, *, with_snr: bool = True,
         progress: bool = True) -> dict[str, dict]:
    """The SNR table, from the cache when this checkpoint was scanned before."""
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"scan.device={cfg.device} but torch sees no GPU; use scan.device=cpu")
    if not cfg.cache:
        return compute(files, with_snr=with_snr, device=cfg.device, progress=progress)
    key = cache.identity(files)
    entry = Path(cfg.cache_dir) / f"{key}.json"
    table = cache.read_cache(entry, key)
    if table is not None:
        log.info("spectrum scan: cached (%s)", entry)
        return table
    table = compute(files, with_snr=with_snr, device=cfg.device, progress=progress)
    if with_snr:
        log.info("spectrum scan: computed %d matrices, cached as %s", len(table), entry)
        cache.write_cache(entry, key, table)
    return table


def scan_and_select(files: list[Path], cfg: TrainConfig) -> tuple[dict[str, dict], list[str]]:
    """The candidate table (restricted to selection.module_types) and the chosen names."""
    with_snr = (cfg.selection.strategy in NEEDS_SNR
                or cfg.lora.rank_allocation is RankAllocation.snr)
    table = scan(files, cfg.scan, with_snr=with_snr, progress=show_progress(cfg.logger))
    table = restrict_types(table, cfg.selection.module_types)
    return table, select(table, cfg.selection, cfg.seed)
