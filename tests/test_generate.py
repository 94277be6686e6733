"""The generation engine on GLM models: golden tokens and logits, cached == uncached, batched == one at a time,
dtypes, streaming, stop rules, the position limit, bad input and the compiled decode step."""

import json

import pytest
import torch
from safetensors.torch import load_file

from glmkit import GLM, GLMConfig, KVCache
from glmkit.generate import GenerationConfig, generate, stream
from glmkit.generate.engine import GLMStepper, prefill
from glmkit.masks import part_b_positions, prefix_lm_mask
from tests.helpers.generation import FIXTURE, SPECIAL, EopAfter, WordTokenizer, fixture_model

CASE_F = next(c for c in json.loads((FIXTURE / "cases.json").read_text())["cases"] if c["name"].startswith("f_"))
CONTEXT = CASE_F["input_ids"][0][:-1]  # [CLS] text [MASK] text <eos>; the hub appended <sop> itself
PROMPTS = [CONTEXT, [582, 5, 6, 7], [582, 40, 41, 583, 42, 43, 44, 45, 46, 47, 579]]


@pytest.fixture(scope="module")
def model():
    return fixture_model()


def gen(model, prompts, **kw):
    return generate(model, prompts, special_tokens=SPECIAL, **kw)


def test_greedy_matches_golden_tokens_and_step_logits(model):
    out = gen(model, CONTEXT, max_new_tokens=12)
    assert out.new_tokens == CASE_F["expected_token_ids_tanh"] and out.finish_reasons == ["length"]
    assert out.sequences[0].tolist() == CONTEXT + [SPECIAL.sop] + out.new_tokens[0]
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        prefill(model, [CONTEXT], cache)
        stepper = GLMStepper(model, cache, torch.tensor([4]), SPECIAL.sop)
        logits = [stepper.step(None)] + [stepper.step(torch.tensor([t])) for t in out.new_tokens[0][:-1]]
    expected = load_file(FIXTURE / "expected.safetensors")["f_greedy_generation_mems.step_logits_tanh"]
    assert (torch.stack(logits) - expected).abs().max() <= 1e-5


def test_cached_decode_equals_full_recompute(model):
    """Ragged batch: per-step cached logits == one uncached forward over Part A + <sop> + span (TV11 d,
    docs/glm-notes.md)."""
    torch.manual_seed(0)
    span = torch.randint(0, 579, (len(PROMPTS), 6))
    rows = [PROMPTS[0], PROMPTS[1] + [SPECIAL.gmask], PROMPTS[2]]
    blanks = [4, 4, 3]
    cache = KVCache.for_model(model, 3, 20)
    with torch.no_grad():
        prefill(model, rows, cache)
        stepper = GLMStepper(model, cache, torch.tensor(blanks), SPECIAL.sop)
        cached = [stepper.step(None)] + [stepper.step(span[:, k]) for k in range(5)]
        for b, row in enumerate(rows):
            seq = row + [SPECIAL.sop] + span[b, :5].tolist()
            pos_b, block_b = part_b_positions(blanks[b], 6)
            pos = torch.tensor([[list(range(len(row))) + pos_b, [0] * len(row) + block_b]])
            full = model(torch.tensor([seq]), pos, prefix_lm_mask(len(row), len(seq)))[0, len(row) :]
            torch.testing.assert_close(torch.stack([c[b] for c in cached]), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=10),
        dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
        dict(max_new_tokens=8, repetition_penalty=1.3, no_repeat_ngram_size=2),
    ],
)
def test_batched_equals_one_at_a_time(model, kw):
    batched = gen(model, PROMPTS, **kw)
    n = kw.get("num_return_sequences", 1)
    for b, prompt in enumerate(PROMPTS):
        alone = gen(model, prompt, **kw)
        assert batched.new_tokens[b * n : (b + 1) * n] == alone.new_tokens
        if alone.scores is not None:
            torch.testing.assert_close(batched.scores[b * n : (b + 1) * n], alone.scores)


def test_padded_tensor_inputs_left_or_right(model):
    lists = gen(model, PROMPTS[:2], max_new_tokens=6)
    S = max(len(p) for p in PROMPTS[:2])
    for left in (True, False):
        ids = torch.full((2, S), 579)
        mask = torch.zeros(2, S, dtype=torch.long)
        for b, p in enumerate(PROMPTS[:2]):
            sl = slice(S - len(p), S) if left else slice(0, len(p))
            ids[b, sl], mask[b, sl] = torch.tensor(p), 1
        assert gen(model, ids, attention_mask=mask, max_new_tokens=6).new_tokens == lists.new_tokens


def test_bf16_runs_and_tracks_fp32():
    m = fixture_model().to(torch.bfloat16)
    out = generate(m, PROMPTS, special_tokens=SPECIAL, max_new_tokens=5, num_beams=2)
    assert out.sequences.shape[0] == 3 and all(len(t) == 5 for t in out.new_tokens)
    sampled = generate(m, PROMPTS[0], special_tokens=SPECIAL, max_new_tokens=5, do_sample=True, seed=3)
    assert len(sampled.new_tokens[0]) == 5


