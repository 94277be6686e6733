"""The engine's lean cached forward equals ``GLM.forward`` (fp32 exactly, bf16 within rounding), the engine never
goes through the validating ``GLM.forward``, and ``optimize_for_decode`` swaps in the kernels' modules without
changing what the model computes."""

import dataclasses

import pytest
import torch

from glmkit import GLM, KVCache, kernels
from glmkit.generate import generate
from glmkit.generate.engine import GLMStepper, prefill
from glmkit.generate.fast import cache_dtype, cached_forward, optimize_for_decode
from glmkit.kernels import reference
from glmkit.masks import mask_with_cache, prefix_lm_mask
from glmkit.quantize.modules import QuantizedLinear
from tests.helpers.bounds import BF16_UNIT, clear_steps, reevaluation_bound
from tests.helpers.generation import SPECIAL, EopAfter, fixture_model

ROWS = [[582, 5, 6, 7, 8, 583, 9, 579], [582, 40, 41, 586]]  # ragged: Part A of 8 and 4 tokens, blanks at 5 and 3


def step_logits(model, rows, blanks, tokens, dtype=None):
    """Prefill ``rows`` then decode ``tokens [steps, B]`` through the engine's stepper; logits per step."""
    cache = KVCache.for_model(model, len(rows), 16, dtype=dtype or cache_dtype(model))
    with torch.inference_mode():
        prefill(model, rows, cache)
        stepper = GLMStepper(model, cache, torch.tensor(blanks), SPECIAL.sop)
        return torch.stack([stepper.step(None)] + [stepper.step(t) for t in tokens])


def test_cached_forward_equals_glm_forward():
    model = fixture_model()
    tokens = torch.randint(0, 579, (4, 2))
    fast = step_logits(model, ROWS, [5, 3], tokens)  # ragged: masked steps
    slow = step_logits(EopAfter(model, {}), ROWS, [5, 3], tokens)  # a wrapper goes through GLM.forward
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for b, row in enumerate(ROWS):  # equal rows: unmasked steps
        alone = step_logits(model, [row], [[5, 3][b]], tokens[:, b : b + 1])
        torch.testing.assert_close(alone[:, 0], fast[:, b], atol=1e-5, rtol=0)
    # several new tokens with a causal mask over a cache, hidden states
    cache_a, cache_b = (KVCache.for_model(model, 1, 16) for _ in range(2))
    ids, pos = torch.tensor([[582, 5, 6]]), torch.tensor([[[0, 1, 2], [0, 0, 0]]])
    with torch.inference_mode():
        for cache in (cache_a, cache_b):
            model(ids, pos, 3, cache=cache)
        mask = mask_with_cache(prefix_lm_mask(0, 2), [3], 1)
        new, new_pos = torch.tensor([[9, 10]]), torch.tensor([[[3, 3], [1, 2]]])
        fast = cached_forward(model, new, new_pos, mask, cache_a, hidden=True)
        slow = model(new, new_pos, None, cache=cache_b, return_hidden=True)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert cache_a.host_lengths() == cache_b.host_lengths() == [5]


def test_bf16_attends_in_fp32_over_a_bf16_or_fp32_cache():
    model = fixture_model()
    half = fixture_model().to(torch.bfloat16)
    # the fused step reads a bf16 cache itself; without it the Python path keeps an fp32 one
    assert cache_dtype(half) == (torch.bfloat16 if kernels.available() else torch.float32)
    assert cache_dtype(fixture_model().half()) == torch.float32 and cache_dtype(EopAfter(half, {})) == torch.bfloat16
    tokens = torch.randint(0, 579, (5, 2))
    exact = step_logits(model, ROWS, [5, 3], tokens)
    fast = step_logits(half, ROWS, [5, 3], tokens).float()
    stock = step_logits(EopAfter(half, {}), ROWS, [5, 3], tokens).float()  # bf16 cache, GLM.forward
    assert (fast - exact).abs().max() <= (stock - exact).abs().max() * 1.5 + 1e-3
    assert (fast - exact).abs().max() < 0.1
    for dtype in (torch.bfloat16, torch.float32):  # either cache works with either step
        other = step_logits(half, ROWS, [5, 3], tokens, dtype=dtype).float()
        assert (other - exact).abs().max() < 0.1


