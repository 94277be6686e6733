"""ChatGLM hub layouts: sharded safetensors / pytorch_model-*.bin folders with their index, save_pretrained round trips,
the hub INT4/INT8 checkpoints (built here from the chatglm2 fixture exactly as THUDM quantization.py packs them) loading
losslessly into glmkit's quantized layers, and P-tuning v2 prefixes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmkit import GLM, KVCache
from glmkit.chatglm import ChatGLM2
from glmkit.chatglm.hub import save_pretrained
from glmkit.checkpoint import CheckpointError
from glmkit.config import ConfigError
from glmkit.kernels.reference import dequantize_int4, dequantize_int8
from glmkit.quantize import QuantizedLinear, QuantScheme, quantize_model

from .conftest import FIXTURES

FX = FIXTURES / "chatglm2"
HUB = load_file(str(FX / "model.safetensors"))
IDS = torch.tensor([[301, 303, 172, 221, 158, 168, 245, 164, 223, 192, 76, 69, 101, 195, 61, 6]])
QUANTIZED = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def hub_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM quantization.py ``QuantizedLinear.__init__`` on an fp16 weight: per-row absmax scale in fp16,
    ``round(w / scale)`` in fp16, and for 4 bits ``compress_int4_weight``: byte j = q[2j] << 4 | (q[2j+1] & 0xF)."""
    w = weight.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        pairs = q.to(torch.int16)
        q = (((pairs[:, 0::2] << 4) | (pairs[:, 1::2] & 0x0F)) & 0xFF).to(torch.uint8).view(torch.int8)
    return q, scale


def hub_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """THUDM ``extract_weight_to_float``: sign-extended nibbles (high = even input), times the row's scale."""
    if bits == 4:
        b = q.to(torch.int16)
        q = torch.stack([b >> 4, (b << 12) >> 12], dim=-1).flatten(1)  # arithmetic shifts sign-extend
    return q.float() * scale.float()[:, None]


def write_folder(folder, config, state, bits=0, fixture=FX):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((fixture / "config.json").read_text()) | config | ({"quantization_bit": bits} if bits else {})
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def hub_quantized_checkpoint(folder, bits, fixture=FX):
    """The fixture's weights as the hub's -int4 / -int8 checkpoints hold them (the four linear layers of every
    transformer layer quantized, everything else float)."""
    weights = load_file(str(fixture / "model.safetensors"))
    state = dict(weights)
    for k, w in weights.items():
        if k.endswith(".weight") and k.split(".")[-2] in QUANTIZED:
            state[k], state[k + "_scale"] = hub_quantize(w, bits)
    return write_folder(folder, {}, state, bits, fixture), state


def test_hub_int4_packing_matches_the_published_vector():
    q, scale = hub_quantize(torch.tensor([[0.5, -1.0, 0.25, 0.75]]), 4)
    assert scale.item() == 0.142822265625 and q.view(torch.uint8).tolist() == [[0x49, 0x25]]
    q8, scale8 = hub_quantize(torch.tensor([[0.5, -1.0, 0.25, 0.75]]), 8)
    assert scale8.item() == 0.00787353515625 and q8.tolist() == [[64, -127, 32, 95]]


