"""The worker's engine: applies each step's diff to its persistent batch, runs one flat forward
over all scheduled tokens (decodes first, then prefill chunks), and samples.

The worker never allocates KV blocks: it writes where the scheduler's block ids say, and rejects
ids outside its pool.

On CUDA the attention runs in Triton kernels (worker.attention_backend), decode-only steps replay
CUDA graphs (worker.cuda_graph) and small decode batches split long contexts across more
programs. On CPU none of that runs: the step is the torch path, unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from services.sampling_params import SamplingParams
from services.step import NewRequest, StepInput, StepOutput, WorkerCapacity
from worker import cpu_kernels, kv_cache
from worker.attention import AttentionMetadata
from worker.attention_backend import (
    choose_num_kv_splits,
    get_attention_backend,
    resolve_attention_backend,
    with_decode_kernel,
)
from worker.cpu_memory import bound_onednn_caches, keep_freed_memory, release_freed_memory
from worker.cuda_graph import DecodeGraphs, pad_decode_batch
from worker.loader import load_model
from worker.model_config import ModelConfig, resolve_dtype
from worker.sampler import SamplingRow, sample


@dataclass(slots=True)
class RequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "cpu",
        block_size: int = 16,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        num_threads: int | None = None,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        max_num_seqs: int = 128,
    ) -> None:
        """attention_backend: auto (triton on CUDA, torch on CPU), torch or triton. kv_cache_dtype:
        auto (the model's dtype) or int8 (worker.kv_quant; the torch backend only). enforce_eager:
        no CUDA graphs. max_num_seqs: the largest decode batch captured in a graph (the
        scheduler's limit; larger batches would run eagerly)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg = ModelConfig.from_dir(model)
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.block_size = block_size
        self.max_model_len = max_model_len or self.cfg.max_position_embeddings
        window = self.cfg.sliding_window
        if window and self.max_model_len > window:
            # Sliding-window attention is not implemented; within the window it equals full attention.
            if max_model_len:
                raise ValueError(
                    f"max_model_len {max_model_len} exceeds the model's sliding window {window}, "
                    "which pagemesh does not implement yet"
                )
            self.max_model_len = window
        if self.max_model_len > self.cfg.max_position_embeddings and not self.cfg.rope_scaling:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        self.kv_cache_dtype = kv_cache.cache_dtype(kv_cache_dtype, self.dtype)
        if self.kv_cache_dtype == torch.int8 and (device != "cpu" or attention_backend == "triton"):
            raise ValueError("kv_cache_dtype int8 runs on the CPU's torch attention backend only")
        self.attention_backend = resolve_attention_backend(attention_backend, device)
        if device == "cpu":
            bound_onednn_caches()  # before loading: packing the linears creates the first primitives
        self.model = load_model(self.cfg, self.dtype, device, self.max_model_len)
        self.num_blocks = kv_cache.num_blocks_for(
            self.cfg, block_size, self.kv_cache_dtype, device, kv_cache_memory, gpu_memory_utilization
        )
        self.kv_caches = kv_cache.allocate(self.cfg, self.num_blocks, block_size, self.kv_cache_dtype, device)
        self.requests: dict[str, RequestState] = {}
        if device == "cpu":  # loading's temporaries go back to the OS; steps' activations stay (cpu_memory)
            release_freed_memory()
            keep_freed_memory()

        backend = get_attention_backend(self.attention_backend)
        # Which C++ kernels of worker.cpu_kernels run ("" for none): reported at load. Half
        # precision on the CPU only; float32 stays the transformers-exact torch path.
        self.cpu_kernels = ""
        cpu_half = device == "cpu" and self.dtype != torch.float32 and self.attention_backend == "torch"
        kernels = cpu_kernels.load() if cpu_half else None  # built once per machine, not in a step
        if kernels is not None:
            backend = with_decode_kernel(kernels.decode_attention)
            self.cpu_kernels = "decode attention"
            if self.dtype == torch.bfloat16:
                self.model.use_cpu_ops(kernels)
                self.cpu_kernels += ", fused layer ops"
        self.model.set_attention_backend(backend)
        on_triton_gpu = self.attention_backend == "triton" and device.startswith("cuda")
        # SM count for the split-KV policy; 0 (never split) off the GPU.
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_triton_gpu else 0
        self.decode_graphs: DecodeGraphs | None = None
        if on_triton_gpu and not enforce_eager:
            with torch.inference_mode():
                self.decode_graphs = DecodeGraphs(
                    self.model,
                    self.kv_caches,
                    max_batch_size=max_num_seqs,
                    max_model_len=self.max_model_len,
                    num_sms=self.num_sms,
                )

    @property
    def capacity(self) -> WorkerCapacity:
        return WorkerCapacity(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device,
            vocab_size=self.cfg.vocab_size,
            eos_token_ids=list(self.cfg.eos_token_ids),
        )

    # -- the persistent batch -------------------------------------------------------------

    def _check_blocks(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} outside this worker's pool of {self.num_blocks}")

    def _add(self, r: NewRequest) -> None:
        self._check_blocks(r.block_ids)
        generator = None
        if r.sampling.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(r.sampling.seed)
        self.requests[r.req_id] = RequestState(
            req_id=r.req_id,
            token_ids=list(r.token_ids),
            num_prompt_tokens=len(r.token_ids) - r.num_output_tokens,
            block_ids=list(r.block_ids),
            num_computed_tokens=r.num_computed_tokens,
            sampling=r.sampling,
            generator=generator,
        )

    def apply_diff(self, step: StepInput) -> None:
        for req_id in step.dropped_req_ids:
            self.requests.pop(req_id, None)
        for new in step.new_requests:
            self._add(new)
        for cached in step.cached_requests:
            state = self.requests[cached.req_id]
            self._check_blocks(cached.new_block_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # -- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        start = time.perf_counter()
        self.apply_diff(step)
        scheduled = [(self.requests[rid], n) for rid, n in step.num_scheduled_tokens.items()]
        if not scheduled:
            return StepOutput(step_id=step.step_id, req_ids=[], token_ids=[], logprobs=[])
        # Decodes first: the torch attention path runs them all as one SDPA.
        scheduled.sort(key=lambda item: item[1] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        block_rows: list[list[int]] = []
        logits_rows: list[int] = []
        sampling_states: list[RequestState] = []
        bs = self.block_size
        for state, n in scheduled:
            lo = state.num_computed_tokens
            hi = lo + n
            if hi > len(state.token_ids) or hi > len(state.block_ids) * bs:
                raise ValueError(
                    f"request {state.req_id}: step covers tokens up to {hi} beyond what it holds"
                )
            input_ids.extend(state.token_ids[lo:hi])
            positions.extend(range(lo, hi))
            blocks = state.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(lo, hi))
            query_start.append(query_start[-1] + n)
            seq_lens.append(hi)
            block_rows.append(blocks[: -(-hi // bs)])
            if hi == len(state.token_ids):
                logits_rows.append(query_start[-1] - 1)
                sampling_states.append(state)
        num_seqs = len(scheduled)
        num_decodes = sum(1 for _, n in scheduled if n == 1)
        decode_only = num_decodes == num_seqs
        dev = self.device
        graphs = self.decode_graphs
        if graphs is not None and (not decode_only or num_seqs > graphs.max_batch_size):
            graphs = None  # prefill and mixed steps, and batches beyond the largest graph, run eagerly
        grid_seqs = graphs.padded_size(num_seqs) if graphs is not None else num_seqs
        num_kv_splits = 1
        if self.num_sms and decode_only:
            # Chosen for the grid the kernels run with: the padded size when a graph is replayed.
            kv_heads = self.cfg.num_kv_heads
            num_kv_splits = choose_num_kv_splits(grid_seqs, kv_heads, max(seq_lens), bs, self.num_sms)
        if graphs is not None:
            batch = pad_decode_batch(input_ids, positions, slots, seq_lens, block_rows, grid_seqs)
            hidden = graphs.run(batch, num_kv_splits)
        else:
            width = max(len(row) for row in block_rows)
            table = torch.tensor([row + [0] * (width - len(row)) for row in block_rows], dtype=torch.int32)
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                block_tables=table.to(dev),
                num_decodes=num_decodes,
                query_start_host=query_start,
                seq_lens_host=seq_lens,
                num_kv_splits=num_kv_splits,
            )
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                self.kv_caches,
                meta,
            )
        for state, n in scheduled:
            state.num_computed_tokens += n

        if not sampling_states:
            return StepOutput(step.step_id, [], [], [], time.perf_counter() - start)
        logits = self.model.compute_logits(hidden[torch.tensor(logits_rows, device=dev)])
        rows = [self._sampling_row(s) for s in sampling_states]
        tokens, logprobs = sample(logits, rows)
        for state, token in zip(sampling_states, tokens, strict=True):
            state.token_ids.append(token)
        return StepOutput(
            step_id=step.step_id,
            req_ids=[s.req_id for s in sampling_states],
            token_ids=tokens,
            logprobs=logprobs,
            compute_seconds=time.perf_counter() - start,
        )

    def _sampling_row(self, state: RequestState) -> SamplingRow:
        p = state.sampling
        num_output = len(state.token_ids) - state.num_prompt_tokens
        banned: list[int] = []
        if num_output < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.cfg.eos_token_ids))
        return SamplingRow(
            params=p,
            generator=state.generator,
            prompt_ids=state.token_ids[: state.num_prompt_tokens] if p.has_penalties else [],
            output_ids=state.token_ids[state.num_prompt_tokens :] if p.has_penalties else [],
            banned_ids=banned,
        )
