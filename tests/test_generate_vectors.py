"""docs/generation-semantics.md test vectors TV-1…TV-4, TV-8, TV-9 through the engine's decoding path (``Decoding``,
which ``generate`` uses), driven by table models: the expected values are transformers 5.24's."""

import pytest
import torch

from glmkit.generate.config import GenerationConfig
from tests.helpers.generation import run_table

# vocabulary 0=PAD 1=EOS 2=A 3=B 4=C 5=D
TREE_A = {
    (5,): [0, 0.40, 0.50, 0.10, 0, 0],
    (5, 2): [0, 0.30, 0.60, 0.10, 0, 0],
    (5, 3): [0, 0.90, 0.05, 0.05, 0, 0],
    (5, 2, 2): [0, 0.60, 0.40, 0, 0, 0],
    (5, 2, 2, 2): [0, 0.90, 0.10, 0, 0, 0],
}
TREE_B = {
    (5,): [0, 0.50, 0.15, 0.35, 0, 0],
    (5, 2): [0, 0.01, 0.99, 0, 0, 0],
    (5, 3): [0, 0.99, 0.01, 0, 0, 0],
    (5, 2, 2): [0, 0.01, 0.99, 0, 0, 0],
    (5, 2, 2, 2): [0, 0.01, 0.99, 0, 0, 0],
    (5, 2, 2, 2, 2): [0, 0.99, 0.01, 0, 0, 0],
}
DEFAULT = [0, 0.90, 0.05, 0.05, 0, 0]


def beams(table, prompt=(5,), **kw):
    out = run_table(table, DEFAULT, [list(prompt)], num_beams=2, num_return_sequences=2, **kw)
    return out.sequences.tolist(), [round(s, 4) for s in out.scores.tolist()]


def test_tv1_greedy_takes_first_max():
    out = run_table({(5,): [1, 1e-4, 20, 20, 1, 1]}, DEFAULT, [[5]], max_new_tokens=1)
    assert out.new_tokens == [[2]]


def test_tv2_greedy():
    assert run_table(TREE_A, DEFAULT, [[5]], max_new_tokens=4).sequences.tolist() == [[5, 2, 2, 1]]


@pytest.mark.parametrize(
    "lp, es, maxnew, expected",
    [
        (1.0, False, 4, ([[5, 2, 2, 2, 1], [5, 2, 2, 1, 1]], [-0.5564, -0.5716])),
        (1.0, "never", 4, ([[5, 2, 2, 2, 1], [5, 2, 2, 1, 1]], [-0.5564, -0.5716])),
        (1.0, True, 4, ([[5, 1, 1], [5, 2, 1]], [-0.9163, -0.9486])),
        (0.0, False, 4, ([[5, 1, 1, 1], [5, 2, 2, 1]], [-0.9163, -1.7148])),
        (0.0, True, 4, ([[5, 1, 1], [5, 2, 1]], [-0.9163, -1.8971])),
        (2.0, "never", 4, ([[5, 2, 2, 2, 1], [5, 2, 2, 1, 1]], [-0.1391, -0.1905])),
        (2.0, True, 4, ([[5, 2, 1], [5, 1, 1]], [-0.4743, -0.9163])),
        (-1.0, False, 4, ([[5, 1, 1], [5, 2, 1]], [-0.9163, -3.7942])),
        (1.0, False, 2, ([[5, 2, 2], [5, 1, 1]], [-0.6020, -0.9163])),
        (1.0, True, 2, ([[5, 2, 2], [5, 1, 1]], [-0.6020, -0.9163])),
    ],
)
def test_tv2_beam_search(lp, es, maxnew, expected):
    assert beams(TREE_A, length_penalty=lp, early_stopping=es, max_new_tokens=maxnew) == expected


def test_tv2_fill_uses_pad_when_nonzero():
    seqs, _ = beams(TREE_A, length_penalty=1.0, early_stopping=True, max_new_tokens=4, pad=4)
    assert seqs == [[5, 1, 4], [5, 2, 1]]


@pytest.mark.parametrize(
    "es, expected",
    [
        (False, ([[5, 3, 1], [5, 1, 1]], [-0.5299, -0.6931])),
        ("never", ([[5, 2, 2, 2, 2, 1], [5, 3, 1, 1, 1, 1]], [-0.3875, -0.5299])),
        (True, ([[5, 3, 1], [5, 1, 1]], [-0.5299, -0.6931])),
    ],
)
def test_tv3_early_stopping(es, expected):
    assert beams(TREE_B, early_stopping=es, max_new_tokens=6) == expected


