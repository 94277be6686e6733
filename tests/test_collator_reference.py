"""The collator against THUDM/GLM's own ``ConstructBlockStrategy``, draw for draw.

tests/fixtures/reference/construct_block_strategy.json.gz holds what the reference's ``construct_blocks`` built
(run outside glmkit; the file says from which commit and how) for 54 batches of 4 samples over every mode glmkit
has: token spans (also single-span, short-sequence re-split, no Part-B shuffle), [sMASK] sentences, [gMASK]
documents in both forms, and the per-batch mix, with and without the task masks. Given ``random.Random(seed)``,
the generator the reference seeds for that batch, ``BlankInfillCollator.build`` must produce the same objective
and the same samples, token for token (the generator is consumed in the same order, or later samples would differ).

Not covered, because glmkit differs on purpose (module docstring of glmkit.data.blank_infill): sentence mode on
samples holding several documents (the reference lets a sentence start with the next document's [CLS]) and
``block_mask_prob > 0`` (the reference draws [dBLOCK] from the global ``random``).
"""

import gzip
import json
import random
from pathlib import Path

import pytest

from glmkit.config import SpecialTokens
from glmkit.data.blank_infill import BlankInfillCollator, BlankInfillConfig

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "construct_block_strategy.json.gz"
REFERENCE = json.loads(gzip.decompress(FIXTURE.read_bytes()))
FIELDS = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "sep")


def _collator(settings: dict) -> BlankInfillCollator:
    ids = REFERENCE["special_tokens"]
    task_mask = settings["task_mask"]
    special = SpecialTokens(
        eos=ids["eos"],
        pad=ids["eos"],
        cls=ids["cls"],
        mask=ids["mask"],
        sop=ids["sop"],
        eop=ids["eop"],
        smask=ids["smask"] if task_mask else None,
        gmask=ids["gmask"] if task_mask else None,
    )
    config = BlankInfillConfig(
        seq_length=settings["max_seq_length"],
        bert_prob=settings["bert_prob"],
        gap_sentence_prob=settings.get("gap_sentence_prob", 0.0),
        gpt_min_ratio=settings.get("gpt_min_ratio", 0.5),
        single_span_prob=settings.get("single_span_prob", 0.0),
        short_seq_prob=settings.get("short_seq_prob", 0.0),
        shuffle_blocks=settings.get("shuffle_blocks", True),
    )  # the rest are the reference's defaults: bert_ratio 0.15, Poisson(3) lengths 1..39, gpt_infill_prob 0.5
    return BlankInfillCollator(config, special, sentence_end_ids=[ids["sentence_end"]])


def test_fixture_covers_every_mode():
    modes = {b["mode"] for c in REFERENCE["cases"] for b in c["batches"]}
    assert modes == {"bert", "sentence", "gpt"}
    assert sum(len(c["batches"]) for c in REFERENCE["cases"]) == 54


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["name"])
def test_build_equals_construct_block_strategy(case):
    collator = _collator(case["settings"])
    for batch in case["batches"]:
        out = collator.build(batch["texts"], random.Random(batch["seed"]))
        assert out.objective == batch["mode"], batch["seed"]
        assert len(out.samples) == len(batch["samples"]), batch["seed"]
        for i, (got, want) in enumerate(zip(out.samples, batch["samples"], strict=True)):
            for name in FIELDS:
                assert getattr(got, name) == want[name], f"seed {batch['seed']} sample {i}: {name}"