@pytest.mark.parametrize("bits", [8, 4])
def test_hub_quantized_checkpoint_loads_losslessly(tmp_path, bits):
    folder, state = hub_quantized_checkpoint(tmp_path / f"int{bits}", bits)
    model = GLM.from_pretrained(folder, dtype=torch.bfloat16)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * model.config.n_layer and all(m.bits == bits for m in layers.values())
    ours = model.state_dict()  # glmkit's checkpoint layout (int4 de-interleaved)
    names = {"attn.qkv": "self_attention.query_key_value", "attn.proj": "self_attention.dense"}
    names |= {"mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    for name, m in layers.items():
        i, module = name.split(".", 2)[1:]
        key = f"transformer.encoder.layers.{i}.{names[module]}.weight"
        w, s = ours[name + ".weight"], ours[name + ".weight_scale"]
        assert s.dtype == torch.float32  # fp16 scales kept exactly, whatever dtype the model takes
        got = dequantize_int8(w, s) if bits == 8 else dequantize_int4(w, s, m.group_size)
        assert torch.equal(got, hub_dequantize(state[key], state[key + "_scale"], bits)), key
    assert model.wte.weight.dtype == torch.bfloat16  # embeddings, norms, output layer stay float

    # the quantized layers run: the same logits as a float model holding the dequantized weights
    reference = GLM.from_pretrained(FX, dtype=torch.float32)
    for name, m in layers.items():
        w, s = ours[name + ".weight"], ours[name + ".weight_scale"]
        dense = dequantize_int8(w, s) if bits == 8 else dequantize_int4(w, s, m.group_size)
        reference.get_submodule(name).weight.data.copy_(dense)
    model = GLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        err = (model(IDS) - reference(IDS)).abs().max().item()
    assert err < 2e-3, f"max |diff| {err:.2e}"  # activations are rounded by the kernels (fixed16 / bf16)


@pytest.mark.parametrize("fixture", ["chatglm2", "chatglm6b"])
@pytest.mark.parametrize("bits", [8, 4])
def test_hub_quantized_model_saves_in_the_hub_format(tmp_path, bits, fixture):
    """Loading and saving again gives the hub tensors back bit for bit (both generations share the format)."""
    folder, state = hub_quantized_checkpoint(tmp_path / "src", bits, FIXTURES / fixture)
    model = GLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 4 * model.config.n_layer
    save_pretrained(model, tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_bit"] == bits
    state = {k: v for k, v in state.items() if not k.endswith("inv_freq")}  # buffers the hub code rebuilds
    assert sorted(saved) == sorted(state)
    for k, t in state.items():
        assert saved[k].dtype == t.dtype or t.is_floating_point(), k
        assert torch.equal(saved[k].to(t.dtype), t), k


def test_hub_int4_checkpoint_errors_are_named(tmp_path):
    folder, state = hub_quantized_checkpoint(tmp_path / "a", 4)
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight_scale"
    del state[key]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{key}.*quantization_bit=4"):
        GLM.from_pretrained(folder)
    _, state = hub_quantized_checkpoint(tmp_path / "b", 4)
    wrong = write_folder(tmp_path / "c", {}, state, bits=8)  # int4-packed tensors under quantization_bit 8
    with pytest.raises(CheckpointError, match="query_key_value.weight: checkpoint shape .* quantization_bit=8"):
        GLM.from_pretrained(wrong)
    with pytest.raises(ConfigError, match="quantization_bit: 3 is not a hub format"):
        GLM.from_pretrained(write_folder(tmp_path / "d", {}, state, bits=3))


def test_float_checkpoint_errors_are_named(tmp_path):
    state = dict(HUB)
    state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] = torch.zeros(3, 64)
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h.weight: checkpoint shape \(3, 64\).*\(192, 64\)"):
        GLM.from_pretrained(write_folder(tmp_path / "a", {}, state))
    state = dict(HUB) | {"transformer.encoder.layers.5.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected tensor.*layers.5.extra"):
        GLM.from_pretrained(write_folder(tmp_path / "b", {}, state))


def test_glmkit_quantized_model_round_trips_in_its_own_format(tmp_path):
    model = quantize_model(GLM.from_pretrained(FX, dtype=torch.float32), QuantScheme(4, 32))
    model.save_pretrained(tmp_path / "q")  # per-group scales: the hub format cannot hold them
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_bit" not in config and config["glmkit_quantization"]["group_size"] == 32
    again = GLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))


