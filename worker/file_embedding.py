"""A tied embedding table looked up straight from the checkpoint file (CPU, packed bf16 linears).

With tied embeddings the loader packs a copy of the table for the output projection
(worker.cpu_linear); the plain table is then needed only to look up a step's rows. Keeping it
resident costs vocab x hidden x 2 bytes (SmolLM2: 54 MiB, Llama 3 8B's 128k vocab: 1 GiB) for a
few rows a step, so each step reads its rows from the checkpoint file instead (pread, through the
page cache, which is shared with other processes and reclaimable). Not through a mapping of the
file: the kernel maps 64 KiB around each row faulted in, and 32 prompts of random token ids made 99 MiB
of SmolLM2's 108 MiB fp32 table resident in the worker (worker/csrc/read_rows.cpp). Rows are cast
to the model dtype as they are read, which gives the values of casting the whole table first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from worker import cpu_kernels
from worker.safetensors_file import SafetensorsFile, pread_exact


class FileEmbedding(nn.Module):
    def __init__(self, checkpoint: SafetensorsFile, name: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.checkpoint = checkpoint  # kept open for the worker's lifetime
        self.offset = checkpoint.offset(name)
        rows, cols = checkpoint.shape(name)
        self.shape, self.file_dtype, self.dtype = (rows, cols), checkpoint.dtype(name), dtype
        self.kernels = cpu_kernels.load()

    @classmethod
    def from_safetensors(cls, path: Path, name: str, dtype: torch.dtype) -> FileEmbedding | None:
        """Tensor `name` of a .safetensors file, or None when it is not a 2-D floating-point one."""
        checkpoint = SafetensorsFile.open(path)
        file_dtype = checkpoint.dtype(name)
        if len(checkpoint.shape(name)) != 2 or not file_dtype.is_floating_point or file_dtype.itemsize == 1:
            checkpoint.close()
            return None
        return cls(checkpoint, name, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        out = torch.empty(flat.numel(), self.shape[1], dtype=self.file_dtype)
        if self.kernels is not None:
            self.kernels.read_rows(self.checkpoint.fd, self.offset, self.shape[0], flat, out)
        else:
            self._read_rows(flat, out)
        return out.to(self.dtype).view(*ids.shape, self.shape[1])

    def _read_rows(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """read_rows.cpp's loop in Python, where the CPU kernels cannot be built."""
        rows = out.view(torch.uint8).numpy()
        row_bytes = rows.shape[1]
        for i, index in enumerate(ids.tolist()):
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"index {index} is out of range for {self.shape[0]} embedding rows")
            if not pread_exact(self.checkpoint.fd, rows[i].data, self.offset + index * row_bytes):
                raise ValueError(f"{self.checkpoint.path.name} ends inside the embedding table")
