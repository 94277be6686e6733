"""A deterministic blank-infilling batch source over random text, for training-loop tests."""

import random

from glmkit.masks import collate, make_block_data


def synthetic_source(seed: int = 0, batch: int = 2, length: int = 16, vocab: int = 80):
    def source(index: int) -> dict:
        rng = random.Random(seed * 1_000_003 + index)
        samples = []
        for _ in range(batch):
            text = [90] + [rng.randrange(vocab) for _ in range(length - 1)]
            s = rng.randrange(1, length - 4)
            samples.append(make_block_data(text, [(s, s + rng.randrange(1, 4))], mask_id=91, sop_id=92, eop_id=93))
        b = collate(samples, pad_id=0)
        b["objective"] = "bert"
        return b

    return source
