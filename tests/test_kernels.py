"""glmkit.kernels: the C++ kernels compute the reference math (dequantize, then matmul) for decode-sized and odd
shapes, every dtype they take, and the swapped-in modules leave a model's function unchanged."""

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels as kernels
from glmkit import GLM
from glmkit.kernels import layout, reference
from glmkit.quantize import quantize_int4, quantize_int8
from tests.helpers.generation import FIXTURE

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"C++ kernels not available: {kernels.unavailable_reason()}"
)
ROWS = [1, 4, 5, 11, 32, 61]  # 8-56 bf16 rows: 4 x 4 tiles (with 3 left over at 11); more: oneDNN
SHAPES = [(7, 32), (13, 96), (64, 64), (37, 160), (130, 256)]  # N, K: odd row counts, K % 64 == 32 tails


def close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """max |y - ref| <= rel * max |ref|: the kernels sum in another order (and in fp32 before rounding)."""
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), (err, ref.abs().max().item())


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K", SHAPES + [(5, 33), (9, 1000), (12, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_kernel_is_the_reference_math(M, N, K, dtype):
    x, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K).bfloat16(), torch.randn(N).to(dtype)
    y = kernels.linear_bf16(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    # the kernel rounds x to bf16, multiplies exactly, sums in fp32, then rounds once to the output dtype
    close(y, F.linear(bf16_exact(x), w.float(), b.float()), 1e-5 if dtype == torch.float32 else 2**-8)
    close(y, reference.linear_bf16(x, w, b), 2**-7)  # the fallback path


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K", SHAPES + [(5, 33), (9, 1000)])
def test_fp32_kernel_is_f_linear(M, N, K, monkeypatch):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    ref = F.linear(x, w, b)
    monkeypatch.setattr(F, "linear", lambda *a: pytest.fail("fp32 weights with few rows fell back to F.linear"))
    y = kernels.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    close(y, ref, 1e-5)


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K", SHAPES + [(5, 33), (3, 8200)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_is_the_reference_math(M, N, K, scale_dtype):
    q, s = quantize_int8(torch.randn(N, K))
    s = s.to(scale_dtype)
    x, b = torch.randn(M, K), torch.randn(N)
    ref = F.linear(x, reference.dequantize_int8(q, s), b)
    # activations are held as 16-bit fixed point per row: error ~ max|x| / 2^16 per element
    close(kernels.linear_int8(x, q, s, b), ref, 1e-4)
    close(
        kernels.linear_int8(x.bfloat16(), q, s, b.bfloat16()),
        F.linear(bf16_exact(x), q.float() * s.float()[:, None], b),
        2**-7,
    )
    close(kernels.linear_int8(x, q, s, b), reference.linear_int8(x, q, s, b), 1e-4)


INT4_CASES = [(N, K, g) for N, K in SHAPES for g in layout.INT4_GROUP_SIZES if K % g == 0]


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K,group_size", INT4_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_is_the_reference_math(M, N, K, group_size, dtype):
    packed, s = quantize_int4(torch.randn(N, K), group_size)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N)
    y = kernels.linear_int4(x, packed, s, group_size, b)
    assert y.dtype == dtype
    # x as this CPU's kernels hold it for int4 (bf16 on AVX-512, 16-bit fixed point on AVX2): then exact products
    ref = F.linear(
        reference.kernel_activations(x, "int4", kernels.isa()), reference.dequantize_int4(packed, s, group_size), b
    )
    close(y, ref, 2e-5 if dtype == torch.float32 else 2**-8)
    close(y, reference.linear_int4(x, packed, s, group_size, b), 2**-7)
    close(
        kernels.linear_int4(x, packed, s.float(), group_size, None), ref - b, 2e-5 if dtype == torch.float32 else 2**-8
    )


