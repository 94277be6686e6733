"""Weight-only INT8 / INT4 quantization: error bounds, checkpoints that record their scheme and round-trip bit for
bit, a quantized model that is the full model with dequantized weights (within the kernels' rounding), generation,
and every bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmkit import GLM
from glmkit.checkpoint import CheckpointError, read_metadata
from glmkit.cli import main as cli
from glmkit.generate import generate
from glmkit.kernels import reference
from glmkit.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantScheme,
    quantize_checkpoint,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from tests.helpers.bounds import activation_error_bound, assert_within
from tests.helpers.generation import FIXTURE, SPECIAL

PROMPTS = [[582, 5, 6, 7, 583, 8, 9], [582, 40, 41, 42, 43, 44, 45, 46, 47, 579]]
QKV = "glm.transformer.layers.0.attention.query_key_value"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The reference fixture quantized three ways: {name: folder}; "int8" and "int4" keep the embeddings."""
    root = tmp_path_factory.mktemp("q")
    out = {}
    for name, kw in {
        "int8": {"bits": 8, "quantize_embeddings": False},
        "int4": {"bits": 4, "quantize_embeddings": False},
        "int4-emb": {"bits": 4},  # the default quantizes the word embeddings / tied head too
    }.items():
        out[name] = root / name
        quantize_checkpoint(FIXTURE, out[name], **kw)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.rand(64, 1)  # rows of different ranges
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (64,)
    assert (s.float() >= w.abs().amax(1) / 127).all()  # scales rounded up: nothing clips
    err = (reference.dequantize_int8(q, s) - w).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert rel_err(reference.dequantize_int8(q, s), w) < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bounds(group_size):
    w = torch.randn(16, 256)
    packed, s = quantize_int4(w, group_size)
    assert packed.shape == (16, 128) and s.shape == (16, 256 // group_size) and s.dtype == torch.bfloat16
    deq = reference.dequantize_int4(packed, s, group_size)
    step = s.float().abs().repeat_interleave(group_size, dim=1)
    err = (deq - w).abs()
    assert (err <= step * (1 + 1e-6)).all()  # half a step, a whole one where +8 clamps to +7
    assert (err <= step / 2 * (1 + 1e-6)).float().mean() > 0.99
    extreme = w.view(16, -1, group_size).abs().amax(-1)
    assert torch.allclose(deq.view(16, -1, group_size).abs().amax(-1), extreme, rtol=2**-7)  # the extreme is exact
    assert rel_err(deq, w) < {32: 0.1, 64: 0.11, 128: 0.12}[group_size]


def test_int4_linear_is_held_interleaved_and_saved_row_major():
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(2, 64)
    q = QuantizedLinear(64, 48, True, QuantScheme(4, 32))
    q.set_from(w)
    q.bias.data = b
    assert q.interleaved and q.weight.shape == (3, 512) and q.weight_scale.shape == (3, 2, 16)
    packed, s = quantize_int4(w, 32)
    state = q.state_dict()  # the checkpoint layout
    assert torch.equal(state["weight"], packed) and torch.equal(state["weight_scale"], s)
    fresh = QuantizedLinear(64, 48, True, QuantScheme(4, 32))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, q.weight) and torch.equal(fresh.weight_scale, q.weight_scale)
    # exact on the reference path; the kernels round x (bf16 or 16-bit fixed point) and sum in fp32
    deq = reference.dequantize_int4(packed, s, 32)
    assert_within(fresh(x), reference.linear_int4(x, packed, s, 32, b), activation_error_bound(x, deq))
    assert not QuantizedLinear(64, 40, True, QuantScheme(4, 32)).interleaved  # 40 rows: the row-major layout
    assert not QuantizedLinear(64, 48, True, QuantScheme(8)).interleaved


def test_int4_embedding_is_held_interleaved():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    emb = QuantizedEmbedding(48, 64, QuantScheme(4, 32))
    emb.set_from(w)
    packed, s = quantize_int4(w, 32)
    ids = torch.tensor([[0, 17, 47], [31, 16, 5]])
    assert emb.interleaved and torch.equal(emb.state_dict()["weight"], packed)
    assert torch.equal(emb(ids), reference.dequantize_int4(packed, s, 32, s.dtype)[ids])
    x = torch.randn(3, 64)
    deq = reference.dequantize_int4(packed, s, 32)
    assert_within(emb.linear(x), reference.linear_int4(x, packed, s, 32), activation_error_bound(x, deq))  # tied head