def test_stream_and_streamer_match_generate(model):
    assert (
        list(stream(model, CONTEXT, special_tokens=SPECIAL, max_new_tokens=7))
        == gen(model, CONTEXT, max_new_tokens=7).new_tokens[0]
    )
    kw = dict(max_new_tokens=7, do_sample=True, top_p=0.9, temperature=0.8, seed=5)
    assert list(stream(model, CONTEXT, special_tokens=SPECIAL, **kw)) == gen(model, CONTEXT, **kw).new_tokens[0]

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = gen(model, CONTEXT, max_new_tokens=4, streamer=rec)
    assert rec.puts[0] == [CONTEXT + [SPECIAL.sop]] and rec.puts[1:] == [[t] for t in out.new_tokens[0]]
    assert rec.ended
    with pytest.raises(ValueError, match="streamer"):
        gen(model, CONTEXT, num_beams=2, streamer=rec)


def test_stop_ids_end_rows_and_pad_them(model):
    biased = EopAfter(model, {4: 3, 3: 5})
    out = generate(biased, PROMPTS, special_tokens=SPECIAL, max_new_tokens=5)
    assert [len(t) for t in out.new_tokens] == [4, 4, 5]
    assert out.finish_reasons == ["stop", "stop", "length"]
    assert out.new_tokens[0][-1] == SPECIAL.eop and out.sequences[0, -1].tolist() == SPECIAL.pad
    beams = generate(biased, PROMPTS[0], special_tokens=SPECIAL, max_new_tokens=8, num_beams=2)
    assert beams.new_tokens[0][-1] == SPECIAL.eop and beams.finish_reasons == ["stop"]
    custom = generate(biased, PROMPTS[0], special_tokens=SPECIAL, max_new_tokens=8, eos_token_id=[1, 2])
    assert custom.finish_reasons == ["length"]


def test_stop_strings(model):
    tok = WordTokenizer()
    free = gen(model, CONTEXT, max_new_tokens=10).new_tokens[0]
    stop = tok.decode(free[2:4])
    out = gen(model, CONTEXT, max_new_tokens=10, stop_strings=stop, tokenizer=tok)
    assert out.new_tokens[0] == free[:4] and out.finish_reasons == ["stop_string"]
    with pytest.raises(ValueError, match="stop_strings"):
        gen(model, CONTEXT, stop_strings="x")


def test_position_table_limit_and_long_prompts():
    m = GLM(GLMConfig(max_sequence_length=12)).eval()
    out = generate(m, [582, 5, 6], special_tokens=SPECIAL, max_new_tokens=30, eos_token_id=639)
    assert out.finish_reasons == ["position_limit"] and len(out.new_tokens[0]) == 12
    generate(m, list(range(12)), special_tokens=SPECIAL, max_new_tokens=2)  # 12 + [gMASK] = 13 positions fit
    with pytest.raises(ValueError, match="input_ids.*longer than the context"):
        generate(m, list(range(13)), special_tokens=SPECIAL, max_new_tokens=2)


def test_bad_input_raises_value_error_naming_the_parameter(model):
    for kw, name in [
        (dict(top_p=1.2), "top_p"),
        (dict(temperature=-0.5, do_sample=True), "temperature"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(top_kk=3), "top_kk"),
    ]:
        with pytest.raises(ValueError, match=name):
            gen(model, CONTEXT, **kw)
    with pytest.raises(ValueError, match="special_tokens"):
        generate(model, CONTEXT)
    with pytest.raises(ValueError, match="input_ids"):
        gen(model, [[582, 5], []])
    with pytest.raises(ValueError, match="input_ids"):
        gen(model, [])


def test_generation_config_object_and_kwargs_override(model):
    cfg = GenerationConfig(max_new_tokens=3, num_beams=2)
    assert len(gen(model, CONTEXT, generation_config=cfg).new_tokens[0]) == 3
    assert len(gen(model, CONTEXT, generation_config=cfg, max_new_tokens=5, num_beams=1).new_tokens[0]) == 5


def test_compiled_decode_step_gives_the_same_tokens(model):
    eager = gen(model, PROMPTS, max_new_tokens=5)
    compiled = gen(model, PROMPTS, max_new_tokens=5, compile="eager")
    assert compiled.new_tokens == eager.new_tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generation(dtype):
    cpu, gpu = fixture_model(), fixture_model().to("cuda", dtype)
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)):
        out = generate(gpu, PROMPTS, special_tokens=SPECIAL, **kw)
        assert out.sequences.device.type == "cuda" and all(len(t) == kw["max_new_tokens"] for t in out.new_tokens)
        if dtype == torch.float32:
            assert out.new_tokens == generate(cpu, PROMPTS, special_tokens=SPECIAL, **kw).new_tokens
    sample = dict(max_new_tokens=8, do_sample=True, top_p=0.9, seed=11)
    first = generate(gpu, PROMPTS, special_tokens=SPECIAL, **sample)
    assert torch.equal(first.sequences, generate(gpu, PROMPTS, special_tokens=SPECIAL, **sample).sequences)
    compiled = generate(gpu, PROMPTS, special_tokens=SPECIAL, max_new_tokens=8, compile=True)
    eager = generate(gpu, PROMPTS, special_tokens=SPECIAL, max_new_tokens=8)
    if dtype == torch.float32:
        assert compiled.new_tokens == eager.new_tokens