def test_the_engine_never_runs_the_validating_forward(monkeypatch):
    model = fixture_model()
    expected = generate(model, ROWS, special_tokens=SPECIAL, max_new_tokens=4, num_beams=2).new_tokens

    def refuse(*args, **kwargs):
        raise AssertionError("GLM.forward called during generation")

    monkeypatch.setattr(GLM, "forward", refuse)
    assert generate(model, ROWS, special_tokens=SPECIAL, max_new_tokens=4, num_beams=2).new_tokens == expected


def test_optimize_for_decode_swaps_modules_and_keeps_the_function():
    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    model = fixture_model().to(torch.bfloat16)
    before = generate(model, ROWS, special_tokens=SPECIAL, max_new_tokens=6, kernels=False)
    assert type(model.blocks[0].mlp.fc) is torch.nn.Linear  # kernels=False: the stock layers computed `before`
    tokens = torch.tensor(before.new_tokens).T[:-1]
    logits = step_logits(model, ROWS, [5, 3], tokens)
    assert optimize_for_decode(model) is model and not model.training
    assert type(model.blocks[0].mlp.fc) is kernels.FastLinear and type(model.lm_head) is kernels.FastTiedHead
    after = step_logits(model, ROWS, [5, 3], tokens)
    torch.testing.assert_close(after.float(), logits.float(), atol=0.05, rtol=0.02)
    fp32, half = fixture_model(), fixture_model().half()
    fp32_logits = step_logits(fp32, ROWS, [5, 3], tokens)
    optimize_for_decode(fp32)
    optimize_for_decode(half)
    assert type(half.blocks[0].mlp.fc) is torch.nn.Linear  # fp16: no kernels, the stock layers stay
    assert type(fp32.blocks[0].mlp.fc) is kernels.FastLinear  # fp32 weights run the kernels' fp32 GEMV
    fp32_after = step_logits(fp32, ROWS, [5, 3], tokens)
    torch.testing.assert_close(fp32_after, fp32_logits, atol=1e-4, rtol=1e-4)


def test_library_calls_decode_on_the_kernels_unless_told_not_to():
    """``generate``, ``stream``, ``fill_blank_ids`` and ``model.generate`` put a plain model on the kernels
    themselves (where they run), as the CLI does; ``kernels=False`` leaves it alone."""
    from glmkit.generate import fill_blank_ids, stream

    swapped = kernels.FastLinear if kernels.available() else torch.nn.Linear
    for call in (
        lambda m: generate(m, ROWS, special_tokens=SPECIAL, max_new_tokens=3),
        lambda m: list(stream(m, ROWS[1], special_tokens=SPECIAL, max_new_tokens=3)),
        lambda m: fill_blank_ids(m, ROWS[0], special_tokens=SPECIAL, max_new_tokens=3),
        lambda m: m.generate(ROWS, special_tokens=SPECIAL, max_new_tokens=3),
    ):
        model = fixture_model().to(torch.bfloat16)
        call_kwargs_off = generate(model, ROWS, special_tokens=SPECIAL, max_new_tokens=3, kernels=False)
        assert type(model.blocks[0].mlp.fc) is torch.nn.Linear and call_kwargs_off.sequences.shape[0] == 2
        call(model)
        assert type(model.blocks[0].mlp.fc) is swapped and not model.training
    model = fixture_model()
    out = model.generate(torch.tensor([ROWS[0]]), special_tokens=SPECIAL, max_new_tokens=5, num_beams=2)
    assert torch.equal(out, generate(model, [ROWS[0]], special_tokens=SPECIAL, max_new_tokens=5, num_beams=2).sequences)


