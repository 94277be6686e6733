"""A tiny GLM with a trained byte-level BPE, saved as a checkpoint folder, for the serving tests."""

import random
from pathlib import Path

import pytest

from glmkit import GLM, GLMConfig
from glmkit.train_tokenizer import train_tokenizer

WORDS = "the king said unto them go and see what the lord hath done in the land of egypt for ever".split()


def build_tiny_model_dir(root: Path) -> Path:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200))
    (root / "corpus.txt").write_text(text)
    folder = root / "model"
    tok = train_tokenizer([root / "corpus.txt"], folder, vocab_size=300)
    config = GLMConfig(
        n_layer=2, n_embd=32, n_head=4, vocab_size=tok.vocab_size, max_sequence_length=64, special_tokens=tok.special
    )
    GLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    from glmkit.bundled import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    return model.eval(), tok


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
