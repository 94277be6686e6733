"""ChatGLM2 / ChatGLM3 / GLM-4 against their references: every logits and greedy case of tests/fixtures/chatglm2 (the
THUDM hub modeling_chatglm.py outputs) through the ordinary loader, transformers' GlmForCausalLM (GLM-4-9B's
architecture) on random weights converted to the hub layout, other head / group / rope configurations, and the
config checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmkit import GLM, KVCache
from glmkit.chatglm import ChatGLM2, ChatGLM2Config
from glmkit.chatglm.v2 import rope_angles
from glmkit.checkpoint import load_state_dict
from glmkit.config import ConfigError

from .conftest import FIXTURES

FX = FIXTURES / "chatglm2"
META = json.loads((FX / "cases.json").read_text())
EXPECTED = load_file(str(FX / "expected.safetensors"))
TOL = META["tolerance"]
CASES = {c["name"]: c for c in META["cases"]}


@pytest.fixture(scope="module")
def model():
    return GLM.from_pretrained(FX, dtype=torch.float32)


def _inputs(case):
    return (torch.tensor(case[k]) for k in ("input_ids", "position_ids")), torch.tensor(case["attention_mask"]["mask"])


def test_loads_through_the_ordinary_loader_unchanged(model):
    assert type(model) is ChatGLM2 and not model.training
    raw = load_state_dict(FX)
    assert torch.equal(model.wte.weight, raw["transformer.embedding.word_embeddings.weight"].float())
    qkv = "transformer.encoder.layers.1.self_attention.query_key_value"
    assert torch.equal(model.blocks[1].attn.qkv.bias, raw[qkv + ".bias"].float())
    assert torch.equal(model.lm_head.weight, raw["transformer.output_layer.weight"].float())
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)  # 4 query heads, 2 KV groups of 16
    assert GLM.from_pretrained(FX).wte.weight.dtype == torch.float16  # as stored unless a dtype is asked for


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("c_", "d_"))])
def test_logits_match_reference(model, name):
    case = CASES[name]
    (ids, pos), mask = _inputs(case)
    expected = EXPECTED[case["expected_tensors"][0]]
    with torch.no_grad():
        given = model(ids, position_ids=pos, attention_mask=mask)
        derived = model(ids, attention_mask=mask)  # positions counted from the padding mask, as the tokenizer does
        bare = model(ids) if bool(mask.all()) else given
    for out in (given, derived, bare):
        assert out.shape == expected.shape
        err = (out - expected).abs().max().item()
        assert err <= TOL["logits_atol"], f"{name}: max |diff| {err:.2e}"


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("c_", "d_"))])
def test_greedy_matches_reference_with_the_kv_cache(model, name):
    """The hub loop: prefill with the tokenizer's mask and positions, then one token per step, appending a 1 to
    the 2-D mask and last position + 1; our cache holds the KV groups only."""
    case = CASES[name]
    (ids, pos), mask = _inputs(case)
    B, S = ids.shape
    steps = case["gen_steps"]
    cache = KVCache.for_model(model, B, S + steps)
    assert cache.k.shape[2] == model.config.n_kv_head == 2
    step_logits, tokens = [], []
    with torch.no_grad():
        logits = model(ids, pos, mask, cache=cache)[:, -1]
        for _ in range(steps):
            step_logits.append(logits)
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            pos, mask = pos[:, -1:] + 1, torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = model(nxt[:, None], pos, mask, cache=cache)[:, -1]
    assert torch.stack(tokens, 1).tolist() == case["expected_token_ids"]
    err = (torch.stack(step_logits) - EXPECTED[f"{name}.step_logits"]).abs().max().item()
    assert err <= TOL["step_logits_atol"], f"{name}: max |diff| {err:.2e}"


# ---- GLM-4 (transformers GlmForCausalLM) and other configurations ------------------------------------------------

transformers = pytest.importorskip("transformers")


def _glm4_config(heads=4, groups=2, head_dim=16, hidden=48, rope_ratio=500.0, mha=False):
    """GLM-4-9B's config.json keys at toy size; ``hidden != heads * head_dim`` on purpose."""
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "attn_implementation": "sdpa",
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 80,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden,
        "kv_channels": head_dim,
        "layernorm_epsilon": 1.5625e-07,
        "multi_query_attention": not mha,
        "multi_query_group_num": groups,
        "num_attention_heads": heads,
        "num_hidden_layers": 3,
        "num_layers": 3,
        "rope_ratio": rope_ratio,
        "original_rope": True,
        "padded_vocab_size": 96,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 256,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "eos_token_id": [90, 91, 92],
        "pad_token_id": 90,
    }


