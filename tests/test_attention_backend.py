"""Attention backend choice, the split-KV policy and the CUDA-graph decode path, tested on CPU.

The Triton backend runs here in Triton's interpreter, which has to be switched on before triton is
first imported in the process: it is set below, at import (pytest imports every test module
before it runs any test). If triton was imported earlier without it (some other module imported
it first), the generation test runs in a subprocess that sets it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny_llama, random_prompts  # noqa: E402

from services.sampling_params import SamplingParams  # noqa: E402
from services.scheduler.engine import EngineCore  # noqa: E402
from services.scheduler.scheduler import SchedulerConfig  # noqa: E402
from worker.attention_backend import (  # noqa: E402
    MAX_KV_SPLITS,
    choose_num_kv_splits,
    kv_split_options,
    resolve_attention_backend,
)
from worker.cuda_graph import DecodeGraphs, capture_sizes, pad_decode_batch  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: the Triton attention backend cannot be tested",
)

NEW = 6
FAKE_SMS = 16  # pretend GPU size for the split-KV policy, so that small batches of long contexts split


def greedy_tokens(runner: ModelRunner, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy generation through the real scheduler; a small token budget chunks the long prompt,
    so steps mix decodes with prefill chunks, and the later steps are decode-only."""
    engine = EngineCore(runner, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48))
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW)
    out: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
        out[str(i)] = []
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request.req_id].append(event.token_id)
    return [out[str(i)] for i in range(len(prompts))]


def generate_all(model_dir: str) -> dict:
    """The same prompts through the torch backend, the Triton backend, and the Triton backend with
    decode steps going through DecodeGraphs' static buffers (capture=False: replayed eagerly)."""
    # Lengths 5, 23, 140: three decodes pad to a captured size of 4; 140 tokens are 9 blocks of 16,
    # long enough for the policy to split in two at FAKE_SMS.
    full = random_prompts(3, 512, seed=5, min_len=140, max_len=140)
    prompts = [full[0][:5], full[1][:23], full[2]]
    kwargs = dict(dtype="float32", kv_cache_memory=1 << 22)
    result: dict = {}
    result["torch"] = greedy_tokens(ModelRunner(model_dir, attention_backend="torch", **kwargs), prompts)
    result["triton"] = greedy_tokens(ModelRunner(model_dir, attention_backend="triton", **kwargs), prompts)

    runner = ModelRunner(model_dir, attention_backend="triton", **kwargs)
    runner.num_sms = FAKE_SMS
    graphs = DecodeGraphs(
        runner.model,
        runner.kv_caches,
        max_batch_size=8,
        max_model_len=runner.max_model_len,
        num_sms=FAKE_SMS,
        capture=False,
    )
    runner.decode_graphs = graphs
    replays: list[tuple[int, int]] = []
    run = graphs.run

    def counting_run(batch, num_kv_splits):  # type: ignore[no-untyped-def]
        replays.append((batch.input_ids.shape[0], num_kv_splits))
        return run(batch, num_kv_splits)

    graphs.run = counting_run  # type: ignore[method-assign]
    result["graph_path"] = greedy_tokens(runner, prompts)
    result["replays"] = replays
    return result


