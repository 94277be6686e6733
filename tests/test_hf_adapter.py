"""glmkit's engine returns exactly what ``transformers.generate()`` returns on the same weights (through the thin
``hf_adapter`` wrapper, which recomputes the full sequence each step): sequences, beam scores and seeded samples."""

import pytest
import torch

from glmkit.generate import generate
from glmkit.hf_adapter import GLMForHFGeneration, glm_layout
from tests.helpers.generation import SPECIAL, EopRamp, WordTokenizer, fixture_model, hf_tokenizer

PROMPTS = [[582, 345, 136, 319, 583, 85, 72, 579], [582, 5, 6, 7, 586], [582, 40, 41, 583, 42, 43, 44, 45, 579]]


@pytest.fixture(scope="module")
def models():
    glm = EopRamp(fixture_model(), slope=0.06)  # spans end at different lengths, so stopping rules matter
    return glm, GLMForHFGeneration.from_glm(glm, SPECIAL)


def hf_inputs(prompts):
    """What transformers sees: left-padded ``Part A <sop>`` rows and the 2D padding mask."""
    S = max(len(p) for p in prompts) + 1
    ids = torch.tensor([[SPECIAL.pad] * (S - len(p) - 1) + p + [SPECIAL.sop] for p in prompts])
    mask = torch.tensor([[0] * (S - len(p) - 1) + [1] * (len(p) + 1) for p in prompts])
    return ids, mask


def both(models, prompts, seed=None, **kw):
    glm, hf = models
    ids, mask = hf_inputs(prompts)
    if seed is not None:
        torch.manual_seed(seed)
    theirs = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    ours = generate(glm, prompts, special_tokens=SPECIAL, **kw)
    return ours, theirs


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=12),
        dict(max_new_tokens=10, min_new_tokens=4),
        dict(max_new_tokens=10, repetition_penalty=1.4, no_repeat_ngram_size=2),
    ],
)
def test_greedy_matches_transformers(models, kw):
    ours, theirs = both(models, PROMPTS, do_sample=False, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert "stop" in ours.finish_reasons and len({len(t) for t in ours.new_tokens}) > 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=3, length_penalty=0.0, early_stopping="never", num_return_sequences=3),
        dict(num_beams=2, length_penalty=2.0, early_stopping=True),
        dict(num_beams=4, length_penalty=-1.0, early_stopping=False, num_return_sequences=2),
        dict(num_beams=3, length_penalty=1.5, early_stopping="never", repetition_penalty=1.2),
        dict(num_beams=3, num_return_sequences=3, max_new_tokens=6),
    ],
)
def test_beam_search_matches_transformers(models, kw):
    ours, theirs = both(models, PROMPTS, do_sample=False, **{"max_new_tokens": 9, **kw})
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=0),
        dict(top_k=20, temperature=0.7),
        dict(top_p=0.8, temperature=1.3, num_return_sequences=2),
        dict(top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
        dict(typical_p=0.8),
    ],
)
def test_seeded_sampling_matches_transformers(models, kw):
    ours, theirs = both(models, PROMPTS, seed=1234, do_sample=True, max_new_tokens=10, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    again = generate(models[0], PROMPTS, special_tokens=SPECIAL, do_sample=True, max_new_tokens=10, seed=1234, **kw)
    assert torch.equal(again.sequences, ours.sequences)  # seed= is the same stream as torch.manual_seed


def test_beam_sampling_matches_transformers(models):
    ours, theirs = both(models, PROMPTS[:2], seed=7, do_sample=True, num_beams=2, top_k=30, max_new_tokens=8)
    assert torch.equal(ours.sequences, theirs.sequences)


def test_stop_strings_match_transformers(models):
    free = generate(models[0], PROMPTS, special_tokens=SPECIAL, max_new_tokens=10)
    stop = WordTokenizer().decode(free.new_tokens[2][2:3])
    glm, hf = models
    ids, mask = hf_inputs(PROMPTS)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, stop_strings=stop, tokenizer=hf_tokenizer())
    ours = generate(
        glm, PROMPTS, special_tokens=SPECIAL, max_new_tokens=10, stop_strings=stop, tokenizer=WordTokenizer()
    )
    assert torch.equal(ours.sequences, theirs) and ours.finish_reasons[2] == "stop_string"


def test_pipeline_runs_a_glmkit_model(models):
    from transformers import pipeline

    glm, hf = models
    pipe = pipeline("text-generation", model=hf, tokenizer=hf_tokenizer())
    out = pipe("w10 w11 w12", max_new_tokens=6, do_sample=False, return_tensors=True)
    ids = out[0]["generated_token_ids"]
    assert ids[:6] == [582, 10, 11, 12, 586, SPECIAL.sop]
    assert ids[6:] == generate(glm, [582, 10, 11, 12], special_tokens=SPECIAL, max_new_tokens=6).new_tokens[0]


def test_layout_matches_the_hub_build_inputs_for_generation():
    """TV6 (docs/glm-notes.md): positions [0..5, 3, 3, 3], blocks [0*6, 1, 2, 3]; context rows never see the span."""
    ids = torch.tensor([[579, 582, 1, 2, 583, 3, 579, 580, 9, 9]])
    pos, mask = glm_layout(ids, torch.tensor([[0] + [1] * 9]), SPECIAL)
    assert pos[0, :, 1:].tolist() == [[0, 1, 2, 3, 4, 5, 3, 3, 3], [0, 0, 0, 0, 0, 0, 1, 2, 3]]
    assert not mask[0, 0, :, 0].any() and mask[0, 0, 1:7, 1:7].all() and not mask[0, 0, 1:7, 7:].any()
    assert mask[0, 0, 9, 1:].all() and not mask[0, 0, 7, 8:].any()


def test_transformers_streamer_works_with_the_engine(models):
    from transformers import TextIteratorStreamer

    tok = hf_tokenizer()
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = generate(models[0], PROMPTS[0], special_tokens=SPECIAL, max_new_tokens=6, streamer=streamer)
    assert "".join(streamer) == tok.decode(out.new_tokens[0])


def test_wrapper_saves_and_reloads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = GLMForHFGeneration.from_glm(fixture_model(), SPECIAL)
    hf.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = hf_inputs(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(again.generate(ids, **kw), hf.generate(ids, **kw))
