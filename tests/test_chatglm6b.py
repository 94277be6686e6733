"""ChatGLM-6B (v1) against the THUDM hub ``modeling_chatglm.py``: every logits case and every greedy case of
tests/fixtures/chatglm6b within its tolerance (2e-5; token ids exact), through the KV cache; an independent
hub-convention reference (checked on the fixture first) on other shapes; config errors that name the field."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from glmkit import GLM, KVCache
from glmkit.chatglm.hub import load_pretrained, save_pretrained
from glmkit.chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from glmkit.checkpoint import CheckpointError
from glmkit.config import ConfigError
from glmkit.generate import generate
from glmkit.masks import chatglm6b_inputs
from glmkit.prompts import layout

from .conftest import FIXTURES

FX = FIXTURES / "chatglm6b"
META = json.loads((FX / "cases.json").read_text())
CASES = {c["name"]: c for c in META["cases"]}
EXPECTED = load_file(str(FX / "expected.safetensors"))
TOL = META["tolerance"]
HUB_CONFIG = json.loads((FX / "config.json").read_text())


def write_checkpoint(folder, config: dict, state: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def model():
    """The fixture folder through the ordinary loader (fp16 weights upcast to fp32, as the reference ran)."""
    m = GLM.from_pretrained(FX, dtype=torch.float32)
    assert type(m) is ChatGLM6B
    return m


def test_loads_hub_layout_unchanged(model, tmp_path):
    raw = load_file(str(FX / "model.safetensors"))
    ours = model.state_dict()
    assert torch.equal(
        ours["blocks.1.attn.qkv.weight"], raw["transformer.layers.1.attention.query_key_value.weight"].float()
    )
    assert torch.equal(ours["lm_head.weight"], raw["lm_head.weight"].float())
    assert not torch.equal(ours["lm_head.weight"], ours["wte.weight"])  # untied
    assert model.config.inner_hidden_size == 256 and model.blocks[0].mlp.fc.out_features == 256
    save_pretrained(model, tmp_path / "saved")
    again = load_file(str(tmp_path / "saved" / "model.safetensors"))
    expected = {k for k in raw if not k.endswith("rotary_emb.inv_freq")}
    assert set(again) == expected and all(torch.equal(again[k], raw[k].float()) for k in expected)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["inner_hidden_size"] == 256
    reloaded = load_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), ours.values(), strict=True))


def _positions(case):
    return torch.stack([torch.tensor(case["position_ids"]), torch.tensor(case["block_position_ids"])], dim=1)


def _hub_mask(case):
    return torch.tensor(case["attention_mask"]["mask"])  # True = masked


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ---- logits --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a_gmask_sop_single", "c_mask_infill_tokens_after_sop"])
def test_positions_and_mask_derived_from_input_ids(name):
    case = CASES[name]
    c = HUB_CONFIG
    pos, visible = chatglm6b_inputs(
        torch.tensor(case["input_ids"]),
        sop_id=c["bos_token_id"],
        mask_id=c["mask_token_id"],
        gmask_id=c["gmask_token_id"],
    )
    assert torch.equal(pos, _positions(case))
    assert torch.equal(~visible, _hub_mask(case))


@pytest.mark.parametrize("name", ["a_gmask_sop_single", "b_batch2_left_pad", "c_mask_infill_tokens_after_sop"])
def test_logits_match_reference(model, name):
    """a, c: called with input_ids only (positions and mask derived); b: the tokenizer's left-padded batch with its
    bool mask (True = masked) and positions, padding rows included."""
    case = CASES[name]
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        if case["call"] == "model(input_ids)":
            logits = model(ids)
        else:
            logits = model(ids, position_ids=_positions(case), attention_mask=_hub_mask(case))
    assert logits.shape == EXPECTED[f"{name}.logits"].shape
    assert _max_diff(logits, EXPECTED[f"{name}.logits"]) <= TOL["logits_atol"]


# ---- greedy decoding through the KV cache -------------------------------------------------------------------


def hub_greedy(model, case, prompt):
    """The hub's stream_generate loop without processors over glmkit's KVCache: the prompt once, then one token
    per step at the case's (position, block) with the mask row the hub would feed. Returns (tokens, step logits)."""
    ids = torch.tensor(prompt["input_ids"])
    B, S = ids.shape
    steps = case["gen_steps"]
    padded = "attention_mask" in case
    cache = KVCache.for_model(model, B, S + steps)
    with torch.no_grad():
        if padded:
            mask = _hub_mask(case)
            logits = model(ids, _positions(case), mask, cache=cache)[:, -1]
            row = mask[:, :, -1:, :]  # the new token's row: a copy of the last one, its own column visible
        else:
            logits = model(ids, cache=cache)[:, -1]
        tokens, step_logits = [], [logits]
        for k in range(1, steps):
            token = logits.argmax(-1)
            tokens.append(token)
            pos = torch.tensor(case["decode_step_position_ids"][k - 1])[:, :, None]  # [B, 2, 1]
            m = None
            if padded:
                row = torch.cat([row, torch.zeros(B, 1, 1, 1, dtype=torch.bool)], dim=-1)
                m = row
            logits = model(token[:, None], pos, m, cache=cache)[:, -1]
            step_logits.append(logits)
        tokens.append(logits.argmax(-1))
    return torch.stack(tokens, 1), torch.stack(step_logits)


