"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted from the GGUF package on first use."""
    from pagemesh.model_store import ensure_default_model

    return ensure_default_model()