@needs_triton
def test_triton_backend_and_graph_path_generate_like_torch(tmp_path: Path) -> None:
    path = build_tiny_llama(tmp_path / "m", kv_heads=2)
    from worker.attention_backend import triton_interpreter_active

    if triton_interpreter_active():
        result = generate_all(str(path))
    else:  # triton was imported before TRITON_INTERPRET=1 could take effect in this process
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
        proc = subprocess.run(
            [sys.executable, __file__, "--generate", str(path)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(len(t) == NEW for t in result["torch"])
    assert result["triton"] == result["torch"]
    assert result["graph_path"] == result["torch"]
    replays = [tuple(r) for r in result["replays"]]
    # The decode-only steps went through the static buffers: three sequences padded to 4, and the
    # 140-token context split in two.
    assert any(size == 4 for size, _ in replays), replays
    assert any(splits == 2 for _, splits in replays), replays
    assert len(replays) >= NEW - 1


def test_auto_is_torch_on_cpu(tmp_path: Path) -> None:
    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert resolve_attention_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_attention_backend("flash", "cpu")
    runner = ModelRunner(str(build_tiny_llama(tmp_path / "m")), dtype="float32", kv_cache_memory=1 << 20)
    assert runner.attention_backend == "torch"
    assert runner.decode_graphs is None and runner.num_sms == 0  # no graphs, no split-KV off the GPU
    assert runner.model.layers[0].self_attn.backend.name == "torch"


def test_split_kv_policy() -> None:
    h100 = 132
    # Llama-3-8B: 8 KV heads, blocks of 16 tokens.
    assert choose_num_kv_splits(1, 8, 8192, 16, h100) == MAX_KV_SPLITS  # 8 programs for 132 SMs
    assert choose_num_kv_splits(4, 8, 8192, 16, h100) == 8
    assert choose_num_kv_splits(16, 8, 8192, 16, h100) == 2
    assert choose_num_kv_splits(17, 8, 8192, 16, h100) == 1  # 136 programs already fill the GPU
    assert choose_num_kv_splits(64, 8, 8192, 16, h100) == 1
    assert choose_num_kv_splits(1, 8, 100, 16, h100) == 1  # 7 blocks: too short to be worth a merge
    assert choose_num_kv_splits(1, 8, 512, 16, h100) == 8  # 32 blocks: slices of 4 blocks
    assert choose_num_kv_splits(1, 8, 8192, 16, 0) == 1  # no GPU
    assert choose_num_kv_splits(0, 8, 8192, 16, h100) == 1
    for sms in (16, 108, 132):
        for kv_heads in (1, 2, 8):
            for batch in (1, 2, 3, 8, 16, 64):
                previous = 1
                for length in range(1, 2049, 7):
                    s = choose_num_kv_splits(batch, kv_heads, length, 16, sms)
                    assert s & (s - 1) == 0 and 1 <= s <= MAX_KV_SPLITS  # a power of two
                    assert s >= previous  # longer contexts never split less
                    assert s <= max(1, -(-length // 16) // 4)  # every slice >= 4 blocks
                    previous = s
                # The graphs captured for a batch size cover every split count the policy picks for it.
                picked = {choose_num_kv_splits(batch, kv_heads, n, 16, sms) for n in range(1, 2049)}
                assert sorted(picked) == kv_split_options(batch, kv_heads, 2048, 16, sms)


def test_capture_sizes() -> None:
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(4096)[-1] == 512


def test_pad_decode_batch() -> None:
    batch = pad_decode_batch(
        input_ids=[11, 12, 13],
        positions=[4, 40, 16],
        slots=[3 * 16 + 4, 7 * 16 + 8, 2 * 16 + 0],
        seq_lens=[5, 41, 17],
        block_rows=[[3], [9, 5, 7], [6, 2]],
        size=4,
    )
    assert batch.input_ids.tolist() == [11, 12, 13, 0]
    assert batch.positions.tolist() == [4, 40, 16, 0]
    assert batch.slot_mapping.tolist() == [52, 120, 32, -1]  # -1: the padding row writes no KV
    assert batch.seq_lens.tolist() == [5, 41, 17, 1]  # 1: the padding row attends to one entry of block 0
    assert batch.block_tables.tolist() == [[3, 0, 0], [9, 5, 7], [6, 2, 0], [0, 0, 0]]
    assert batch.input_ids.dtype == batch.positions.dtype == batch.slot_mapping.dtype == torch.int64
    assert batch.seq_lens.dtype == batch.block_tables.dtype == torch.int32
    exact = pad_decode_batch([1], [0], [5], [1], [[0]], size=1)
    assert exact.slot_mapping.tolist() == [5] and exact.block_tables.shape == (1, 1)
    with pytest.raises(AssertionError):
        pad_decode_batch([1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 1, 1], [[0], [0], [0]], size=2)


def test_decode_graphs_buffers_on_cpu(tmp_path: Path) -> None:
    """Static buffers and size lookup, without capturing (no GPU here)."""
    runner = ModelRunner(str(build_tiny_llama(tmp_path / "m")), dtype="float32", kv_cache_memory=1 << 20)
    graphs = DecodeGraphs(
        runner.model, runner.kv_caches, max_batch_size=20, max_model_len=100, num_sms=0, capture=False
    )
    assert graphs.sizes == [1, 2, 4, 8, 16, 20] and graphs.max_batch_size == 20
    assert [graphs.padded_size(n) for n in (1, 3, 5, 9, 16, 17, 20)] == [1, 4, 8, 16, 16, 20, 20]
    assert graphs.block_tables.shape == (20, 7)  # ceil(100 / 16) blocks per row
    assert graphs.slot_mapping.tolist() == [-1] * 20  # warm-up/capture rows write no KV
    assert graphs.query_start_loc.tolist() == list(range(21))
    assert set(graphs.replays) == {(s, 1) for s in graphs.sizes}  # no SMs: never split


@needs_triton
def test_graph_forward_reads_nothing_back_to_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA graph captures must not read a device value on the host (that would sync inside
    the capture, and bake one step's values into the graph). Run the captured function, the decode
    forward over the static buffers with the Triton backend, with every Tensor -> host conversion
    raising; the kernels themselves are replaced by launch recorders (on CPU they would run in the
    interpreter, which converts tensors by design), which also check the grids are host ints."""
    from worker import triton_attention
    from worker.attention_backend import get_attention_backend

    runner = ModelRunner(str(build_tiny_llama(tmp_path / "m")), dtype="float32", kv_cache_memory=1 << 20)
    runner.model.set_attention_backend(get_attention_backend("triton"))
    graphs = DecodeGraphs(
        runner.model, runner.kv_caches, max_batch_size=4, max_model_len=256, num_sms=64, capture=False
    )
    launches: list[tuple[str, tuple]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: tuple):  # type: ignore[no-untyped-def]
            assert all(type(g) is int for g in grid), grid
            launches.append((self.name, grid))
            return lambda *args, **kwargs: None

    def refuse(name: str):  # type: ignore[no-untyped-def]
        def method(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError(f"Tensor.{name} called inside the captured forward")

        return method

    with monkeypatch.context() as m:
        for kernel in ("_write_kv_kernel", "_unified_attention_kernel", "_merge_splits_kernel"):
            m.setattr(triton_attention, kernel, Recorder(kernel))
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        with torch.inference_mode():
            for key in sorted(graphs.replays):
                graphs.replays[key]()
    names = {name for name, _ in launches}
    assert names == {"_write_kv_kernel", "_unified_attention_kernel", "_merge_splits_kernel"}, names
    assert any(key[1] > 1 for key in graphs.replays)  # split variants were among those run


if __name__ == "__main__" and sys.argv[1:2] == ["--generate"]:
    print(json.dumps(generate_all(sys.argv[2])))