def test_sharded_safetensors_round_trip_keeps_other_files(tmp_path):
    model = GLM.from_pretrained(FX, dtype=torch.float32)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"kept")
    model.save_pretrained(out, max_shard_size=60_000)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert (out / "tokenizer.model").read_bytes() == b"kept" and not (out / "model.safetensors").exists()
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in index["weight_map"]
    again = GLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    model.save_pretrained(out)  # re-saving unsharded leaves no stale shards behind
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]


def test_sharded_pytorch_bin_checkpoint_loads_safely(tmp_path):
    """The ChatGLM2-6B hub layout: pytorch_model-0000k-of-00002.bin shards with pytorch_model.bin.index.json."""
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(FX / "config.json", folder / "config.json")
    keys = sorted(HUB)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
    halves["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
    for name, part in halves.items():
        torch.save({k: HUB[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        assert torch.equal(GLM.from_pretrained(folder)(IDS), GLM.from_pretrained(FX)(IDS))
    torch.save({"code": print}, folder / "pytorch_model-00002-of-00002.bin")  # an object, not tensors
    with pytest.raises(CheckpointError, match="refused to load: not a plain tensor checkpoint"):
        GLM.from_pretrained(folder)


def test_ptuning_prefix_is_keys_and_values_in_front_of_the_prompt(tmp_path):
    """A P-tuning v2 prefix acts as cached keys/values: build one from the cache of a 3-token text and the prefixed
    model must give what the plain model gives for the same tokens after that cache (positions from 0 in both)."""
    base = GLM.from_pretrained(FX, dtype=torch.float32)
    c = base.config
    cache = KVCache.for_model(base, 1, 32)
    with torch.no_grad():
        base(torch.tensor([[301, 303, 40]]), cache=cache)
        keys, values = cache.k[:, 0, :, :3], cache.v[:, 0, :, :3]  # [L, G, 3, d]
        prefix = torch.stack([keys, values], 1).permute(3, 0, 1, 2, 4).reshape(3, c.n_layer * 2 * c.n_kv_head * 16)
        state = dict(HUB) | {"transformer.prefix_encoder.embedding.weight": prefix.half()}
        prefixed = GLM.from_pretrained(write_folder(tmp_path / "p", {"pre_seq_len": 3}, state), dtype=torch.float32)
        rounded = prefix.half().float().view(3, c.n_layer, 2, c.n_kv_head, 16).permute(2, 1, 3, 0, 4)
        cache.k[:, 0, :, :3], cache.v[:, 0, :, :3] = rounded  # the prefix as stored (fp16)
        ids = IDS[:, 2:10]
        expected = base(ids, position_ids=torch.arange(8)[None], cache=cache)
        got = prefixed(ids)
        assert (got - expected).abs().max().item() < 1e-5
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])  # left padding next to the prefix
        assert torch.isfinite(prefixed(ids, attention_mask=mask)).all()
    projected = write_folder(
        tmp_path / "q",
        {"pre_seq_len": 2, "prefix_projection": True},
        dict(HUB)
        | {
            "transformer.prefix_encoder.embedding.weight": torch.randn(2, 64),
            "transformer.prefix_encoder.trans.0.weight": torch.randn(64, 64),
            "transformer.prefix_encoder.trans.0.bias": torch.randn(64),
            "transformer.prefix_encoder.trans.2.weight": torch.randn(c.n_layer * 2 * 2 * 16, 64),
            "transformer.prefix_encoder.trans.2.bias": torch.randn(c.n_layer * 2 * 2 * 16),
        },
    )
    with torch.no_grad():
        assert GLM.from_pretrained(projected)(ids).shape == (1, 8, c.vocab_size)


def test_a_prefix_checkpoint_without_the_prefix_weights_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="missing tensor.*transformer.prefix_encoder.embedding.weight"):
        GLM.from_pretrained(write_folder(tmp_path / "p", {"pre_seq_len": 4}, dict(HUB)))


def test_loaded_model_type():
    assert isinstance(GLM.from_pretrained(FX), ChatGLM2)
