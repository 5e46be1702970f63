"""Shared fixtures: real models built offline, small ranked data files, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed compiles its CPU ops on first use (~35 s); keep them across runs.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuna-ray" / "torch_extensions")
)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from tuna_ray.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tuna_ray.models import smollm2_135m_instruct

    return smollm2_135m_instruct()
