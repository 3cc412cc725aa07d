"""The physical paged KV cache: per layer, K and V tensors [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch

from worker.model_config import ModelConfig

DEFAULT_CPU_KV_BYTES = 1 << 30


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


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
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_layers)
    ]
