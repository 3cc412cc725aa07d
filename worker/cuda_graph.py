"""CUDA graphs for decode-only steps (CUDA + Triton attention backend; off with --enforce-eager).

Why: at small batch a decode step is a few hundred small kernels (per layer: norms, projections,
RoPE, KV write, attention, MLP), and launching them one by one from Python costs more than the
GPU needs to run them. A graph captured once per batch size replays them all with one launch.

How:
- Static buffers sized for the largest captured batch: input_ids, positions, slot_mapping,
  seq_lens, block_tables (as wide as max_model_len needs), query_start_loc and the output hidden
  states. A graph reads and writes only these, so a step copies its inputs into their first rows
  and replays.
- A decode batch of n sequences is padded to the next captured size. Padding rows are token 0 at
  position 0 with slot -1 (write_kv_triton skips it: the cache is not touched) and seq_len 1 over
  a block-table row of zeros: they attend to one cache entry of block 0 (read only, always a
  finite value), which keeps every softmax and split-KV merge finite. Their outputs are never read.
- One graph per (batch size, num_kv_splits), because the split count is part of the kernel grid;
  the split counts captured for a size are every value the policy can pick for it
  (attention_backend.kv_split_options). Captured largest first, all in one memory pool.
- query_start_loc of a decode batch is arange(size + 1) whatever the lengths, so it is written
  once. Block-table columns beyond what a step writes may hold ids from an earlier step; the
  kernel never reads them (it stops at each row's seq_len) and they are valid ids anyway.

What makes capture valid: the forward reads no device value back to the host. The Triton wrapper
sizes its grid from tensor shapes and host ints that are fixed per graph (tokens = sequences =
size, num_decodes = size, num_kv_splits); per-step values are read on the device. The metadata's
host lists, which only the torch path reads, are left empty so that nothing can depend on them.
Prefill and mixed steps, and decode batches larger than the largest graph, run eagerly.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from worker.attention import AttentionMetadata
from worker.attention_backend import kv_split_options
from worker.models.llama import LlamaForCausalLM

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size (capped at 512):
    fine steps where decode batches are small, padding of at most 15 rows above that."""
    top = max(1, min(max_batch_size, MAX_CAPTURE_SIZE))
    sizes = [s for s in [1, 2, 4, 8, *range(16, top + 1, 16)] if s < top]
    return [*sizes, top]


@dataclass(slots=True)
class PaddedDecode:
    """One decode batch padded to a captured size, on the host."""

    input_ids: torch.Tensor  # [size] int64, 0 on padding rows
    positions: torch.Tensor  # [size] int64, 0 on padding rows
    slot_mapping: torch.Tensor  # [size] int64, -1 on padding rows: no KV write
    seq_lens: torch.Tensor  # [size] int32, 1 on padding rows
    block_tables: torch.Tensor  # [size, width] int32, 0-padded; width = the most blocks a row uses


def pad_decode_batch(
    input_ids: list[int],
    positions: list[int],
    slots: list[int],
    seq_lens: list[int],
    block_rows: list[list[int]],
    size: int,
) -> PaddedDecode:
    """Host inputs of n decode sequences (one token each) padded to `size` rows."""
    n = len(input_ids)
    assert 0 < n <= size, (n, size)
    assert len(positions) == len(slots) == len(seq_lens) == len(block_rows) == n
    pad = size - n
    width = max(len(row) for row in block_rows)
    table = [row + [0] * (width - len(row)) for row in block_rows] + [[0] * width] * pad
    return PaddedDecode(
        input_ids=torch.tensor(input_ids + [0] * pad, dtype=torch.int64),
        positions=torch.tensor(positions + [0] * pad, dtype=torch.int64),
        slot_mapping=torch.tensor(slots + [-1] * pad, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens + [1] * pad, dtype=torch.int32),
        block_tables=torch.tensor(table, dtype=torch.int32),
    )


class DecodeGraphs:
    """Captured decode forwards and their static buffers.

    capture=False keeps everything but the capture: each "replay" runs the same static-buffer
    forward eagerly. That is how the padding and buffer plumbing is tested on CPU, where there is
    no graph to capture."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_batch_size: int,
        max_model_len: int,
        num_sms: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        k_cache = kv_caches[0][0]
        self.block_size, self.num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        self.num_sms = num_sms
        self.sizes = capture_sizes(max_batch_size)
        max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // self.block_size)
        dev = k_cache.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.output = torch.zeros((max_bs, model.cfg.hidden_size), dtype=k_cache.dtype, device=dev)

        self.replays: dict[tuple[int, int], Callable[[], None]] = {}
        keys = [
            (size, splits)
            for size in reversed(self.sizes)  # largest first: the others fit in its memory pool
            for splits in kv_split_options(size, self.num_kv_heads, max_model_len, self.block_size, num_sms)
        ]
        if not capture:
            self.replays = {key: partial(self._forward, *key) for key in keys}
            return
        start = time.perf_counter()
        # One memory pool for all graphs. Safe in any replay order: every tensor a capture allocates
        # is dead when it ends (the result is copied into self.output, allocated outside the pool),
        # so no graph's memory holds anything another graph needs.
        pool = torch.cuda.graph_pool_handle()
        done: set[int] = set()
        for size, splits in keys:
            # Warm-up outside the capture: Triton compiles (and loads) this size's kernel variants and
            # cuBLAS picks its algorithms; neither may happen while a graph is being captured.
            self._forward(size, splits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size, splits)
            self.replays[(size, splits)] = graph.replay
            done.add(size)
            print(f"\rcapturing CUDA graphs: {len(done)}/{len(self.sizes)} batch sizes", end="", flush=True)
        torch.cuda.synchronize()
        print(
            f"\rcaptured {len(keys)} CUDA graphs for {len(self.sizes)} decode batch sizes "
            f"(up to {max_bs}) in {time.perf_counter() - start:.1f}s",
            flush=True,
        )

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, n: int) -> int:
        """The smallest captured size that holds n sequences (n <= max_batch_size)."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def _forward(self, size: int, splits: int) -> None:
        """What a graph holds: one decode forward of `size` rows over the static buffers."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            num_decodes=size,
            query_start_host=[],  # only the torch path reads the host lists; see the module docstring
            seq_lens_host=[],
            num_kv_splits=splits,
        )
        self.output[:size] = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)

    def run(self, batch: PaddedDecode, num_kv_splits: int) -> torch.Tensor:
        """Copy a padded batch into the static buffers and replay its graph. Returns the hidden states
        [size, hidden], a view of the static output that the next replay overwrites."""
        size, width = batch.block_tables.shape
        replay = self.replays[(size, num_kv_splits)]
        # From pageable host memory a non_blocking copy returns once the source is staged, so the
        # host tensors may be dropped right after; the replay is queued behind the copies.
        self.input_ids[:size].copy_(batch.input_ids, non_blocking=True)
        self.positions[:size].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:size].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:size].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:size, :width].copy_(batch.block_tables, non_blocking=True)
        replay()
        return self.output[:size]
