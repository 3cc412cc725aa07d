"""The physical paged KV cache: per layer, K and V tensors [num_blocks, block_size, kv_heads, row]:
rows of head_dim values in the model's dtype, or, for an int8 cache, head_dim int8 values and
their scale (worker.kv_quant)."""

from __future__ import annotations

import torch

from worker import kv_quant
from worker.model_config import ModelConfig

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype

DEFAULT_CPU_KV_BYTES = 1 << 30


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype -> the cache tensors' dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        choices = ", ".join(KV_CACHE_DTYPES)
        raise ValueError(f"kv_cache_dtype must be one of {choices}; got {kv_cache_dtype!r}")
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


def _row(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return kv_quant.row_bytes(cfg.head_dim) if dtype == torch.int8 else cfg.head_dim


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """dtype: the cache's (cache_dtype)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * _row(cfg, dtype) * elem


def num_blocks_for(
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    kv_cache_memory: int | None,
    gpu_memory_utilization: float,
) -> int:
    """Blocks that fit the budget: --kv-cache-memory bytes if given; on CUDA, what is left of
    gpu_memory_utilization x total after the weights; on CPU a 1 GiB default."""
    if kv_cache_memory is None:
        if device.startswith("cuda"):
            # Blocks the caching allocator holds but no tensor uses (e.g. the fp32 copies the loader
            # casts away) would count as used: give them back first.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            used = total - free
            kv_cache_memory = int(total * gpu_memory_utilization) - used
        else:
            kv_cache_memory = DEFAULT_CPU_KV_BYTES
    blocks = kv_cache_memory // bytes_per_block(cfg, block_size, dtype)
    if blocks < 1:
        raise ValueError(
            f"kv_cache_memory: {kv_cache_memory} bytes holds no block of {block_size} tokens "
            f"({bytes_per_block(cfg, block_size, dtype)} bytes each)"
        )
    return int(blocks)


def allocate(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, _row(cfg, dtype))
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_layers)
    ]