def test_tv4_length_counts_generated_tokens_only():
    shifted = {(4, 4) + k: v for k, v in TREE_A.items()}
    seqs, scores = beams(shifted, prompt=(4, 4, 5), max_new_tokens=4)
    assert seqs == [[4, 4, 5, 2, 2, 2, 1], [4, 4, 5, 2, 2, 1, 1]] and scores == [-0.5564, -0.5716]
    seqs, scores = beams(shifted, prompt=(4, 4, 5), max_new_tokens=2)
    assert seqs[0] == [4, 4, 5, 2, 2] and scores[0] == -0.6020


def test_tv6_beam_uses_log_probs_greedy_raw_logits():
    table = {(2,): [0, 0.000001, 0.6, 0.39, 0.000001, 0.000001]}
    raw = {(2,): [1, 0.0067379, 22026.47, 13359.73, 1, 1]}  # exp of logits [0, -5, 10, 9.5, 0, 0]
    assert run_table(raw, DEFAULT, [[2]], max_new_tokens=1, repetition_penalty=1.1).new_tokens == [[3]]
    out = run_table(table, DEFAULT, [[2]], max_new_tokens=1, repetition_penalty=1.1, num_beams=2)
    assert out.new_tokens[0] == [2]


def test_tv8_sampling_consumes_the_rng_like_transformers():
    """seeded sampling == a hand loop of multinomial(softmax(logits), 1), and seed=s == torch.manual_seed(s)."""
    table = {}
    default = [0.0, 0.1, 0.2, 0.3, 0.4, 0.0]
    torch.manual_seed(0)
    out_global = run_table(table, default, [[5], [5]], max_new_tokens=6, do_sample=True, top_k=0, eos=0)
    out_seeded = run_table(table, default, [[5], [5]], max_new_tokens=6, do_sample=True, top_k=0, eos=0, seed=0)
    torch.manual_seed(0)
    probs = torch.softmax(torch.log(torch.tensor([default] * 2)), -1)
    hand = torch.stack([torch.multinomial(probs, 1).squeeze(1) for _ in range(6)], 1)
    assert out_global.sequences[:, 1:].tolist() == hand.tolist()
    assert torch.equal(out_seeded.sequences, out_global.sequences)


def test_tv9_defaults_and_min_lengths():
    out = run_table({}, [0, 0.01, 0.99, 0, 0, 0], [[5, 5, 5]])
    assert out.sequences.shape == (1, 23)  # 20 new tokens by default
    likely_eos = [0, 0.99, 0.01, 0, 0, 0]
    assert run_table({}, likely_eos, [[5]], min_new_tokens=3).sequences.tolist() == [[5, 2, 2, 2, 1]]
    assert run_table({}, likely_eos, [[5]], min_length=3).sequences.tolist() == [[5, 2, 2, 1]]


def test_tv9_batch_pads_finished_rows():
    table = {(5,): [0, 0.9, 0.1, 0, 0, 0]}
    out = run_table(table, [0, 0.01, 0.99, 0, 0, 0], [[5], [4]], max_new_tokens=3)
    assert out.sequences.tolist() == [[5, 1, 0, 0], [4, 2, 2, 2]]
    assert out.finish_reasons == ["stop", "length"] and out.new_tokens == [[1], [2, 2, 2]]


def test_config_rejects_bad_values_naming_the_parameter():
    bad = [
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=-1.0),
        dict(temperature=0.0),
        dict(num_beams=2, num_return_sequences=3),
        dict(num_return_sequences=2),
        dict(max_new_tokens=0),
        dict(typical_p=0),
        dict(early_stopping="sometimes"),
        dict(early_stopping=1),
        dict(compile=3),
        dict(top_k=-1),
        dict(repetition_penalty=0),
        dict(eos_token_id=[]),
    ]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw)) if len(kw) == 1 else "num_return_sequences"):
            GenerationConfig(**kw)
    with pytest.raises(ValueError, match="unknown generation parameter"):
        GenerationConfig.from_kwargs(max_tokens=3)
