"""ChatGLM2 / GLM-4 under glmkit's generation: ``generate``/``stream`` reproduce the fixture's greedy cases (alone and
as a left-padded batch), greedy and beam search match transformers' GlmForCausalLM, cached decoding equals a full
recompute, the cache holds the KV groups only, and the kernels' linear layers (optimize_for_decode) and the hub-int4
layers take the generic decode path."""

import json

import pytest
import torch

from glmkit import GLM, KVCache, SpecialTokens
from glmkit.generate import generate, stream
from glmkit.generate.causal import CausalStepper, prefill
from glmkit.generate.fast import DecodeStep, optimize_for_decode
from glmkit.kernels import FastLinear
from glmkit.kernels import available as kernels_available
from glmkit.prompts import layout

from .conftest import FIXTURES
from .test_chatglm2 import _glm4_config, _hf_glm, _to_hub, write_hub_folder
from .test_chatglm_hub import hub_quantized_checkpoint

FX = FIXTURES / "chatglm2"
CASES = {c["name"]: c for c in json.loads((FX / "cases.json").read_text())["cases"]}
NO_STOP = 319  # a padding row of the tiny vocabulary: the fixture's greedy cases run without an eos stop


def fixture_model():
    return GLM.from_pretrained(FX, dtype=torch.float32)


@pytest.mark.parametrize("kernels", [True, False])
def test_generate_reproduces_the_greedy_case(kernels):
    case = CASES["c_greedy_single"]
    model = fixture_model()
    prompt = case["input_ids"][0]
    out = generate(model, prompt, max_new_tokens=12, do_sample=False, eos_token_id=NO_STOP, kernels=kernels)
    assert out.new_tokens == case["expected_token_ids"]
    assert out.sequences[0].tolist() == prompt + case["expected_token_ids"][0]
    swapped = kernels and kernels_available()  # optimize_for_decode swaps them where the kernels run
    assert isinstance(model.blocks[0].attn.qkv, FastLinear) == swapped
    assert isinstance(model.lm_head, FastLinear) == swapped
    assert list(stream(model, prompt, max_new_tokens=12, eos_token_id=NO_STOP)) == case["expected_token_ids"][0]
    assert model.generate([prompt], max_new_tokens=12, eos_token_id=NO_STOP).tolist() == out.sequences.tolist()


def test_generate_left_padded_batch_rows_as_alone():
    case = CASES["d_greedy_batch2_left_pad"]
    model = fixture_model()
    ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"]["mask"])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=NO_STOP)
    assert out.new_tokens == case["expected_token_ids"]
    assert out.sequences[:, : ids.shape[1]].tolist() == ids.tolist()  # transformers' left-padded prompt rows
    for row, m, expected in zip(ids, mask, case["expected_token_ids"], strict=True):
        alone = generate(model, row[m.bool()].tolist(), max_new_tokens=12, eos_token_id=NO_STOP)
        assert alone.new_tokens == [expected]


def test_cached_steps_equal_a_full_recompute():
    model = fixture_model().eval()
    prompts = [CASES["a_prompt_single"]["input_ids"][0][:20], CASES["a_prompt_single"]["input_ids"][0][:9]]
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 40)
        assert cache.k.shape[2] == model.config.n_kv_head < model.config.n_head
        lengths = torch.tensor([len(p) for p in prompts])
        stepper = CausalStepper(model, cache, prefill(model, prompts, cache), lengths)
        rows = [list(p) for p in prompts]
        logits = stepper.step(None)
        for _ in range(8):
            for b, row in enumerate(rows):  # each row alone, without a cache
                full = model(torch.tensor([row]))[0, -1]
                assert (logits[b] - full).abs().max() < 1e-5
            tokens = logits.argmax(-1)
            for row, t in zip(rows, tokens.tolist(), strict=True):
                row.append(t)
            logits = stepper.step(tokens)


def test_pool_rows_decode_as_alone():
    """Serving's continuous batching: sequences in scattered rows of one pool cache (KVCacheRows), each step on
    the rows that take part, give the tokens each gives alone."""
    model = fixture_model().eval()
    case = CASES["a_prompt_single"]
    prompts = [case["input_ids"][0], case["input_ids"][0][:11]]
    alone = [generate(model, p, max_new_tokens=6, eos_token_id=NO_STOP).new_tokens[0] for p in prompts]
    pool = KVCache.for_model(model, 4, 48)
    with torch.no_grad():
        rows = pool.rows([3, 1])
        lengths = torch.tensor([len(p) for p in prompts])
        stepper = CausalStepper(model, rows, prefill(model, prompts, rows), lengths)
        tokens, got = None, [[], []]
        for _ in range(6):
            tokens = stepper.step(tokens).argmax(-1)
            for row, t in zip(got, tokens.tolist(), strict=True):
                row.append(t)
    assert got == alone
    assert pool.host_lengths() == [0, len(prompts[1]) + 5, 0, len(prompts[0]) + 5]