def _steps(model, rows, blanks, tokens, fused: bool, slots=None):
    """``step_logits`` through ``DecodeStep`` with the fused op on or off; ``slots``: rows of a bigger pool."""
    dtype = cache_dtype(model)
    cache = KVCache.for_model(model, 4, 16, dtype=dtype).rows(slots) if slots else None
    cache = cache or KVCache.for_model(model, len(rows), 16, dtype=dtype)
    with torch.inference_mode():
        prefill(model, rows, cache)
        stepper = GLMStepper(model, cache, torch.tensor(blanks), SPECIAL.sop)
        assert stepper.decode.fused is not None
        if not fused:
            stepper.decode.fused = None
        out = torch.stack([stepper.step(None)] + [stepper.step(t) for t in tokens]).float()
    return out, cache.host_lengths()


def _fixture_or_rotary(rotary: bool) -> GLM:
    """The fixture GLM, or the same weights with 2D rotary positions in place of its position tables."""
    model = fixture_model()
    if not rotary:
        return model
    twin = GLM(dataclasses.replace(model.config, position_encoding="rotary_2d_interleaved"))
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("wpe", "wbpe")) for k in unexpected)
    return twin.eval()


def _fp32_twin(model: GLM) -> GLM:
    """The same weights as ``model`` (bf16, or int8 / int4 dequantized) in an fp32 GLM on the stock layers."""
    state = {k: v.float() for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            q = m.state_dict()
            if m.bits == 8:
                state[f"{name}.weight"] = reference.dequantize_int8(q["weight"], q["weight_scale"])
            else:
                state[f"{name}.weight"] = reference.dequantize_int4(q["weight"], q["weight_scale"], m.group_size)
    twin = GLM(model.config)
    twin.load_state_dict(state)
    return twin.eval()


def assert_fused_is_the_python_step(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """Both steps evaluate the same bf16 model; they differ in where bf16 rounds (the Python path rounds each op's
    inputs and outputs, the fused one keeps more in fp32) and in attention's summation order. So the fused logits lie
    within ``bounds.reevaluation_bound`` of the Python step's: its distance from the fp32 evaluation of the same
    weights (``exact``), twice (the fused step's own error is as large). Greedy tokens then agree wherever the
    Python step's top-2 margin exceeds twice that. Random weights give near-Gaussian logits whose top two are close
    (a trained model's are not): a third of the steps clear the bound here, and must, else the bound says nothing."""
    bound = reevaluation_bound(plain, exact, BF16_UNIT)
    assert (fused - plain).abs().max() <= bound, ((fused - plain).abs().max(), bound)
    clear = clear_steps(plain, bound)
    assert clear.float().mean() >= 0.3, (clear.float().mean(), bound)
    assert torch.equal(fused.argmax(-1)[clear], plain.argmax(-1)[clear])


@pytest.mark.parametrize("bits,rotary", [(None, False), (8, False), (4, False), (None, True), (4, True)])
def test_fused_decode_blocks_compute_the_python_step(bits, rotary):
    """``decode_blocks`` (every block in one C++ call) == the per-op Python step on the same kernels: ragged rows,
    rows of a pool (serving's slots), bf16 / int8 / int4 weights, learned or 2D rotary positions, within the bound
    of ``assert_fused_is_the_python_step``."""
    from glmkit import kernels
    from glmkit.quantize import QuantScheme, quantize_model

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    model = optimize_for_decode(_fixture_or_rotary(rotary).to(torch.bfloat16))
    if bits:  # a model already on the kernels quantizes too
        quantize_model(model, QuantScheme(bits, 32 if bits == 4 else None))
        assert isinstance(model.blocks[0].mlp.fc, QuantizedLinear)
    tokens = torch.randint(0, 579, (6, 2), generator=torch.Generator().manual_seed(0))
    exact = step_logits(_fp32_twin(model), ROWS, [5, 3], tokens)
    for slots in (None, [3, 1]):
        fused, lengths = _steps(model, ROWS, [5, 3], tokens, True, slots)
        plain, plain_lengths = _steps(model, ROWS, [5, 3], tokens, False, slots)
        assert lengths == plain_lengths == [15, 11]
        assert_fused_is_the_python_step(fused, plain, exact)


def test_fused_decode_is_used_and_not_for_fp32_or_training():
    from glmkit import kernels
    from glmkit.generate.fast import DecodeStep

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    half = fixture_model().to(torch.bfloat16)
    assert DecodeStep(half).fused is not None and len(DecodeStep(half).fused.tensors) == 16 * half.config.n_layer
    assert DecodeStep(fixture_model()).fused is None  # fp32 attends in SDPA over its own cache
    assert DecodeStep(half, compile="eager").fused is None  # a compiled step stays in Python
    assert DecodeStep(half.train()).fused is None


@pytest.mark.parametrize("n_embd,n_head,rotary", [(80, 2, False), (128, 2, True), (96, 1, False)])
def test_fused_attention_over_long_rows_and_any_head_size(n_embd, n_head, rotary):
    """Head sizes 40, 64 and 96 (partial and several 16-value vectors) over caches longer than the op's 16-key
    score tiles, ragged: the fused step still computes the Python step."""
    from glmkit import GLMConfig, kernels

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    encoding = "rotary_2d_interleaved" if rotary else "learned"
    cfg = GLMConfig(
        n_layer=2, n_embd=n_embd, n_head=n_head, vocab_size=640, max_sequence_length=96, position_encoding=encoding
    )
    model = GLM(dataclasses.replace(cfg, special_tokens=SPECIAL)).eval()
    with torch.no_grad():  # sharper attention than the init's, so a wrong score or position shows
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6)
    model = optimize_for_decode(model.to(torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    rows = [[582, *torch.randint(0, 579, (n,), generator=g).tolist(), 586] for n in (37, 18)]
    tokens = torch.randint(0, 579, (5, 2), generator=g)

    def steps(fused: bool, m: GLM = model):
        cache = KVCache.for_model(m, 2, 48, dtype=cache_dtype(m))
        with torch.inference_mode():
            prefill(m, rows, cache)
            stepper = GLMStepper(m, cache, torch.tensor([38, 19]), SPECIAL.sop)
            assert (stepper.decode.fused is not None) == (m is model)
            if not fused:
                stepper.decode.fused = None
            return torch.stack([stepper.step(None)] + [stepper.step(t) for t in tokens]).float()

    fused, plain = steps(True), steps(False)
    exact = steps(True, _fp32_twin(model))
    assert_fused_is_the_python_step(fused, plain, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_forward_skips_right_padding(dtype):
    """With ``lengths`` the token-wise layers run on real tokens only: the same hidden states and cache there,
    zeros at the padding (whose outputs nobody reads)."""
    from glmkit.masks import part_a_positions

    model = optimize_for_decode(fixture_model().to(dtype))
    rows = [[582, 5, 6, 7, 8, 583, 9], [582, 40, 586]]
    lengths, S = [7, 3], 7
    ids = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows])
    mask = prefix_lm_mask(lengths, S, valid_lengths=lengths)
    out = {}
    with torch.inference_mode():
        for unpad in (False, True):
            cache = KVCache.for_model(model, 2, 8, dtype=cache_dtype(model))
            h = cached_forward(model, ids, part_a_positions(lengths, S), mask, cache, True, lengths if unpad else None)
            out[unpad] = (h, cache.k[:, 0].clone(), cache.k[:, 1, :, :3].clone())
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(out[True][0][0], out[False][0][0], **tol)
    torch.testing.assert_close(out[True][0][1, :3], out[False][0][1, :3], **tol)
    assert out[True][0][1, 3:].abs().max() == 0
    for a, b in zip(out[True][1:], out[False][1:], strict=True):  # the real tokens' keys in the cache
        torch.testing.assert_close(a, b, **tol)
