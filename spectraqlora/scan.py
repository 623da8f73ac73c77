"""Spectrum scan: SNR of every candidate weight, read tensor by tensor from safetensors files.

The model is never loaded: each 2-D weight inside the transformer blocks is read alone, cast to
fp32 and reduced to its SNR, so memory stays at the size of the largest single tensor.

Module type rule: the exact name suffix after the layer index (`model.layers.3.self_attn.q_proj`
has type `self_attn.q_proj`). Spectrum's own script groups by substring, which in BERT merges
`attention.output.dense` into `output.dense`; here they are two types. When a checkpoint has more
than one stack of layers (T5's encoder and decoder, vision and text towers) the stack is part of
the type (`encoder.block.layer.0.SelfAttention.q`), since equal suffixes there are different
matrices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from spectraqlora.errors import UserError
from spectraqlora.snr import spectrum_snr

_LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<suffix>.+)\.weight$")


@dataclass(frozen=True)
class Candidate:
    name: str  # module name as in the checkpoint, without `.weight`
    stack: str
    layer: int
    suffix: str
    shape: tuple[int, ...]
    file: Path


def candidates(files: list[Path]) -> list[Candidate]:
    """Every 2-D weight that sits inside a numbered layer block, from the files' headers only."""
    found = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                m = _LAYER.match(key)
                if not m:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if len(shape) != 2:
                    continue
                found.append(Candidate(key[: -len(".weight")], m["stack"], int(m["layer"]),
                                       m["suffix"], shape, file))
    return found


def module_type(c: Candidate, multi_stack: bool) -> str:
    return f"{c.stack}.{c.suffix}" if multi_stack else c.suffix


def scan(files: list[Path], *, module_types: list[str] | None = None, with_snr: bool = True,
         device: str = "cpu", progress: bool = True) -> dict[str, dict]:
    """The snr.json table: {name: {"snr", "type", "layer", "shape"}} for every candidate of the
    given module types (None: all).

    Without with_snr the table lists the candidates with snr None (strategies that ignore it).
    """
    found = candidates(files)
    multi_stack = len({c.stack for c in found}) > 1
    if not found:
        raise UserError("the checkpoint has no 2-D weights inside numbered layer blocks to adapt")
    if module_types is not None:
        known = sorted({module_type(c, multi_stack) for c in found})
        unknown = [t for t in module_types if t not in known]
        if unknown:
            raise UserError(f"selection.module_types: {', '.join(unknown)} matches no module of "
                            f"this model; its types are: {', '.join(known)}")
        found = [c for c in found if module_type(c, multi_stack) in module_types]
    table = {}
    by_file: dict[Path, list[Candidate]] = {}
    for c in found:
        by_file.setdefault(c.file, []).append(c)
    bar = tqdm(total=len(found), desc="spectrum scan", unit="matrix",
               disable=not (progress and with_snr))
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for c in group:
                snr = None
                if with_snr:
                    snr = spectrum_snr(f.get_tensor(c.name + ".weight").to(device))
                    bar.update()
                table[c.name] = {"snr": snr, "type": module_type(c, multi_stack),
                                 "layer": c.layer, "shape": list(c.shape)}
    bar.close()
    return table
