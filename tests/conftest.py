"""Shared fixtures. Tiny random models for unit tests; the embedded model for integration tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

FIXTURES = Path(__file__).parent / "fixtures"
MISTRAL_CONFIG = FIXTURES / "mistral-7b-openorca-config.json"


@pytest.fixture
def tiny():
    """(model, tokenizer): 2-layer random Llama (GQA 4/2 heads, hidden 64, tied head), float32 CPU."""
    from lowrank_core.models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def tiny_any(request):
    from lowrank_core.models import tiny_model

    return tiny_model(request.param, seed=0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (LoadedModel), float32 on CPU; converted once per cache."""
    from lowrank_core.models import load_model

    return load_model("default", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def mistral_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(MISTRAL_CONFIG))


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
