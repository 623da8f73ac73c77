"""Reading safetensors files without loading a model: a file's header, and one tensor at a time
into its own buffer."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from spectraqlora.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


def read_tensor(f, file: Path, name: str, dtype: str, shape: tuple[int, ...],
                offsets: tuple[int, int]) -> torch.Tensor:
    """One tensor, read with plain file reads into its own buffer. Not mmap: mapped pages of a
    checkpoint count as the process's resident memory for as long as the file stays open."""
    begin, end = offsets
    buffer = bytearray(end - begin)
    f.seek(begin)
    if f.readinto(buffer) != len(buffer):
        raise UserError(f"{file} is truncated: {name} runs past its end")
    return torch.frombuffer(buffer, dtype=DTYPES[dtype]).reshape(shape)
