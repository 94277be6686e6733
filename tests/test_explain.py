import pytest
import torch

from glmkit.cli import main
from glmkit.explain import PLACEHOLDER, explain
from glmkit.masks import chatglm6b_inputs, sample_mask
from glmkit.tokenizer import load_tokenizer


def test_layout_of_two_blanks():
    ex = explain("Paris is the [MASK] of France and [sMASK]{it is large .}")
    s = ex.sample
    assert ex.labels[: s.sep] == [
        "[CLS]",
        "Paris",
        "is",
        "the",
        "[MASK]",
        "of",
        "France",
        "and",
        "[sMASK]",
        "<|endoftext|>",
    ]
    assert ex.labels[s.sep :] == [
        "<|startofpiece|>",
        PLACEHOLDER,
        PLACEHOLDER,
        "<|startofpiece|>",
        "it",
        "is",
        "large",
        ".",
    ]
    assert s.position_ids[s.sep :] == [4, 4, 4, 8, 8, 8, 8, 8]
    assert s.block_position_ids[s.sep :] == [1, 2, 3, 1, 2, 3, 4, 5]


def test_gmask_at_end_has_no_eos():
    ex = explain("The history of glmkit [gMASK]", span_length=1)
    assert ex.labels[: ex.sample.sep][-1] == "[gMASK]"


def test_no_blank_is_an_error():
    with pytest.raises(ValueError, match="no blank"):
        explain("nothing to fill here")


def test_cli_prints_grid_and_writes_png(tmp_path, capsys):
    png = tmp_path / "mask.png"
    assert main(["explain", "Paris is the [MASK] of France", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Part B" in out and "■" in out and png.stat().st_size > 10_000
    assert main(["explain", "no blanks"]) == 2


def test_chatglm6b_layout_positions_and_mask(capsys):
    """ChatGLM-6B: `text [gMASK]` bidirectional, <sop> and the answer causal at (gMASK position, 1, 2, ...); a text
    with only a [MASK] is infilled at it. The mask drawn is the hub's (masks.chatglm6b_inputs)."""
    ex = explain("Paris is the capital of", span_length=2, family="chatglm6b")
    s = ex.sample
    assert ex.labels == ["Paris", "is", "the", "capital", "of", "[gMASK]", "<|startofpiece|>", PLACEHOLDER, PLACEHOLDER]
    assert s.position_ids == [0, 1, 2, 3, 4, 5, 5, 5, 5] and s.block_position_ids == [0] * 6 + [1, 2, 3]
    sp = load_tokenizer(None).special
    _, mask = chatglm6b_inputs(torch.tensor([s.tokens]), sop_id=sp.sop, mask_id=sp.mask, gmask_id=sp.gmask)
    assert torch.equal(sample_mask(s), mask[0, 0])
    assert mask[0, 0, 2, 5] and not mask[0, 0, 5, 6] and mask[0, 0, 7, 6] and not mask[0, 0, 6, 7]
    infill = explain("Paris is the [MASK] of France", span_length=1, family="chatglm6b").sample
    assert sp.gmask not in infill.tokens and infill.position_ids[-2:] == [3, 3]
    with pytest.raises(ValueError, match="without a \\{span\\}"):
        explain("Paris is the [MASK]{capital}", family="chatglm6b")
    assert main(["explain", "Paris is the capital of", "--family", "chatglm6b"]) == 0
    assert "[gMASK]" in capsys.readouterr().out