@pytest.mark.parametrize("K", [32, 64, 96, 160, 256])
def test_int4_packing_round_trips(K):
    u = torch.randint(0, 16, (3, K), dtype=torch.uint8)
    packed = reference.pack_int4(u)
    assert packed.shape == (3, K // 2) and packed.dtype == torch.uint8
    assert torch.equal(reference.unpack_int4(packed), u)
    # the documented layout: byte j of a 64-input chunk holds inputs j (low nibble) and j + 32 (high nibble)
    if K >= 64:
        assert packed[0, 5].item() == u[0, 5].item() | (u[0, 37].item() << 4)


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, 5, 9])
@pytest.mark.parametrize("N,K,group_size", [(16, 64, 32), (48, 128, 64), (32, 256, 128), (64, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_int4_kernel_is_the_row_major_kernel(M, N, K, group_size, dtype):
    packed, s = quantize_int4(torch.randn(N, K), group_size)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N)
    for scales, bias in ((s, b), (s.float(), None), (s, b.bfloat16())):
        w16, s16 = reference.interleave_int4(packed, scales)
        y = kernels.linear_int4x16(x, w16, s16, group_size, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        close(y, kernels.linear_int4(x, packed, scales, group_size, bias), 2e-5 if dtype == torch.float32 else 2**-8)
        close(y, reference.linear_int4(x, packed, scales, group_size, bias), 2**-7)


@pytest.mark.parametrize("N,K,group_size", [(16, 64, 32), (48, 160, 32), (32, 256, 128)])
def test_the_reference_is_the_weight_formats_math(N, K, group_size):
    """What every CPU without the kernels runs (and the kernels are held to), against the formats' definitions
    computed element by element: w = q * scale (int8), (u - 8) * scale[n, k // G] (int4, both layouts)."""
    w = torch.randn(N, K)
    x, b = torch.randn(3, K), torch.randn(N)
    q, s = quantize_int8(w)
    torch.testing.assert_close(reference.linear_int8(x, q, s, b), x @ (q.double() * s.double()[:, None]).float().T + b)
    packed, s4 = quantize_int4(w, group_size)
    u = reference.unpack_int4(packed).double()
    w4 = ((u - 8) * s4.double().repeat_interleave(group_size, dim=1)).float()
    expected = x @ w4.T + b
    torch.testing.assert_close(reference.linear_int4(x, packed, s4, group_size, b), expected)
    w16, s16 = reference.interleave_int4(packed, s4)
    torch.testing.assert_close(reference.linear_int4x16(x, w16, s16, group_size, b), expected)
    fixed = reference.fixed16(x)  # 16-bit fixed point per row: within half a step of x, max |x| exact
    step = x.abs().amax(dim=1, keepdim=True) / layout.FIXED16_MAX
    assert ((fixed - x).abs() <= step / 2 * 1.001).all() and torch.equal(fixed.abs().amax(1), x.abs().amax(1))


@pytest.mark.parametrize("N,K", [(16, 32), (32, 96), (48, 256)])
def test_int4_interleaving_round_trips(N, K):
    packed, s = quantize_int4(torch.randn(N, K), 32)
    w16, s16 = reference.interleave_int4(packed, s)
    assert w16.shape == (N // 16, 8 * K) and s16.shape == (N // 16, K // 32, 16)
    back_w, back_s = reference.deinterleave_int4(w16, s16)
    assert torch.equal(back_w, packed) and torch.equal(back_s, s)
    # the documented layout: inputs 4..7 of block 0 are bytes 32..63, row 3's byte 2 * 3 = u[4] | u[6] << 4
    u = reference.unpack_int4(packed)
    assert w16[0, 32 + 6].item() == u[3, 4].item() | (u[3, 6].item() << 4)
    assert torch.equal(s16[0, :, 3], s[3])
    with pytest.raises(ValueError, match="divisible by 16"):
        reference.interleave_int4(packed[:15], s[:15])


@needs_kernels
def test_public_functions_take_the_kernel_path(monkeypatch):
    for name in ("linear_bf16", "linear_int8", "linear_int4", "linear_int4x16"):
        monkeypatch.setattr(reference, name, lambda *a, name=name: pytest.fail(f"{name} fell back to the reference"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    kernels.linear_bf16(x, torch.randn(5, 64).bfloat16(), torch.zeros(5))
    kernels.linear_int8(x, *quantize_int8(torch.randn(5, 64)))
    kernels.linear_int4(x[None], *quantize_int4(torch.randn(5, 64), 32), 32)
    kernels.linear_int4x16(x, *reference.interleave_int4(*quantize_int4(torch.randn(16, 64), 32)), 32)


def test_fallback_handles_what_the_kernels_do_not():
    w = torch.randn(6, 32).bfloat16()
    x = torch.randn(2, 32, dtype=torch.float16)
    assert kernels.linear_bf16(x, w).dtype == torch.float16  # fp16 activations: reference path
    xg = torch.randn(2, 32, requires_grad=True)
    y = kernels.linear_bf16(xg, w.float().requires_grad_())  # autograd: reference path
    y.sum().backward()
    assert xg.grad is not None
    with pytest.raises(RuntimeError):
        kernels.linear_bf16(torch.randn(2, 31), w)  # shape errors come from the reference


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replace_linear_keeps_the_function_and_the_state_dict(dtype):
    model = GLM.from_pretrained(FIXTURE, dtype=dtype)
    ids = torch.randint(0, 579, (2, 9))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids).float()
        kernels.replace_linear(model)
        after = model(ids).float()
    assert type(model.blocks[0].attn.qkv) is kernels.FastLinear and type(model.lm_head) is kernels.FastTiedHead
    assert list(model.state_dict()) == keys
    # bf16: stock and kernel sum in different orders and round differently; fp32: only the order differs
    close(after, before, 0.03 if dtype == torch.bfloat16 else 1e-5)


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, 8, 9, 17, 32, 70])  # passes of 8 rows and every tail
# part panels, odd k-pairs; at K 4096 rows go in chunks of 64 (70 rows: two)
@pytest.mark.parametrize("N,K", [(32, 2), (7, 34), (96, 64), (53, 1000), (160, 1026), (40, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernel_is_the_reference_math(M, N, K, dtype):
    x, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K).bfloat16(), torch.randn(N).to(dtype)
    packed = kernels.pack_weight(w)
    P = -(-N // 32)
    assert packed is not None and packed.shape == (P, K // 2, 64)
    # the documented layout: panel p, k-pair k2 holds W[32 p + j, 2 k2 + e] at 2 j + e; rows past N are zeros
    padded = torch.cat([w, w.new_zeros(32 * P - N, K)])
    assert torch.equal(packed, padded.view(P, 32, K // 2, 2).transpose(1, 2).reshape(P, K // 2, 64))
    for bias in (b, None):
        y = kernels.linear_packed(x, packed, N, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        ref = F.linear(bf16_exact(x), w.float(), None if bias is None else bias.float())
        close(y, ref, 1e-5 if dtype == torch.float32 else 2**-8)
    y3 = kernels.linear_packed(x.view(1, M, K), packed, N, b)
    close(y3, F.linear(bf16_exact(x), w.float(), b.float())[None], 2**-7)


@needs_kernels
def test_packing_refuses_what_it_cannot_lay_out():
    for w in (torch.randn(32, 63).bfloat16(), torch.randn(32, 64), torch.randn(64).bfloat16()):
        assert kernels.pack_weight(w) is None  # odd K, fp32, not a matrix: no panels, the module keeps the kernels
    packed = kernels.pack_weight(torch.randn(64, 32).bfloat16())
    with pytest.raises(RuntimeError, match=r"x must be a float32 or bf16 CPU tensor \[M, 32\]"):
        kernels.linear_packed(torch.randn(3, 31), packed, 64)
    with pytest.raises(RuntimeError, match=r"bias must be \[64\]"):
        kernels.linear_packed(torch.randn(3, 32), packed, 64, torch.randn(63))
    with pytest.raises(RuntimeError, match="packed must come from pack_bf16 of a weight with 70 rows"):
        kernels.linear_packed(torch.randn(3, 32), packed, 70)
    with pytest.raises(RuntimeError, match="pack_bf16: needs an even K"):
        torch.ops.glmkit_kernels.pack_bf16(torch.randn(40, 63).bfloat16())


@needs_kernels
def test_released_weights_live_in_panels_only():
    """``pack_linear(release=True)``: the linears keep only their panels, compute the same, and the state dict,
    loading and autograd still see the ``[N, K]`` weights."""
    model = GLM.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    kernels.replace_linear(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, model.config.n_embd).bfloat16()
    fc = model.blocks[0].attn.qkv
    kernels.pack_linear(model)
    packed_out = fc(x)
    assert kernels.pack_linear(model, release=True) == 4 * len(model.blocks) + 1
    assert fc.released and fc.weight.numel() == 0 and torch.equal(fc(x), packed_out)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(kernels.unpack_weight(fc.packed, fc.out_features), before["blocks.0.attn.qkv.weight"])
    changed = {k: v + 1 if k == "blocks.0.attn.qkv.weight" else v for k, v in before.items()}
    model.load_state_dict(changed)  # loading repacks
    assert fc.released and torch.equal(
        model.state_dict()["blocks.0.attn.qkv.weight"], changed["blocks.0.attn.qkv.weight"]
    )
    close(fc(x), F.linear(x.float(), changed["blocks.0.attn.qkv.weight"].float(), fc.bias.float()), 2**-7)
    xg = torch.randn(2, model.config.n_embd, requires_grad=True)
    fc(xg).float().sum().backward()  # autograd: the [N, K] weight rebuilt from the panels
    close(xg.grad, changed["blocks.0.attn.qkv.weight"].float().sum(0).expand(2, -1), 2**-6)


@needs_kernels
def test_prepacked_weights_compute_the_same_linear():
    model = GLM.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    kernels.replace_linear(model)
    assert kernels.pack_linear(model) == 4 * len(model.blocks) + 1  # every linear and the tied head
    fc = model.blocks[0].mlp.fc
    for rows in (1, 3, 16, 40):
        x = torch.randn(rows, fc.in_features).bfloat16()
        close(fc(x), F.linear(x.float(), fc.weight.float(), fc.bias.float()), 2**-7)
        h = torch.randn(rows, model.config.n_embd).bfloat16()
        close(model.lm_head(h, model.wte), F.linear(h.float(), model.wte.weight.float()), 2**-7)
    x = torch.randn(2, fc.in_features, requires_grad=True)
    fc(x).sum().backward()  # autograd bypasses the packed copy, which does not track the weight
    close(x.grad, fc.weight.float().sum(0).expand(2, -1), 2**-7)
    assert kernels.pack_linear(GLM.from_pretrained(FIXTURE)) == 0  # fp32 weights (and no FastLinear): nothing packed
