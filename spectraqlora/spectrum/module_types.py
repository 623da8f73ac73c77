"""What the scan ranks: the candidate matrices of a checkpoint, found from its safetensors
headers alone, and the type each belongs to.

Module type rule: the exact name suffix after the layer index (`model.layers.3.self_attn.q_proj`
has type `self_attn.q_proj`). Spectrum's own script groups by substring, which in BERT merges
`attention.output.dense` into `output.dense`; here they are two types. When a checkpoint has more
than one stack of layers (T5's encoder and decoder, vision and text towers) the stack is part of
the type (`encoder.block.layer.0.SelfAttention.q`), since equal suffixes there are different
matrices. Mixture-of-experts weights drop the expert index (`mlp.experts.5.gate_proj` has type
`mlp.experts.gate_proj`), so every expert matrix is ranked against the same projection of all
experts of all layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spectraqlora.store.tensors import DTYPES, read_header

_LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<suffix>.+)\.weight$")
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


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


def candidates(files: list[Path]) -> list[Candidate]:
    """Every 2-D float weight inside a numbered layer block, from the files' headers only."""
    found = []
    for file in files:
        start, header, _ = read_header(file)
        for key, meta in header.items():
            m = _LAYER.match(key)
            if not m or len(meta["shape"]) != 2 or meta["dtype"] not in DTYPES:
                continue
            begin, end = meta["data_offsets"]
            found.append(Candidate(key[: -len(".weight")], m["stack"], int(m["layer"]), m["suffix"],
                                   tuple(meta["shape"]), file, meta["dtype"],
                                   (start + begin, start + end)))
    return found


def module_type(c: Candidate, multi_stack: bool) -> str:
    suffix = _EXPERT.sub(r"\1experts.", c.suffix)
    return f"{c.stack}.{suffix}" if multi_stack else suffix
