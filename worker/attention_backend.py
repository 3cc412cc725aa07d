"""Which paged-attention implementation the model's layers call, and how the Triton one splits KV.

Two backends with one contract (worker.attention's): `write_kv` scatters this step's k, v into
the cache, `attention` reads the cache for the flat batch.
- "torch": worker.attention. The CPU path, and the reference the kernels are tested against.
- "triton": worker.triton_attention. One launch for the whole mixed batch, no host reads, so
  decode steps can be captured in CUDA graphs (worker.cuda_graph).
"auto" is triton on CUDA when triton imports, torch otherwise. Forcing triton on CPU runs the
kernels in Triton's interpreter: correct but very slow, for tests only.

triton is imported only when the triton backend is chosen: on CPU, importing it before
TRITON_INTERPRET=1 is set would make its kernels unusable there for the rest of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from worker.attention import AttentionMetadata, DecodeKernel, paged_attention, write_kv

BACKEND_CHOICES = ("auto", "torch", "triton")

WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float],
    torch.Tensor,
]


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    write_kv: WriteKV  # (k, v, k_cache, v_cache, slot_mapping)
    attention: Attend  # (q, k, v, k_cache, v_cache, meta, scale) -> [T, heads, head_dim]


TORCH_BACKEND = AttentionBackend("torch", write_kv, paged_attention)


def with_decode_kernel(kernel: DecodeKernel) -> AttentionBackend:
    """The torch backend with its decodes run by `kernel` (on CPU: worker.cpu_kernels'
    decode_attention, chosen once by the runner for half-precision models)."""
    return replace(TORCH_BACKEND, attention=partial(paged_attention, decode_kernel=kernel))


def resolve_attention_backend(name: str, device: str) -> str:
    """'auto' | 'torch' | 'triton' -> 'torch' | 'triton', refusing a triton that cannot run here."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKEND_CHOICES)}; got {name!r}")
    on_cuda = device.startswith("cuda")
    if name == "auto":
        # Short-circuit: on CPU, auto never touches triton (see the module docstring).
        return "triton" if on_cuda and _triton_imports() else "torch"
    if name == "triton":
        if not _triton_imports():
            raise ValueError("attention_backend 'triton': triton cannot be imported")
        if not on_cuda and not triton_interpreter_active():
            raise ValueError(
                "attention_backend 'triton' on CPU runs Triton's interpreter (slow, for tests): set "
                "TRITON_INTERPRET=1 before triton is first imported in this process"
            )
    return name


def _triton_imports() -> bool:
    from worker.triton_attention import triton_available

    return triton_available()


def get_attention_backend(name: str) -> AttentionBackend:
    """The functions of a resolved backend name."""
    if name == "torch":
        return TORCH_BACKEND
    if name != "triton":
        raise ValueError(f"unknown attention backend {name!r}")
    from worker.triton_attention import unified_attention_triton, write_kv_triton

    def triton_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # This step's k, v are already in the cache (write_kv runs first); the kernel reads them there.
        return unified_attention_triton(q, k_cache, v_cache, meta, scale, meta.num_kv_splits)

    return AttentionBackend("triton", write_kv_triton, triton_attention)


def triton_interpreter_active() -> bool:
    """True when triton and our kernels were both built for the interpreter (TRITON_INTERPRET=1 was
    set before triton's first import): only then can the kernels run on CPU tensors."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from worker import triton_attention

    return isinstance(tl.cdiv, InterpretedFunction) and isinstance(
        triton_attention._unified_attention_kernel, InterpretedFunction
    )


# -- split-KV (flash-decoding) policy ----------------------------------------------------------

MAX_KV_SPLITS = 16
MIN_TILES_PER_SPLIT = 4


def choose_num_kv_splits(
    num_decodes: int, num_kv_heads: int, max_seq_len: int, block_size: int, num_sms: int
) -> int:
    """Slices to cut each context into for a decode-only step (1 = no split).

    In a decode step each Triton program owns one sequence x one KV head and walks that whole
    context alone. With few sequences the grid has fewer programs than the GPU has SMs: at batch 1
    of a Llama-3-8B (8 KV heads) on an H100 (132 SMs), 8 SMs stream the KV cache while 124 idle.
    Splitting each context into S slices gives S times the programs; the price is a merge kernel
    and fp32 partial outputs (T x heads x S x head_dim), small next to the KV read once the
    context is long. So: split only while the grid is smaller than the GPU, aim at about two
    programs per SM (so the last wave's tail is short), keep every slice at least
    MIN_TILES_PER_SPLIT cache blocks long (short contexts gain nothing), and use powers of two up
    to MAX_KV_SPLITS (few kernel variants to compile, few CUDA graphs to capture).
    num_sms = 0 means no GPU: always 1.
    """
    if num_sms <= 0 or num_decodes <= 0:
        return 1
    programs = num_decodes * num_kv_heads
    if programs >= num_sms:
        return 1
    to_fill = -(-2 * num_sms // programs)
    by_length = -(-max_seq_len // block_size) // MIN_TILES_PER_SPLIT
    splits = min(to_fill, by_length, MAX_KV_SPLITS)
    return 1 << (splits.bit_length() - 1) if splits > 1 else 1


def kv_split_options(
    num_decodes: int, num_kv_heads: int, max_model_len: int, block_size: int, num_sms: int
) -> list[int]:
    """Every value choose_num_kv_splits can return for this batch size over contexts up to
    max_model_len: the CUDA graphs to capture for it. choose_num_kv_splits is monotone in
    max_seq_len and its length bound steps through every integer, so these are all the powers of
    two up to its value at max_model_len."""
    top = choose_num_kv_splits(num_decodes, num_kv_heads, max_model_len, block_size, num_sms)
    return [1 << i for i in range(top.bit_length())]
