"""The prefill kernels (csrc/prefill.cpp): masked attention of several new tokens per row equals fp32 SDPA, and the
rotary turn equals ``rotary.apply_interleaved`` bit for bit; what they do not take falls back to those."""

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels as kernels
from glmkit.rotary import apply_interleaved

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"C++ kernels not available: {kernels.unavailable_reason()}"
)


def sdpa(q, k, v, mask):
    B, H, S, D = q.shape
    y = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, S, H * D)


@needs_kernels
@pytest.mark.parametrize("B,H,S,T,D", [(1, 1, 1, 1, 16), (3, 5, 26, 26, 64), (2, 3, 7, 40, 40), (1, 2, 17, 33, 128)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_in_mask", [1, "H"])
def test_attention_kernel_is_sdpa(B, H, S, T, D, kv_dtype, heads_in_mask):
    # q a strided view of a qkv output; k, v slices of a longer cache (each head's keys contiguous)
    q = torch.randn(B, S, H, D).transpose(1, 2)
    k, v = (torch.randn(B, H, T + 5, D).to(kv_dtype)[:, :, :T] for _ in range(2))
    mask = torch.rand(B, H if heads_in_mask == "H" else 1, S, T) > 0.4
    mask[..., 0] = True
    for m in (mask, None):
        y = kernels.attention(q, k, v, m, torch.float32)
        assert y.shape == (B, S, H * D) and y.dtype == torch.float32
        torch.testing.assert_close(y, sdpa(q, k, v, m), atol=2e-6, rtol=1e-5)
    yb = kernels.attention(q, k, v, mask, torch.bfloat16)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, sdpa(q, k, v, mask).bfloat16(), atol=1e-2, rtol=1e-2)


@needs_kernels
def test_attention_kernel_gives_zeros_to_a_query_that_sees_nothing():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # a padding query: SDPA would give NaN there
    y = kernels.attention(q, k, v, mask, torch.float32)
    assert torch.equal(y[0, 1], torch.zeros(32))
    torch.testing.assert_close(y[0, [0, 2]], sdpa(q, k, v, mask)[0, [0, 2]], atol=2e-6, rtol=1e-5)


def test_attention_falls_back_where_the_kernel_does_not_run():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    mask = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None]
    ref = sdpa(q, k, v, mask)
    for args in ((q.double(), k.double(), v.double()), (q.requires_grad_(), k, v)):  # fp64, autograd
        y = kernels.attention(*args, mask, torch.float32)
        torch.testing.assert_close(y.float(), ref, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_attention_kernel_names_bad_shapes():
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="k and v must be float32 or bf16"):
        torch.ops.glmkit_kernels.attention(q, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), None, False)
    with pytest.raises(RuntimeError, match=r"mask must be bool \[B, 1 or H, S, T\]"):
        torch.ops.glmkit_kernels.attention(q, q, q, torch.ones(1, 1, 3, 4, dtype=torch.bool), False)


@needs_kernels
@pytest.mark.parametrize("D", [64, 40, 6, 128])  # whole vectors of 16 pairs, a tail, tails only
def test_rotary_kernel_is_apply_interleaved_exactly(D):
    B, H, S = 2, 3, 11
    x = torch.randn(B, S, H, D).transpose(1, 2)  # a strided view, as q and k are
    cos, sin = torch.randn(B, 1, S, D // 2), torch.randn(B, 1, S, D // 2)
    y = kernels.rotary(x, cos, sin)
    assert y.is_contiguous() and torch.equal(y, apply_interleaved(x, (cos, sin)))
    xb = x.bfloat16()  # not an fp32 x: the Python path
    assert torch.equal(kernels.rotary(xb, cos, sin), apply_interleaved(xb, (cos, sin)))


@needs_kernels
def test_scoring_on_the_prefill_kernels_equals_the_python_path(monkeypatch):
    """The bundled model (2D rotary) in bf16 scores ragged requests the same with the kernels' attention and rotary
    turn as with SDPA and ``apply_interleaved``."""
    from glmkit.bundled import load_model_and_tokenizer
    from glmkit.generate.fast import optimize_for_decode
    from glmkit.serve.scoring import Scorer, ScoreRow

    model, tok = load_model_and_tokenizer(None)
    model = optimize_for_decode(model.to(torch.bfloat16))
    scorer = Scorer(model, tok.special)
    texts = [
        ("In the beginning God", " created the heaven"),
        ("And the [MASK] was without form", " earth"),
        ("Amen", " and"),
    ]
    requests = [[scorer.check(ScoreRow("loglikelihood", tok.encode(a), tok.encode(b)))] for a, b in texts]
    requests.append([scorer.check(ScoreRow("logits", tok.encode("And God saw the light")))])
    fast = scorer(requests)
    monkeypatch.setattr(kernels, "rotary", lambda x, cos, sin: apply_interleaved(x, (cos, sin)))
    monkeypatch.setattr(kernels, "attention", lambda q, k, v, mask, dtype: sdpa(q, k, v, mask).to(dtype))
    slow = scorer(requests)
    for (f,), (s,) in zip(fast[:3], slow[:3], strict=True):
        assert f.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-2)  # identical here; bf16 ties may round
    torch.testing.assert_close(fast[3][0].logits, slow[3][0].logits, atol=0.05, rtol=0)