def test_eos_and_sampling_options():
    case = CASES["c_greedy_single"]
    model = fixture_model()
    prompt, expected = case["input_ids"][0], case["expected_token_ids"][0]
    stopped = generate(model, prompt, max_new_tokens=12, eos_token_id=[expected[2]])
    assert stopped.new_tokens == [expected[:3]] and stopped.finish_reasons == ["stop"]
    model.config.eos_token_id = [expected[3], 311]  # the config's stop ids (GLM-4 lists several) are the default
    assert generate(model, prompt, max_new_tokens=12).new_tokens == [expected[:4]]
    top1 = generate(model, prompt, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=NO_STOP, seed=3)
    assert top1.new_tokens == [expected]
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "eos_token_id": NO_STOP, "seed": 11}
    a, b = generate(model, prompt, **kw), generate(model, prompt, **kw)
    assert a.new_tokens == b.new_tokens and a.new_tokens != [expected[:10]]
    many = generate(model, [prompt, prompt[:7]], num_return_sequences=3, **kw)
    assert len(many.new_tokens) == 6 and all(len(t) == 10 for t in many.new_tokens)
    with pytest.raises(ValueError, match="seq_length=64"):
        generate(model, list(range(65)), max_new_tokens=2)
    near = generate(model, prompt * 2 + prompt[:10], max_new_tokens=30, eos_token_id=NO_STOP)  # 62 of 64 positions
    assert len(near.new_tokens[0]) == 3


def test_prompt_layout_prefixes_gmask_sop():
    special = SpecialTokens(eos=2, pad=0, cls=301, mask=300, sop=303, eop=304, smask=302, gmask=301)
    prompts = layout(special, "chatglm2")
    assert prompts.continuation([40, 41]) == [301, 303, 40, 41] == prompts.model_input([301, 303, 40, 41])
    assert prompts.blank_ids() == () and prompts.stop_ids() == [2]
    with pytest.raises(ValueError, match="fill no blanks"):
        prompts.infilling([40, 300])
    case = CASES["c_greedy_single"]
    model = fixture_model()
    body = case["input_ids"][0][2:]  # without [gMASK] sop: the special ids put them back
    out = generate(model, body, special_tokens=special, max_new_tokens=12, eos_token_id=NO_STOP)
    assert out.new_tokens == case["expected_token_ids"]


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_greedy_and_beam_search_match_transformers(tmp_path, num_beams):
    cfg = _glm4_config()
    hf = _hf_glm(cfg)
    ours = GLM.from_pretrained(write_hub_folder(tmp_path / "glm4", cfg, _to_hub(hf, cfg)))
    prompts = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0
    prompts[1, :4] = 90  # left-padded with the pad id, as a tokenizer pads
    kw = {"max_new_tokens": 9, "num_beams": num_beams, "do_sample": False, "eos_token_id": [90, 91]}
    expected = hf.generate(prompts, attention_mask=mask, pad_token_id=90, **kw)
    got = generate(ours, prompts, attention_mask=mask, **kw)
    assert got.sequences.tolist() == expected.tolist()


def test_hub_int4_model_generates_on_the_quantized_layers(tmp_path):
    folder, _ = hub_quantized_checkpoint(tmp_path / "int4", 4)
    model = GLM.from_pretrained(folder, dtype=torch.bfloat16)
    optimize_for_decode(model)
    step = DecodeStep(model)
    assert (step.fused is not None) == kernels_available()  # the hub int4 layers run inside decode_blocks
    prompt = CASES["c_greedy_single"]["input_ids"][0]
    out = generate(model, prompt, max_new_tokens=12, eos_token_id=NO_STOP)
    reference = generate(
        GLM.from_pretrained(folder, dtype=torch.float32), prompt, max_new_tokens=12, eos_token_id=NO_STOP
    )
    assert out.new_tokens[0][:4] == reference.new_tokens[0][:4]  # bf16 activations; the start is robust
    assert len(out.new_tokens[0]) == 12
