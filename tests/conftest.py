"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted from the GGUF package on first use."""
    from pagemesh.model_store import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def stack(default_model_dir, tmp_path_factory):
    """The real services (`pagemesh serve`) on the default model in float32, shared by the session.
    Tests that kill or restart services start their own with tests.stack.start_stack."""
    from stack import start_stack, stop_stack

    s = start_stack(default_model_dir, tmp_path_factory.mktemp("stack") / "serve.log", "--dtype", "float32")
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack):
    """The official OpenAI client on the session stack's gateway."""
    import openai

    return openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(stack):
    """The served model name (the model directory's name)."""
    return stack.model_dir.name
