"""Streaming detokenization: text deltas decoded in a window add up to the text of the whole answer, stop strings
included, for every tokenizer kind glmkit loads (BERT WordPiece, GPT-2 / RoBERTa byte BPE, SentencePiece, the
trained BPE of the tests and the bundled model)."""

import random

import pytest

from glmkit.serve.text import IncrementalText, find_stop, safe_decode
from tests.test_tokenizer import folders, toks  # noqa: F401 (fixtures)

WORDS = "paris is the capital of france , hello world the king said unto them go and see what the lord hath done"


def whole(tok, ids, stops, include_stop):
    """What the stream must add up to: the whole answer decoded at once, cut at the first stop string."""
    text = safe_decode(tok, ids)
    cut = find_stop(text, stops)
    if cut < 0:
        return text, False
    return text[: cut + (next(len(s) for s in stops if text.startswith(s, cut)) if include_stop else 0)], True


@pytest.fixture(params=["served", "bundled", "bert", "gpt2", "roberta", "sentencepiece"])
def tok(request, model_and_tokenizer):
    if request.param == "served":
        return model_and_tokenizer[1]
    if request.param == "bundled":
        from glmkit.bundled import load_model_and_tokenizer

        return load_model_and_tokenizer(None)[1]
    return request.getfixturevalue("toks")[request.param]


@pytest.mark.parametrize("seed", range(3))
def test_streamed_deltas_add_up_to_the_whole_answer(tok, seed):  # noqa: F811
    rng = random.Random(seed)
    words = tok.encode(WORDS)
    for _ in range(20):
        # mostly word pieces, some arbitrary ids (raw bytes that split UTF-8 characters, special ids, ids past the
        # vocabulary as a padded embedding may emit)
        ids = [rng.choice(words) if rng.random() < 0.7 else rng.randrange(tok.vocab_size + 20) for _ in range(40)]
        stops = rng.choice([[], ["the lord"], ["king", " go"], ["\n"], ["is the"]])
        include = rng.random() < 0.5
        stream, parts, i = IncrementalText(tok, stops, include), [], 0
        while i < len(ids):  # pieces of 1-3 tokens, as engine steps deliver them
            n = rng.choice([1, 1, 2, 3])
            parts.append(stream.push(ids[i : i + n]))
            i += n
        parts.append(stream.push([], final=True))
        text, stopped = whole(tok, ids, stops, include)
        assert "".join(parts) == text and stream.stopped == stopped


def test_a_character_split_over_tokens_waits_until_complete(model_and_tokenizer):
    tok = model_and_tokenizer[1]
    ids = tok.encode("the king é said")
    assert len(ids) > len(tok.encode("the king  said"))  # é is two byte tokens here
    stream = IncrementalText(tok)
    parts = [stream.push([i]) for i in ids]
    assert "\ufffd" not in "".join(parts) and "".join(parts) + stream.push([], final=True) == safe_decode(tok, ids)


def test_sentencepiece_runs_restart_after_a_special_token(toks):  # noqa: F811
    """SentencePiece decodes the pieces after a special token as a new run and drops their leading spaces."""
    sp = toks["sentencepiece"]
    space = sp.token_to_id("▁")
    ids = sp.encode("paris") + [sp.special.sop, space, space] + sp.encode("is the") + [space]
    assert sp.run_breaks and sp.special.sop in sp.run_breaks and not toks["bert"].run_breaks
    stream = IncrementalText(sp)
    streamed = "".join(stream.push([i]) for i in ids) + stream.push([], final=True)
    assert streamed == safe_decode(sp, ids) == "parisis the "


def test_unassigned_ids_are_dropped(tok):
    ids = tok.encode("the king said") + [tok.vocab_size + 3, 10**6] + tok.encode(" unto them")
    assert safe_decode(tok, ids) == safe_decode(tok, [i for i in ids if i < tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode(ids)