@pytest.mark.parametrize("name", ["d_greedy_single", "e_greedy_batch2_left_pad"])
def test_greedy_through_cache_matches_reference(model, name):
    case = CASES[name]
    tokens, step_logits = hub_greedy(model, case, CASES[case["from_case"]])
    assert tokens.tolist() == case["expected_token_ids"]
    assert torch.equal(tokens, EXPECTED[f"{name}.generated_ids"])
    assert _max_diff(step_logits, EXPECTED[f"{name}.step_logits"]) <= TOL["step_logits_atol"]


def test_cached_equals_uncached(model):
    """Recomputing prompt + generated tokens in one uncached call gives the cached step logits."""
    case = CASES["d_greedy_single"]
    tokens, step_logits = hub_greedy(model, case, CASES["a_gmask_sop_single"])
    full = torch.cat([torch.tensor(CASES["a_gmask_sop_single"]["input_ids"]), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(full)  # positions and mask derived: <sop> onward causal at (mask position, 1, 2, ...)
    S = full.shape[1] - tokens.shape[1] + 1
    assert _max_diff(logits[:, S - 1 :].transpose(0, 1), step_logits) <= 1e-5


# ---- an independent reference in the hub's own formulation, for other shapes ------------------------------------


def hub_reference(state, config, ids, position_ids, mask):
    """The hub forward as the THUDM code writes it ([S, B, H] layout, q / (sqrt(d)·(layer+1)), -10000 fill, scores ·
    (layer+1), rotate_half on chunked halves, the tanh GELU formula), in float64."""
    w = {k: v.double() for k, v in state.items()}
    H, nh, eps = config["hidden_size"], config["num_attention_heads"], config["layernorm_epsilon"]
    d = H // nh
    half = d // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))).half().double()
    alpha = math.sqrt(2 * 28)

    def rope(t, p):  # t [S, B, nh, half], p [B, S]
        freqs = p.T.double()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], -1)[:, :, None]
        rotated = torch.cat([-t[..., half // 2 :], t[..., : half // 2]], -1)
        return t * emb.cos() + rotated * emb.sin()

    def ln(x, name):
        return F.layer_norm(x, (H,), w[name + ".weight"], w[name + ".bias"], eps)

    x = F.embedding(ids, w["transformer.word_embeddings.weight"]).transpose(0, 1)
    S, B = x.shape[:2]
    for layer in range(config["num_layers"]):
        p = f"transformer.layers.{layer}."
        h = ln(x, p + "input_layernorm")
        qkv = F.linear(h, w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"])
        q, k, v = qkv.view(S, B, nh, 3 * d).split(d, dim=-1)
        q = torch.cat([rope(q[..., :half], position_ids[:, 0]), rope(q[..., half:], position_ids[:, 1])], -1)
        k = torch.cat([rope(k[..., :half], position_ids[:, 0]), rope(k[..., half:], position_ids[:, 1])], -1)
        coeff = layer + 1
        scores = torch.einsum("sbnd,tbnd->bnst", q / (math.sqrt(d) * coeff), k)
        scores = scores.masked_fill(mask, -10000.0) * coeff
        ctx = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(S, B, H)
        x = h * alpha + F.linear(ctx, w[p + "attention.dense.weight"], w[p + "attention.dense.bias"])
        m = ln(x, p + "post_attention_layernorm")
        a = F.linear(m, w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"])
        a = 0.5 * a * (1.0 + torch.tanh(0.7978845608028654 * a * (1.0 + 0.044715 * a * a)))
        x = m * alpha + F.linear(a, w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"])
    x = ln(x, "transformer.final_layernorm")
    return F.linear(x, w["lm_head.weight"]).transpose(0, 1)


def test_reference_reproduces_fixture():
    state = load_file(str(FX / "model.safetensors"))
    for name in ("a_gmask_sop_single", "b_batch2_left_pad", "c_mask_infill_tokens_after_sop"):
        case = CASES[name]
        ref = hub_reference(state, HUB_CONFIG, torch.tensor(case["input_ids"]), _positions(case), _hub_mask(case))
        assert _max_diff(ref.float(), EXPECTED[f"{name}.logits"]) <= TOL["logits_atol"]


def random_checkpoint(hidden, heads, inner, layers, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = {
        **HUB_CONFIG,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "inner_hidden_size": inner,
        "num_layers": layers,
        "vocab_size": vocab,
        "bos_token_id": 90,
        "eos_token_id": 91,
        "mask_token_id": 92,
        "gmask_token_id": 93,
        "pad_token_id": 3,
    }
    shapes = {"transformer.word_embeddings.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes |= {f"transformer.final_layernorm.{t}": (hidden,) for t in ("weight", "bias")}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for name, out, inp in (
            ("attention.query_key_value", 3 * hidden, hidden),
            ("attention.dense", hidden, hidden),
            ("mlp.dense_h_to_4h", inner, hidden),
            ("mlp.dense_4h_to_h", hidden, inner),
        ):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (out, inp), (out,)
        for name in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (hidden,), (hidden,)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g) * (0.05 if key.endswith("bias") else 0.2)
        state[key] = (1 + t) if "layernorm.weight" in key else t
    return config, state


@pytest.mark.parametrize(("hidden", "heads", "inner", "layers"), [(72, 3, 100, 3), (64, 8, 40, 1)])
def test_other_shapes_match_reference(hidden, heads, inner, layers, tmp_path):
    """Head sizes 24 and 8, an MLP narrower than the hidden size, 1 and 3 layers: a left-padded batch with a gMASK
    row and a MASK-infill row, against the reference, then greedy steps cached vs uncached."""
    config, state = random_checkpoint(hidden, heads, inner, layers)
    model = load_pretrained(write_checkpoint(tmp_path, config, state))
    rows = [[5, 6, 7, 8, 9, 10, 93, 90, 11, 12], [3, 3, 3, 20, 92, 21, 22, 90, 23, 24]]
    ids = torch.tensor(rows)
    position_ids = torch.zeros(2, 2, 10, dtype=torch.long)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # the tokenizer's left padding: pad rows/columns masked
    for b, pad in enumerate((0, 3)):
        pos, visible = chatglm6b_inputs(torch.tensor([rows[b][pad:]]), sop_id=90, mask_id=92, gmask_id=93)
        position_ids[b, :, pad:], mask[b, :, pad:, pad:] = pos[0], ~visible[0]
    assert position_ids[1, :, -1].tolist() == [1, 3]  # [MASK] at 1 of the unpadded row, block 3
    with torch.no_grad():
        logits = model(ids, position_ids, mask)
    ref = hub_reference(state, config, ids, position_ids, mask)
    assert _max_diff(logits, ref.float()) <= 2e-5

    cache = KVCache.for_model(model, 2, 12)
    with torch.no_grad():
        model(ids[:, :-1], position_ids[..., :-1], mask[:, :, :-1, :-1], cache=cache)
        last = model(ids[:, -1:], position_ids[..., -1:], mask[:, :, -1:, :], cache=cache)
    assert _max_diff(last[:, 0], logits[:, -1]) <= 1e-5


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rotary_percent": 0.5}, r"unknown ChatGLM-6B config field\(s\) \['rotary_percent'\]"),
        ({"num_attention_heads": 5}, "num_attention_heads: 5 heads do not divide hidden_size=64"),
        ({"num_attention_heads": 8}, "num_attention_heads: the head size .* = 8"),  # 8 is fine: 64 / 8 = 8
        ({"hidden_size": 72, "num_attention_heads": 12}, "num_attention_heads: the head size .* = 6 must be divis"),
        ({"position_encoding_2d": False}, "position_encoding_2d: expected true"),
        ({"quantization_bit": 3}, "quantization_bit: expected 0, 4 or 8"),
        ({"pre_seq_len": 16}, "pre_seq_len: expected null"),
        ({"gmask_token_id": 400}, "gmask_token_id: id 400 is outside the vocabulary"),
        ({"inner_hidden_size": 0}, "inner_hidden_size: expected a positive int, got 0"),
        ({"layernorm_epsilon": "1e-5"}, "layernorm_epsilon: expected a small positive float"),
        ({"model_type": "chatglm2"}, "model_type: expected 'chatglm'"),
    ],
)
def test_bad_config_names_the_field(change, message):
    config = {**HUB_CONFIG, **change}
    if change == {"num_attention_heads": 8}:
        assert ChatGLM6BConfig.from_hub_dict(config).head_size == 8
        return
    with pytest.raises(ConfigError, match=message):
        ChatGLM6BConfig.from_hub_dict(config)


def test_missing_config_field_is_named():
    config = {k: v for k, v in HUB_CONFIG.items() if k != "inner_hidden_size"}
    with pytest.raises(ConfigError, match=r"missing required ChatGLM-6B config field\(s\) \['inner_hidden_size'\]"):
        ChatGLM6BConfig.from_hub_dict(config)


def test_bad_checkpoint_and_inputs_are_named(model, tmp_path):
    state = load_file(str(FX / "model.safetensors"))
    missing = write_checkpoint(tmp_path / "a", HUB_CONFIG, {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*lm_head.weight"):
        load_pretrained(missing)
    bad = write_checkpoint(
        tmp_path / "b", HUB_CONFIG, {**state, "transformer.layers.0.attention.dense.weight": torch.zeros(64, 65)}
    )
    with pytest.raises(CheckpointError, match=r"transformer.layers.0.attention.dense.weight: .*\(64, 65\)"):
        load_pretrained(bad)
    odd = write_checkpoint(tmp_path / "c", {**HUB_CONFIG, "num_attention_heads": 5}, state)
    with pytest.raises(ConfigError, match=r"config.json: num_attention_heads: 5 heads do not divide hidden_size=64"):
        load_pretrained(odd)
    with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 320\)"):
        model(torch.tensor([[5, 320]]))
    with pytest.raises(ValueError, match="row 0 has <sop> .* but no \\[gMASK\\]"):
        model(torch.tensor([[5, 6, 284]]))
    with pytest.raises(ValueError, match="attention_mask: expected a bool"):
        model(torch.tensor([[5, 281, 284]]), attention_mask=torch.zeros(1, 3, 3, dtype=torch.bool))
    cache = KVCache.for_model(model, 1, 8)
    model(torch.tensor([[5, 281, 284]]), cache=cache)
    with pytest.raises(ValueError, match="position_ids: needed once the cache holds tokens"):
        model(torch.tensor([[7]]), cache=cache)


# ---- glmkit's generation ----------------------------------------------------------------------------------------


def test_generate_reproduces_greedy_cases():
    """glmkit's engine (a right-padded prefill, then ``<sop>`` and each new token at (blank, block) over the KV cache)
    gives the hub's greedy tokens, alone and in a ragged batch; top-k 1 sampling and beam search of width 1 too.
    The prompts are the tokenizer's without the trailing ``<sop>``, which the engine feeds."""
    model = GLM.from_pretrained(FX, dtype=torch.float32)  # generate() swaps in the kernels' layers: a copy of its own
    single = CASES["a_gmask_sop_single"]["input_ids"][0][:-1]
    (b0, b1), pads = CASES["b_batch2_left_pad"]["input_ids"], CASES["b_batch2_left_pad"]["left_pad_lengths"]
    batch = [b0[pads[0] : -1], b1[pads[1] : -1]]
    for prompts, name in (([single], "d_greedy_single"), (batch, "e_greedy_batch2_left_pad")):
        expected = CASES[name]["expected_token_ids"]
        no_stop = {"max_new_tokens": 12, "eos_token_id": 3}  # <pad> is never generated: no stop, as the hub loop
        assert generate(model, prompts, **no_stop).new_tokens == expected
        assert generate(model, prompts, **no_stop, do_sample=True, top_k=1, seed=0).new_tokens == expected
        assert generate(model, prompts, **no_stop, num_beams=1).new_tokens == expected
    out = generate(model, [single], max_new_tokens=12)  # stops at <eop> (the hub's eos), the 5th token here
    assert out.new_tokens == [[81, 316, 131, 215, 285]] and out.finish_reasons == ["stop"]


def test_prompt_layout():
    special = ChatGLM6BConfig.from_hub_dict(HUB_CONFIG).special_tokens
    prompts = layout(special, "chatglm6b")
    gmask, mask, sop, eop = 281, 280, 284, 285
    assert prompts.continuation([7, 8]) == [7, 8, gmask]  # no [CLS]; <sop> is fed by the engine
    assert prompts.model_input([7, 8, gmask, sop]) == [7, 8, gmask]  # the tokenizer's `text [gMASK] <sop>`
    assert prompts.model_input([7, 8]) == [7, 8, gmask]
    assert prompts.infilling([7, mask, 8]) == [7, mask, 8]
    assert prompts.stop_ids() == [eop]
    with pytest.raises(ValueError, match="no blank"):
        prompts.infilling([7, 282, 8])  # [sMASK] is no blank to ChatGLM-6B
