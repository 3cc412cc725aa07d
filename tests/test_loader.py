"""Checkpoint reading (worker.safetensors_file) and what loading costs in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fresh_python import run_python
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_llama

from worker.safetensors_file import SafetensorsFile


def test_reads_every_tensor_as_safetensors_does(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=gen).half(),
        "i64": torch.arange(-4, 4),
        "i8": torch.arange(-8, 8, dtype=torch.int8).view(4, 4),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected = load_file(str(path))
    with SafetensorsFile.open(path) as checkpoint:
        assert sorted(checkpoint.names()) == sorted(tensors)
        for name, want in expected.items():
            got = checkpoint.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def test_truncated_file_and_unknown_dtype_are_clear_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with SafetensorsFile.open(path) as checkpoint, pytest.raises(ValueError, match="ends inside tensor 'w'"):
        checkpoint.read("w")

    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["w"]["dtype"] = "C64"
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len :])
    with SafetensorsFile.open(path) as checkpoint, pytest.raises(ValueError, match="dtype C64"):
        checkpoint.dtype("w")


LOAD_PEAK = """
import sys, torch
from worker.loader import load_model
from worker.model_config import ModelConfig

load_model(ModelConfig.from_dir(sys.argv[1]), torch.bfloat16, "cpu", 512)  # torch's one-time setup
cfg = ModelConfig.from_dir(sys.argv[2])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
model = load_model(cfg, torch.bfloat16, "cpu", 512)
print(status("VmHWM:") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loading_peaks_at_the_weights_plus_one_checkpoint_tensor(tmp_path):
    # 136 MiB of fp32 in the file, 68 MiB of bf16 weights; the largest tensor is 16 MiB. Through
    # safetensors' mapping the file's pages stayed resident until loading ended (~+136 MiB), and
    # packing held every plain weight until all were packed (~+68 MiB).
    tiny = build_tiny_llama(tmp_path / "tiny")
    path = build_tiny_llama(
        tmp_path / "m", tie=False, vocab=8192, hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=8
    )
    out = run_python(LOAD_PEAK, str(tiny), str(path))
    growth = int(out)
    with SafetensorsFile.open(path / "model.safetensors") as checkpoint:
        weights = sum(torch.Size(checkpoint.shape(n)).numel() * 2 for n in checkpoint.names())  # in bf16
    largest = 8192 * 512 * 4
    assert weights > 60 << 20
    assert growth < weights + largest + (24 << 20), (growth >> 20, weights >> 20)


@pytest.mark.parametrize("tie", [True, False])
def test_a_sharded_checkpoint_generates_what_the_whole_one_does(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from pagemesh import LLM, SamplingParams

    whole = build_tiny_llama(tmp_path / "whole", tie=tie)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(whole).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    prompts = [{"prompt_token_ids": [1, *range(5 + i, 30 + 2 * i)]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outputs = [
        LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True).generate(prompts, params, use_tqdm=False)
        for path in (whole, sharded)
    ]
    for a, b in zip(*outputs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