def test_checkpoint_records_the_scheme_and_round_trips_bit_exact(quantized, tmp_path):
    folder = quantized["int4"]
    config = json.loads((folder / "config.json").read_text())
    expected = {"bits": 4, "group_size": 32, "embeddings": False, "format": "glmkit-weight-only-v1"}
    assert config["glmkit_quantization"] == expected
    assert json.loads(read_metadata(folder / "model.safetensors")["glmkit_quantization"]) == expected
    tensors = load_file(folder / "model.safetensors")
    assert tensors[f"{QKV}.weight"].dtype == torch.uint8 and tensors[f"{QKV}.weight"].shape == (192, 32)
    assert tensors[f"{QKV}.weight_scale"].shape == (192, 2)
    assert tensors["glm.word_embeddings.weight"].dtype == torch.float32  # embeddings / tied head kept

    model = GLM.from_pretrained(folder)
    assert isinstance(model.blocks[1].mlp.proj, QuantizedLinear)
    in_memory = quantize_model(GLM.from_pretrained(FIXTURE), QuantScheme(4, 32))
    model.save_pretrained(tmp_path / "again")
    again = GLM.from_pretrained(tmp_path / "again").state_dict()
    for name, t in model.state_dict().items():
        for other in (in_memory.state_dict()[name], again[name]):
            assert t.dtype == other.dtype and torch.equal(t, other), name
    nbytes = sum(tensors[f"{QKV}.{k}"].nbytes for k in ("weight", "weight_scale"))
    assert nbytes == 192 * 64 * (1 / 2 + 2 / 32)  # 4 bits + a bf16 scale per 32 weights (vs 32 bits in fp32)


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    """The float weight a quantized module stands for, from its checkpoint layout."""
    state = module.state_dict()
    if module.bits == 8:
        return reference.dequantize_int8(state["weight"], state["weight_scale"])
    return reference.dequantize_int4(state["weight"], state["weight_scale"], module.group_size)


@pytest.mark.parametrize(
    "name,dtype",
    [("int8", torch.float32), ("int8", torch.bfloat16), ("int4", torch.float32), ("int4-emb", torch.bfloat16)],
)
def test_quantized_model_is_the_model_with_dequantized_weights(quantized, name, dtype):
    """Weight-only quantization changes the weights and nothing else: every quantized matmul of a forward pass (the
    tied head too where the embeddings are quantized), on the activations the quantized model really feeds it,
    equals ``x @ dequantized(W).T + b`` within the kernels' rounding (bounds.activation_error_bound: x rounded to
    bf16 or 16-bit fixed point, fp32 sums, the output rounded to the model's dtype). The remaining difference from
    the full model is the weights' own error, half a step each (the tests above)."""
    model = GLM.from_pretrained(quantized[name], dtype=dtype).eval()
    seen = []
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.register_forward_hook(lambda m, args, y: seen.append((_dequantized(m), m.bias, args[0], y)))
    if isinstance(model.wte, QuantizedEmbedding):
        model.lm_head.register_forward_hook(lambda m, args, y: seen.append((_dequantized(args[1]), None, args[0], y)))
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randint(0, 579, (2, 12)))
    assert len(seen) == 4 * model.config.n_layer + isinstance(model.wte, QuantizedEmbedding)
    for deq, bias, x, y in seen:
        exact = x.double() @ deq.double().T + (0 if bias is None else bias.double())
        assert_within(y, exact, activation_error_bound(x, deq, dtype, bias))


def test_int4_moves_the_logits_more_than_int8(quantized):
    ids = torch.randint(0, 579, (2, 12))
    with torch.no_grad():
        full = GLM.from_pretrained(FIXTURE)(ids)
        errs = {name: rel_err(GLM.from_pretrained(f)(ids), full) for name, f in quantized.items()}
    assert 0 < errs["int8"] < errs["int4"] < errs["int4-emb"]  # a step of amax/7 against amax/127


def test_quantized_models_generate(quantized):
    full = generate(GLM.from_pretrained(FIXTURE), PROMPTS, special_tokens=SPECIAL, max_new_tokens=6)
    for name in ("int8", "int4-emb"):
        for dtype in (torch.float32, torch.bfloat16):
            model = GLM.from_pretrained(quantized[name], dtype=dtype)
            out = generate(model, PROMPTS, special_tokens=SPECIAL, max_new_tokens=6)
            assert out.sequences.shape == full.sequences.shape
            if name == "int8" and dtype == torch.float32:
                assert out.new_tokens == full.new_tokens


