import pytest

from glmkit.cli import main
from glmkit.explain import PLACEHOLDER, explain


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
