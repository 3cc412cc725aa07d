"""Reading a .safetensors file one tensor at a time, with pread.

safetensors' own `safe_open` maps the whole file and hands out views of the mapping; every page a
view touches stays in the process's resident memory until the last view is gone, so loading
SmolLM2's fp32 checkpoint (540 MB) into bf16 parameters peaked at the parameters plus the whole
file. Reading each tensor into a buffer of its own keeps the peak at the parameters plus the
largest tensor. The format: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}} (offsets relative to the end of the header), the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(slots=True)
class SafetensorsFile:
    """An open .safetensors file (a context manager: leaving it closes the file)."""

    path: Path
    fd: int
    data_start: int  # byte offset of the data section
    entries: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, header_len, 8))
        except BaseException:
            os.close(fd)
            raise
        header.pop("__metadata__", None)
        return cls(path, fd, 8 + header_len, header)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # one kept for lookups (worker.file_embedding) closes with its model
        self.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(
                f"model: tensor {name!r} of {self.path.name} has dtype {code}, which pagemesh does not read"
            )
        return DTYPES[code]

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def offset(self, name: str) -> int:
        """Byte offset of the tensor's data in the file."""
        return self.data_start + self.entries[name]["data_offsets"][0]

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read into memory of its own."""
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        start, end = self.entries[name]["data_offsets"]
        if end - start != tensor.numel() * tensor.element_size():
            raise ValueError(
                f"model: tensor {name!r} of {self.path.name} is {end - start} bytes, not its shape's"
            )
        buffer = tensor.reshape(-1).view(torch.uint8).numpy().data  # a memoryview of its bytes
        if not pread_exact(self.fd, buffer, self.data_start + start):
            raise ValueError(f"model: {self.path.name} ends inside tensor {name!r}")
        return tensor


def pread_exact(fd: int, buffer: memoryview, offset: int) -> bool:
    """Fill buffer from the file at offset (pread may return less than asked); False at end of file."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True
