"""Layouts and masks against docs/glm-notes.md: TV1-TV3, TV6 exactly, and the TV11 invariants on a model."""

import pytest
import torch

from glmkit import KVCache
from glmkit.masks import (
    build_inputs_for_generation,
    collate,
    make_block_data,
    make_prefix_lm_data,
    mask_with_cache,
    normalize_attention_mask,
    prefix_lm_mask,
    sample_mask,
)

# symbolic BERT-style ids: [CLS]=101, [MASK]=103, sop=30522, eop=30523; x_i = i
CLS, MASK, GMASK, SOP, EOP = 101, 103, 30524, 30522, 30523


def test_tv1_block_data():
    text = [CLS, 1, 2, 3, 4, 5, 6]
    s = make_block_data(text, [(3, 4), (5, 7)], mask_id=MASK, sop_id=SOP, eop_id=EOP, order=[1, 0])
    assert s.tokens == [CLS, 1, 2, MASK, 4, MASK, SOP, 5, 6, SOP, 3]
    assert s.position_ids == [0, 1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert s.block_position_ids == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.targets[6:] == [5, 6, EOP, 3, EOP]
    assert s.loss_mask == [0] * 6 + [1] * 5
    assert s.sep == 6
    m = sample_mask(s)
    for i in range(11):
        for j in range(11):
            assert bool(m[i, j]) == (j < 6 or j <= i)


def test_tv2_position_compression():
    s = make_block_data([CLS, 1, 2, 3, 4, 5], [(2, 4)], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    assert s.tokens[: s.sep] == [CLS, 1, MASK, 4, 5] and s.position_ids[: s.sep] == [0, 1, 2, 3, 4]
    assert s.tokens[s.sep :] == [SOP, 2, 3]
    assert s.position_ids[s.sep :] == [2, 2, 2] and s.block_position_ids[s.sep :] == [1, 2, 3]
    assert s.targets[s.sep :] == [2, 3, EOP] and s.sep == 5


def test_tv3_prefix_lm():
    text = [CLS, 1, 2, 3, 4, 5, 6, 7]
    s = make_prefix_lm_data(text, 4, gmask_id=GMASK, sop_id=SOP)
    assert s.tokens == [CLS, 1, 2, 3, GMASK, SOP, 4, 5, 6]
    assert s.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    assert s.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert s.sep == 5 and s.targets[5:] == [4, 5, 6, 7] and s.loss_mask == [0] * 5 + [1] * 4


def test_tv6_build_inputs_for_generation():
    ctx = torch.tensor([[50259, 11, 12, 50260, 13, 50256]])
    out = build_inputs_for_generation(ctx, None, 4, mask_ids=[50260, 50264, 50263], sop_id=50257)
    assert out["input_ids"].tolist() == [[50259, 11, 12, 50260, 13, 50256, 50257]]
    assert out["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 3, 3, 3]
    assert out["position_ids"][0, 1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]
    m = out["generation_attention_mask"][0, 0]
    assert m[:6, :6].eq(1).all() and m[:6, 6:].eq(0).all() and m[6:, :6].eq(1).all()
    assert torch.equal(m[6:, 6:], torch.tril(torch.ones(4, 4, dtype=m.dtype)))
    assert out["position_ids"][0, :, 7].tolist() == [3, 2]  # step 2 feeds column 7


def test_multiple_blank_kinds_and_per_span_ids():
    text = [CLS, 1, 2, 3, 4, 5, 6, 7]
    s = make_block_data(text, [(1, 2), (3, 5), (6, 8)], mask_id=[MASK, 30525, GMASK], sop_id=SOP, eop_id=EOP)
    assert s.tokens[: s.sep] == [CLS, MASK, 2, 30525, 5, GMASK]
    assert s.blank_positions == [1, 3, 5]


def test_bad_spans_rejected():
    with pytest.raises(ValueError, match="overlap"):
        make_block_data([CLS, 1, 2, 3], [(1, 3), (2, 4)], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    with pytest.raises(ValueError, match="outside"):
        make_block_data([CLS, 1], [(1, 5)], mask_id=MASK, sop_id=SOP, eop_id=EOP)


def test_tv11c_sep_vector_rows_and_padding_never_attended():
    m = prefix_lm_mask([3, 5], 8, valid_lengths=[8, 6])[:, 0]
    for b, (sep, valid) in enumerate([(3, 8), (5, 6)]):
        for i in range(8):
            for j in range(8):
                visible = (j < sep or j <= i) and j < valid
                if i < valid:
                    assert bool(m[b, i, j]) == visible
                else:  # a padding query still sees only real tokens
                    assert not m[b, i, j] or j < valid


def test_collate_pads_positions_zero_and_masks_pads():
    a = make_block_data([CLS, 1, 2, 3, 4, 5], [(2, 4)], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    b = make_block_data([CLS, 1, 2], [(1, 2)], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    batch = collate([a, b], pad_id=0)
    n = len(b)
    assert batch["input_ids"][1, n:].eq(0).all() and batch["position_ids"][1, :, n:].eq(0).all()
    assert not batch["attention_mask"][1, 0, :, n:].any()
    assert batch["loss_mask"][1, n:].eq(0).all() and batch["sep"].tolist() == [5, 3]


def test_mask_forms_and_errors():
    assert normalize_attention_mask(None, 2, 4, 4).shape == (1, 1, 4, 4)
    assert torch.equal(normalize_attention_mask(torch.tensor([0, 0]), 2, 4, 4)[0, 0], torch.ones(4, 4).tril().bool())
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        normalize_attention_mask(torch.ones(2, 4), 2, 4, 4)
    with pytest.raises(ValueError, match="not an accepted form"):
        normalize_attention_mask(torch.ones(2, 1, 4, 3), 2, 4, 4)


def test_mask_with_cache_ragged_rows():
    new = prefix_lm_mask(0, 2)
    m = mask_with_cache(new, [3, 1], 2)[:, 0]
    assert m.shape == (2, 2, 5)
    assert m[0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert m[1].tolist() == [[True, True, False, False, False], [True, True, True, False, False]]


# ---- TV11 on the reference checkpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from glmkit import GLM

    from .conftest import FIXTURES

    return GLM.from_pretrained(FIXTURES / "glm")


def _run(model, s, tokens=None):
    ids = torch.tensor([tokens or s.tokens])
    pos = torch.tensor([[s.position_ids, s.block_position_ids]])
    with torch.no_grad():
        return model(ids, pos, s.sep)[0]


def _sample():
    text = [582, 140, 353, 217, 30, 575, 166, 44, 90, 579]
    return make_block_data(text, [(2, 4), (6, 8)], mask_id=583, sop_id=580, eop_id=581, order=[1, 0])


def test_tv11a_part_b_never_changes_part_a(model):
    s = _sample()
    base = _run(model, s)
    changed = list(s.tokens)
    changed[-1] = 7
    assert torch.equal(base[: s.sep], _run(model, s, changed)[: s.sep])


def test_tv11b_later_part_b_never_changes_earlier(model):
    s = _sample()
    base = _run(model, s)
    changed = list(s.tokens)
    changed[-1] = 7
    out = _run(model, s, changed)
    assert torch.equal(base[:-1], out[:-1]) and not torch.equal(base[-1], out[-1])


def test_tv11d_part_a_then_part_b_one_at_a_time_through_cache(model):
    s = _sample()
    full = _run(model, s)
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        model(torch.tensor([s.tokens[: s.sep]]), torch.tensor([[s.position_ids[: s.sep], [0] * s.sep]]), s.sep, cache)
        steps = []
        for t in range(s.sep, len(s)):
            pos = torch.tensor([[[s.position_ids[t]], [s.block_position_ids[t]]]])
            steps.append(model(torch.tensor([[s.tokens[t]]]), pos, 0, cache)[0, 0])
    assert torch.allclose(torch.stack(steps), full[s.sep :], atol=1e-5)
