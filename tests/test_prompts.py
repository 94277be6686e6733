"""The prompt layout module: the GLM family's rules (THUDM/GLM generate_samples.py ``read_context``), a vocabulary
without task masks, the family registry."""

import dataclasses

import pytest

from glmkit import prompts
from glmkit.prompts import GLMPrompts, continuation_ids, infilling_ids, layout, prompt_ids
from glmkit.tokenizer import WhitespaceTokenizer

WORDS = "the king said unto them go and see".split()


def whitespace(task_masks: bool = True) -> WhitespaceTokenizer:
    tok = WhitespaceTokenizer(WORDS)
    if not task_masks:  # the vocabularies of glm-large (BERT) and glm-large-chinese have only [MASK]
        tok.special = dataclasses.replace(tok.special, gmask=None, smask=None)
    return tok


def test_glm_layout_follows_read_context():
    tok = whitespace()
    s, enc = tok.special, tok.encode
    assert prompt_ids(tok, "the king said") == [s.cls, *enc("the king said"), s.gmask]  # no blank: continued
    assert prompt_ids(tok, "the [MASK] said") == [s.cls, *enc("the [MASK] said"), s.eos]
    # no eos after a final blank of any kind (read_context tests raw_text.endswith("MASK]"))
    for blank in ("[MASK]", "[sMASK]", "[gMASK]"):
        text = f"the king {blank}"
        assert prompt_ids(tok, text) == infilling_ids(tok, text) == [s.cls, *enc(text)]
    assert continuation_ids(tok, "the [MASK] said") == [s.cls, *enc("the [MASK] said"), s.gmask]
    assert continuation_ids(tok, "the king [gMASK]") == [s.cls, *enc("the king"), s.gmask]  # not doubled
    assert continuation_ids(tok, "the king [MASK]") == [s.cls, *enc("the king [MASK]"), s.gmask]
    with pytest.raises(ValueError, match=r"no blank \(\[MASK\], \[sMASK\] or \[gMASK\]\) to fill"):
        infilling_ids(tok, "the king said")


def test_a_vocabulary_without_gmask_generates_at_mask():
    tok = whitespace(task_masks=False)
    s, enc = tok.special, tok.encode
    assert prompt_ids(tok, "the king") == [s.cls, *enc("the king"), s.mask]
    # the disagreement: a text ending in [MASK] got an eos from fill_blanks / infill but not from the CLI
    text = "the king [MASK]"
    assert prompt_ids(tok, text) == infilling_ids(tok, text) == [s.cls, *enc("the king"), s.mask]
    assert continuation_ids(tok, "the king [MASK]") == [s.cls, *enc("the king [MASK]")]
    assert layout(s).blank_ids() == (s.mask,)


def test_model_input_and_stop_ids():
    s = whitespace().special
    glm = layout(s)
    assert isinstance(glm, GLMPrompts)
    assert glm.model_input([s.cls, 20, 21]) == [s.cls, 20, 21, s.gmask]
    assert glm.model_input([s.cls, 20, s.mask, 21]) == [s.cls, 20, s.mask, 21]  # blanks as given, nothing added
    assert glm.stop_ids() == [s.eop, s.eos]
    no_task = layout(dataclasses.replace(s, gmask=None, smask=None))
    assert no_task.model_input([20]) == [20, s.mask]


def test_registry_adds_a_family_and_names_unknown_ones():
    @dataclasses.dataclass(frozen=True)
    class Suffix:  # a family that appends [gMASK] <sop> to the text, ChatGLM-6B style
        special: object

        def blank_ids(self):
            return (1,)

        def continuation(self, body):
            return [*body, 1, 2]

        def infilling(self, body):
            return [*body, 2]

        def model_input(self, ids):
            return list(ids)

        def stop_ids(self):
            return [3]

    prompts.register("suffix-test", Suffix)
    try:
        assert "suffix-test" in prompts.families() and "glm" in prompts.families()
        tok = whitespace()
        assert continuation_ids(tok, "the king", family="suffix-test") == [*tok.encode("the king"), 1, 2]
    finally:
        prompts._FAMILIES.pop("suffix-test")
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        layout(whitespace().special, "nope")