def test_embeddings_quantized_by_default(quantized):
    model = GLM.from_pretrained(quantized["int4-emb"], dtype=torch.bfloat16)
    assert isinstance(model.wte, QuantizedEmbedding) and model.wte.weight.dtype == torch.uint8
    assert model.wpe.weight.dtype == torch.bfloat16 and model.ln_f.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([[582, 5, 6]])).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 3}, "bits: 3 is not supported"),
        ({"bits": 4, "group_size": 48}, "group_size: 48 is not supported"),
        ({"bits": 4, "group_size": 128}, "128 does not divide the input width 64 of wte"),
        ({"bits": 4, "group_size": 128, "quantize_embeddings": False}, "width 64 of blocks.0.attn.qkv"),
    ],
)
def test_bad_settings_are_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_checkpoint(FIXTURE, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_quantizing_twice_or_in_place_is_refused(quantized, tmp_path):
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(quantized["int8"], tmp_path / "twice", bits=4)
    with pytest.raises(ValueError, match="input folder"):
        quantize_checkpoint(FIXTURE, FIXTURE, bits=8)


def _copy(src, dst, config_edit=None, tensors_edit=None, header="sync"):
    """A copy of checkpoint ``src`` with edits; ``header="sync"`` records the edited config's scheme in the
    safetensors header too (so only the tensors can disagree), ``"keep"`` keeps the original header."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    metadata = read_metadata(src / "model.safetensors")
    if config_edit:
        config_edit(config)
    if tensors_edit:
        tensors_edit(tensors)
    if header == "sync":
        metadata.pop("glmkit_quantization", None)
        if "glmkit_quantization" in config:
            metadata["glmkit_quantization"] = json.dumps(config["glmkit_quantization"])
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
    return dst


def _set_scheme(**values):
    def edit(config):
        config["glmkit_quantization"] |= values

    return edit


def _drop_scheme(config):
    del config["glmkit_quantization"]


def _to_float(tensors):
    tensors[f"{QKV}.weight"] = tensors[f"{QKV}.weight"].float()


@pytest.mark.parametrize(
    "source,edits,match",
    [  # metadata that disagrees with the tensors, or with itself, is refused with the key named
        ("int4", {"config_edit": _set_scheme(bits=8, group_size=None)}, r"\.weight: checkpoint has torch.uint8"),
        ("int4", {"config_edit": _set_scheme(group_size=64)}, r"\.weight_scale: checkpoint shape \(\d+, 2\)"),
        ("int8", {"config_edit": _set_scheme(bits=4, group_size=32)}, r"\.weight: checkpoint has torch.int8"),
        ("int8", {"config_edit": _drop_scheme}, r"\.weight: checkpoint has torch.int8 .*not quantized"),
        ("int8", {"config_edit": _drop_scheme, "header": "keep"}, "disagrees with"),
        ("int8", {"config_edit": _set_scheme(group_size=32), "header": "keep"}, "group_size"),
        ("int8", {"tensors_edit": _to_float}, f"{QKV}.weight: checkpoint has torch.float32"),
    ],
)
def test_metadata_that_disagrees_is_refused(quantized, tmp_path, source, edits, match):
    with pytest.raises(CheckpointError, match=match):
        GLM.from_pretrained(_copy(quantized[source], tmp_path / "bad", **edits))


def test_cli(tmp_path, capsys):
    assert cli(["quantize", str(FIXTURE), str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert "int8 per channel" in capsys.readouterr().out
    assert cli(["quantize", str(FIXTURE), str(tmp_path / "q4"), "--bits", "4", "--group-size", "64"]) == 0
    assert GLM.from_pretrained(tmp_path / "q4").blocks[0].attn.qkv.group_size == 64
    assert isinstance(GLM.from_pretrained(tmp_path / "q8").wte, QuantizedEmbedding)  # by default
    assert cli(["quantize", str(FIXTURE), str(tmp_path / "keep"), "--bits", "8", "--no-quantize-embeddings"]) == 0
    assert type(GLM.from_pretrained(tmp_path / "keep").wte) is torch.nn.Embedding
    assert cli(["quantize", str(FIXTURE), str(tmp_path / "x"), "--bits", "8", "--group-size", "64"]) == 2
    assert cli(["quantize", str(FIXTURE), str(tmp_path / "x"), "--bits", "4", "--group-size", "128"]) == 2
    assert "does not divide" in capsys.readouterr().err
