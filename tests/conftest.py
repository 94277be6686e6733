from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config():
    from glmkit import GLMConfig

    return GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=96, max_sequence_length=48)


@pytest.fixture
def tiny_model(tiny_config):
    from glmkit import GLM

    return GLM(tiny_config).eval()
