"""A tied embedding table looked up straight from the checkpoint file (CPU, packed bf16 linears).

With tied embeddings the loader packs a copy of the table for the output projection
(worker.cpu_linear); the plain table is then needed only to look up a step's rows. Keeping it
resident costs vocab x hidden x 2 bytes (SmolLM2: 54 MiB, Llama 3 8B's 128k vocab: 1 GiB) for a
few rows a step, so the lookup reads the checkpoint's own tensor through a read-only mmap instead:
the page cache holds the rows that prompts actually use, shared with other processes and
reclaimable, as llama.cpp's mmap of its GGUF does. Rows are cast to the model dtype as they are
read, which gives the values of casting the whole table first.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def map_safetensor(path: Path, name: str) -> torch.Tensor | None:
    """Tensor `name` of a .safetensors file as a read-only view of the file's pages, or None when
    its dtype is not a float one we read."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after close
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        return None
    start, end = info["data_offsets"]
    with warnings.catch_warnings():  # read-only by design: nothing writes the table
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(
            mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + header_len + start
        )
    return flat.view(info["shape"])


class MappedEmbedding(nn.Module):
    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype  # a plain attribute: no parameter, never copied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).to(self.dtype)
