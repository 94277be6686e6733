"""Blank filling of every blank (THUDM/GLM generate_samples.py; TV7 of docs/glm-notes.md): positions fed, cache
contents, stop handling, the trained layout reproduced, strategies per span and the text helpers."""

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.generate import complete, fill_blank_ids, fill_blanks, generate
from glmkit.masks import make_block_data, prefix_lm_mask, span_feed
from tests.helpers.generation import SPECIAL, EopAfter, Recorder, WordTokenizer, fixture_model

CONTEXT = [582, 10, 583, 20, 587, 30, 579]  # TV7: [CLS] w1 [MASK] w2 [sMASK] w3 [eos], blanks at 2 and 4


@pytest.fixture(scope="module")
def model():
    return fixture_model()


def test_tv7_positions_and_cache_follow_the_original_generate_samples(model):
    rec = Recorder(EopAfter(model, {2: 2, 4: 3}))
    res = fill_blank_ids(rec, CONTEXT, special_tokens=SPECIAL, max_new_tokens=6)
    (t1, t2), (s1, s2, s3) = res.spans
    assert res.finish_reasons == ["stop", "stop"] and res.blank_positions == [2, 4]
    assert res.ids == [582, 10, t1, t2, 20, s1, s2, s3, 30, 579]
    sop = SPECIAL.sop
    expected = [
        (CONTEXT, [list(range(7)), [0] * 7], [0]),  # context encoded once (bidirectional, sep = 7)
        ([sop], [[2], [1]], [7]),  # span 1: <sop> at (2, 1), tokens at (2, 2), (2, 3)
        ([t1], [[2], [2]], [8]),
        ([t2], [[2], [3]], [9]),  # its output is <eop>: never fed
        ([sop, t1, t2], [[2, 2, 2], [1, 2, 3]], [7]),  # cache keeps exactly <sop> span 1 for the next blank
        ([sop], [[4], [1]], [10]),  # span 2 sees context + span 1
        ([s1], [[4], [2]], [11]),
        ([s2], [[4], [3]], [12]),
        ([s3], [[4], [4]], [13]),
    ]
    assert [(ids[0], pos[0], cached) for ids, pos, cached in rec.calls] == expected


def test_filled_spans_are_what_the_trained_layout_predicts(model):
    """One uncached forward over make_block_data's Part A + Part B layout predicts every span token and <eop>."""
    biased = EopAfter(model, {2: 2, 4: 3})
    res = fill_blank_ids(biased, CONTEXT, special_tokens=SPECIAL, max_new_tokens=6)
    sample = make_block_data(res.ids, [(2, 4), (5, 8)], mask_id=[583, 587], sop_id=SPECIAL.sop, eop_id=SPECIAL.eop)
    assert sample.tokens[: sample.sep] == CONTEXT
    pos = torch.tensor([[sample.position_ids, sample.block_position_ids]])
    with torch.no_grad():
        logits = biased(torch.tensor([sample.tokens]), pos, prefix_lm_mask(sample.sep, len(sample)))
    predicted = logits[0, sample.sep :].argmax(-1).tolist()
    assert predicted == sample.targets[sample.sep :]


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(do_sample=True, top_k=20, seed=7)])
def test_each_span_uses_the_strategy(model, kw):
    res = fill_blank_ids(model, CONTEXT, special_tokens=SPECIAL, max_new_tokens=4, **kw)
    assert [len(s) for s in res.spans] == [4, 4]
    first = generate(model, CONTEXT, special_tokens=SPECIAL, max_new_tokens=4, **kw)  # fills the first blank only
    assert res.spans[0] == first.new_tokens[0]


def test_text_helpers():
    tok = WordTokenizer()
    biased = EopAfter(fixture_model(), {2: 2, 4: 1, 3: 3})
    res = fill_blanks(biased, tok, "w10 [MASK] w20 [sMASK] w30", max_new_tokens=5)
    assert len(res.spans) == 2 and [len(s.split()) for s in res.spans] == [2, 1]
    assert res.text == f"w10 {res.spans[0]} w20 {res.spans[1]} w30"
    text = complete(biased, tok, "w10 w11", max_new_tokens=5)
    ids = generate(biased, [582, 10, 11, 586], special_tokens=SPECIAL, max_new_tokens=5).new_tokens[0]
    assert text == tok.decode(ids[:-1]) and len(text.split()) == 3


def test_spans_stop_at_the_position_table_limit():
    small = GLM(GLMConfig(max_sequence_length=6)).eval()
    res = fill_blank_ids(small, CONTEXT, special_tokens=SPECIAL, max_new_tokens=10, eos_token_id=639)
    assert res.finish_reasons == ["position_limit"] * 2 and [len(s) for s in res.spans] == [6, 6]


def test_blank_filling_rejects_bad_input(model):
    with pytest.raises(ValueError, match="no blank"):
        fill_blanks(model, WordTokenizer(), "w1 w2")
    with pytest.raises(ValueError, match="input_ids: no blank"):
        fill_blank_ids(model, [582, 1, 2], special_tokens=SPECIAL)
    with pytest.raises(ValueError, match="num_return_sequences"):
        fill_blank_ids(model, CONTEXT, special_tokens=SPECIAL, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="input_ids"):
        fill_blank_ids(model, [582] * 66 + [583], special_tokens=SPECIAL)


def test_span_feed_is_sop_and_span_at_the_blank_cut_by_the_block_table():
    assert span_feed(4, [31, 32], sop_id=SPECIAL.sop, max_block=8) == [(SPECIAL.sop, 4, 1), (31, 4, 2), (32, 4, 3)]
    assert span_feed(4, [31, 32, 33], sop_id=SPECIAL.sop, max_block=3) == [(SPECIAL.sop, 4, 1), (31, 4, 2), (32, 4, 3)]
    assert span_feed(0, [], sop_id=SPECIAL.sop, max_block=3) == [(SPECIAL.sop, 0, 1)]