def _hf_glm(cfg):
    kv = cfg["num_attention_heads"] if not cfg["multi_query_attention"] else cfg["multi_query_group_num"]
    hf_cfg = transformers.GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=kv,
        head_dim=cfg["kv_channels"],
        partial_rotary_factor=0.5,
        rope_theta=10000.0 * cfg["rope_ratio"],
        rms_norm_eps=cfg["layernorm_epsilon"],
        max_position_embeddings=cfg["seq_length"],
        attention_bias=True,
        pad_token_id=cfg["pad_token_id"],
        eos_token_id=cfg["eos_token_id"],
    )
    torch.manual_seed(7)
    hf = transformers.GlmForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # weights large enough that every term matters
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return hf


def _to_hub(hf, cfg) -> dict:
    """transformers' GlmForCausalLM state dict in the THUDM hub layout (convert_glm_weights_to_hf, backwards)."""
    sd = hf.state_dict()
    heads, d = cfg["num_attention_heads"], cfg["kv_channels"]
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.zeros(d // 4),  # present in hub checkpoints, unused
    }
    for i in range(cfg["num_layers"]):
        a, h = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        qkv = {}
        for p in ("weight", "bias"):
            q, k, v = (sd[f"{a}self_attn.{t}_proj.{p}"] for t in "qkv")
            if cfg["multi_query_attention"]:
                qkv[p] = torch.cat([q, k, v])
            else:  # per head [q_h | k_h | v_h], as the hub's split_tensor_along_last_dim reads it
                qkv[p] = torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], 1).flatten(0, 2)
        out |= {
            h + "input_layernorm.weight": sd[a + "input_layernorm.weight"],
            h + "post_attention_layernorm.weight": sd[a + "post_attention_layernorm.weight"],
            h + "self_attention.query_key_value.weight": qkv["weight"],
            h + "self_attention.query_key_value.bias": qkv["bias"],
            h + "self_attention.dense.weight": sd[a + "self_attn.o_proj.weight"],
            h + "mlp.dense_h_to_4h.weight": sd[a + "mlp.gate_up_proj.weight"],
            h + "mlp.dense_4h_to_h.weight": sd[a + "mlp.down_proj.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def write_hub_folder(folder, cfg, state):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))
    return folder


GLM4_VARIANTS = {
    "glm4_9b_shape": {},
    "one_kv_group": {"heads": 6, "groups": 1, "head_dim": 8, "hidden": 40},
    "four_groups_of_two": {"heads": 8, "groups": 4, "head_dim": 12, "hidden": 64, "rope_ratio": 1.0},
    "no_multi_query": {"heads": 4, "groups": 2, "head_dim": 16, "hidden": 32, "rope_ratio": 10000.0, "mha": True},
}


@pytest.mark.parametrize("variant", list(GLM4_VARIANTS))
def test_glm4_matches_transformers_glm(tmp_path, variant):
    cfg = _glm4_config(**GLM4_VARIANTS[variant])
    hf = _hf_glm(cfg)
    ours = GLM.from_pretrained(write_hub_folder(tmp_path / variant, cfg, _to_hub(hf, cfg)))
    heads, groups = cfg["num_attention_heads"], cfg["multi_query_group_num"]
    assert ours.config.n_kv_head == (heads if variant == "no_multi_query" else groups)
    ids = torch.randint(0, 90, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    valid = mask.bool()  # transformers leaves padding query rows to attend nothing: compare real tokens
    err = (got - expected)[valid].abs().max().item()
    assert err < 2e-5, f"max |diff| {err:.2e}"
    assert expected.abs().max() > 1  # the logits are not trivially small

    prompt = ids[:1, :12]
    reference = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=90)
    cache = KVCache.for_model(ours, 1, 32)
    tokens, step = prompt, prompt
    with torch.no_grad():
        for _ in range(10):
            step = ours(step, cache=cache)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], 1)
    assert tokens.tolist() == reference.tolist()


def test_rope_ratio_and_groups_matter(tmp_path):
    """The switches are read: a different rope_ratio or grouping gives other logits (the tests above would not see
    a switch that is ignored in both directions)."""
    cfg = _glm4_config()
    state = _to_hub(_hf_glm(cfg), cfg)
    base = GLM.from_pretrained(write_hub_folder(tmp_path / "a", cfg, state))
    ratio = GLM.from_pretrained(write_hub_folder(tmp_path / "b", cfg | {"rope_ratio": 1.0}, state))
    ids = torch.arange(40)[None] % 90
    with torch.no_grad():
        assert (base(ids) - ratio(ids)).abs().max() > 1e-2


