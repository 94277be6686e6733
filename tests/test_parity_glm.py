"""glmkit vs the THUDM reference: logits of every golden case within the fixture's tolerance (1e-5), for both
GELU forms, and the greedy-generation case's tokens exactly (tests/fixtures/glm, from ../shared/golden/glm)."""

import ast
import json

import pytest
import torch
from safetensors.torch import load_file

from glmkit import GLM, KVCache
from glmkit.checkpoint import load_state_dict

from .conftest import FIXTURES

FX = FIXTURES / "glm"
META = json.loads((FX / "cases.json").read_text())
EXPECTED = load_file(str(FX / "expected.safetensors"))
TOL = META["tolerance"]
VARIANTS = [("erf", "hub"), ("tanh", "tanh")]


def _field(case, key):
    v = case[key]
    return ast.literal_eval(v) if isinstance(v, str) else v  # large fields are stored as Python literals


def _positions(d):
    return torch.stack([torch.tensor(d["position_ids"]), torch.tensor(d["block_position_ids"])], dim=1)


def _mask(am):
    return torch.tensor(am["mask"]) if am["form"] == "explicit_4d" else torch.tensor(am["sep"])


@pytest.fixture(scope="module", params=VARIANTS, ids=[v[0] for v in VARIANTS])
def variant(request):
    gelu, suffix = request.param
    return GLM.from_pretrained(FX, gelu=gelu), suffix


def test_checkpoint_loads_unchanged():
    model = GLM.from_pretrained(FX)
    raw = load_state_dict(FX)
    ours = model.state_dict()
    assert torch.equal(ours["wte.weight"], raw["glm.word_embeddings.weight"])
    assert torch.equal(
        ours["blocks.1.attn.qkv.weight"], raw["glm.transformer.layers.1.attention.query_key_value.weight"]
    )
    assert model.config.max_sequence_length == 64 and model.wpe.weight.shape == (65, 64)


@pytest.mark.parametrize("name", [c["name"] for c in META["cases"] if c["name"][0] in "abcde"])
def test_logits_match_reference(variant, name):
    model, suffix = variant
    case = next(c for c in META["cases"] if c["name"] == name)
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"]), _positions(case), _mask(_field(case, "attention_mask")))
    err = (logits - EXPECTED[f"{name}.logits_{suffix}"]).abs().max().item()
    assert err <= TOL["logits_atol"], f"{name}: max |diff| {err:.2e}"


def test_loss_matches_reference(variant):
    model, suffix = variant
    case = next(c for c in META["cases"] if c["name"].startswith("e_"))
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"]), _positions(case), _mask(_field(case, "attention_mask")))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(case["labels"]).flatten())
    assert abs(loss.item() - EXPECTED[f"{case['name']}.loss_{suffix}"].item()) <= TOL["loss_atol"]


def test_cached_increment_matches_reference(variant):
    """Case g: Part A into the KV cache, then Part B with sep = 0 (the hub's mems call)."""
    model, suffix = variant
    case = next(c for c in META["cases"] if c["name"].startswith("g_"))
    first = _field(case, "memory_call")
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        model(torch.tensor(first["input_ids"]), _positions(first), first["attention_mask"]["sep"], cache=cache)
        logits = model(torch.tensor(case["input_ids"]), _positions(case), 0, cache=cache)
    assert (logits - EXPECTED[f"{case['name']}.logits_{suffix}"]).abs().max().item() <= TOL["logits_atol"]


def test_greedy_generation_matches_reference(variant):
    """Case f: the hub generation protocol (explicit mask rows, one token per step) with a KV cache."""
    model, suffix = variant
    case = next(c for c in META["cases"] if c["name"].startswith("f_"))
    ids, pos = torch.tensor(case["input_ids"]), _positions(case)
    mask = _mask(_field(case, "attention_mask"))
    n = ids.shape[1]
    cache = KVCache.for_model(model, 1, pos.shape[-1])
    tokens, step_logits = [], []
    with torch.no_grad():
        logits = model(ids, pos[:, :, :n], mask[:, :, :n, :n], cache=cache)[:, -1]
        for step in range(case["gen_steps"]):
            step_logits.append(logits)
            nxt = logits.argmax(-1)
            tokens.append(nxt.item())
            if step + 1 < case["gen_steps"]:
                n += 1
                logits = model(nxt[:, None], pos[:, :, n - 1 : n], mask[:, :, n - 1 : n, :n], cache=cache)[:, -1]
    assert tokens == case[f"expected_token_ids_{suffix}"][0]
    expected = EXPECTED[f"{case['name']}.step_logits_{suffix}"]
    assert (torch.stack(step_logits) - expected).abs().max().item() <= TOL["step_logits_atol"]


def test_gelu_forms_are_distinguishable():
    """The tolerance separates the variants: running tanh against the erf expectations must fail."""
    model = GLM.from_pretrained(FX, gelu="tanh")
    case = META["cases"][0]
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"]), _positions(case), _mask(case["attention_mask"]))
    assert (logits - EXPECTED[f"{case['name']}.logits_hub"]).abs().max().item() > TOL["logits_atol"]
