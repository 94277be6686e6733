"""A model's vocabulary is often padded past its tokenizer's (30592 rows for 30522 BERT ids): the engine must never
emit an id the tokenizer cannot decode, whatever the decoding strategy."""

import pytest
import torch

from glmkit.generate import fill_blank_ids, generate
from glmkit.generate.engine import decodable_size
from glmkit.tokenizer import WhitespaceTokenizer

WORDS = [f"w{i}" for i in range(31)]  # 9 specials + 31 words = 40 decodable ids; the model has 96


class FavourPadding(torch.nn.Module):
    """A GLM whose padding rows (ids >= 40) get +50 on every logit."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, return_hidden=False):
        out = self.model(input_ids, position_ids, attention_mask, cache=cache, return_hidden=return_hidden)
        if not return_hidden:
            out[..., 40:] += 50.0
        return out


class HFLike:
    """transformers counts added tokens in len(), not in vocab_size."""

    vocab_size = 30

    def __len__(self):
        return 40

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(do_sample=True, top_k=0, seed=1), dict(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "sampling", "beams"],
)
def test_ids_past_the_tokenizer_are_never_generated(tiny_model, kw):
    tok = WhitespaceTokenizer(WORDS)
    assert tok.vocab_size == 40 and decodable_size(HFLike()) == 40 and decodable_size(None) is None
    model = FavourPadding(tiny_model)
    prompt = [tok.special.cls] + tok.encode("w1 w2 w3")
    free = generate(model, prompt, special_tokens=tok.special, max_new_tokens=6, **kw)
    assert any(t >= 40 for row in free.new_tokens for t in row)  # without a tokenizer the padding rows win
    for tokenizer in (tok, HFLike()):
        out = generate(model, prompt, special_tokens=tok.special, tokenizer=tokenizer, max_new_tokens=6, **kw)
        assert all(t < 40 for row in out.new_tokens for t in row)
    fill_kw = {k: v for k, v in kw.items() if k != "num_return_sequences"}
    filled = fill_blank_ids(model, prompt + [tok.special.mask, 10], tokenizer=tok, max_new_tokens=6, **fill_kw)
    tok.decode(filled.ids)  # decodable