def test_chatglm2_32k_interpolates_positions():
    """ChatGLM2-6B-32k's hub code divides positions by rope_ratio (base 10000); ChatGLM3 and GLM-4 multiply the
    base. The config keys are the same, so the checkpoint's name decides, unless glmkit's own key says."""
    hub = json.loads((FX / "config.json").read_text()) | {"rope_ratio": 16, "_name_or_path": "THUDM/chatglm2-6b-32k"}
    interpolated = ChatGLM2Config.from_hub_dict(hub)
    assert interpolated.rope_interpolation
    assert not ChatGLM2Config.from_hub_dict(hub | {"_name_or_path": "THUDM/chatglm3-6b-32k"}).rope_interpolation
    assert ChatGLM2Config.from_hub_dict(interpolated.to_hub_dict()) == interpolated
    plain = ChatGLM2Config.from_hub_dict(json.loads((FX / "config.json").read_text()))
    pos = torch.arange(0, 64, 16)[None]
    for got, expected in zip(rope_angles(pos, interpolated), rope_angles(pos / 16, plain), strict=True):
        assert torch.equal(got, expected)


# ---- config checks ------------------------------------------------------------------------------------------------


def test_config_round_trips():
    hub = json.loads((FX / "config.json").read_text())
    config = ChatGLM2Config.from_hub_dict(hub)
    assert (config.n_layer, config.n_head, config.n_kv_head, config.head_size) == (2, 4, 2, 16)
    assert ChatGLM2Config.from_hub_dict(config.to_hub_dict()) == config


@pytest.mark.parametrize(
    "change",
    [{}, {"rmsnorm": False}, {"add_bias_linear": True}, {"post_layer_norm": False}, {"multi_query_attention": False}]
    + [{"pre_seq_len": 4}, {"pre_seq_len": 3, "prefix_projection": True}],
)
def test_parameter_count(change):
    config = ChatGLM2Config(**change)
    assert config.num_parameters() == sum(p.numel() for p in ChatGLM2(config).parameters())


def test_parameter_count_of_the_released_shapes():
    """ChatGLM2/3-6B: 6.244 B parameters; GLM-4-9B: 9.400 B (THUDM's model cards)."""
    v2 = ChatGLM2Config(28, 4096, 32, 128, True, 2, 13696, 65024, 32768)
    glm4 = ChatGLM2Config(40, 4096, 32, 128, True, 2, 13696, 151552, 131072, 1.5625e-07, rope_ratio=500.0)
    for config, expected in ((v2, 6_243_584_000), (glm4, 9_399_951_360)):
        with torch.device("meta"):
            assert sum(p.numel() for p in ChatGLM2(config).parameters()) == config.num_parameters() == expected


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_scaling": 2}, "unknown ChatGLM2/3/GLM-4 config field(s) ['rope_scaling']"),
        ({"multi_query_group_num": 3}, "multi_query_group_num: 3 KV groups do not divide num_attention_heads=4"),
        ({"kv_channels": 10}, "kv_channels: RoPE turns pairs"),
        ({"num_layers": 0}, "num_layers: expected a positive int"),
        ({"num_hidden_layers": 3}, "num_hidden_layers: 3 disagrees with num_layers=2"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"eos_token_id": 320}, "eos_token_id: expected token id(s) in [0, 320)"),
        ({"rope_ratio": -1}, "rope_ratio: expected a positive number"),
        ({"rmsnorm": "yes"}, "rmsnorm: expected true or false"),
    ],
)
def test_bad_config_fields_are_named(tmp_path, change, named):
    hub = json.loads((FX / "config.json").read_text()) | change
    folder = write_hub_folder(tmp_path / "bad", hub, load_file(str(FX / "model.safetensors")))
    with pytest.raises(ConfigError, match=None) as e:
        GLM.from_pretrained(folder)
    assert named in str(e.value) and "config.json" in str(e.value)


def test_a_chatglm_config_of_no_known_generation_is_refused(tmp_path):
    hub = {"model_type": "chatglm", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="cannot tell the generation"):
        GLM.from_pretrained(write_hub_folder(tmp_path / "x", hub, {"w": torch.zeros(1)}))
