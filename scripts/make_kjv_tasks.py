"""Write a verse classification task from the bundled model's corpus: which part of the Bible a verse comes from.

Six labels, the traditional divisions of the King James Bible's 66 books: ``law`` (Genesis-Deuteronomy),
``history`` (Joshua-Esther), ``wisdom`` (Job-Song of Solomon), ``prophets`` (Isaiah-Malachi), ``gospels``
(Matthew-Acts), ``letters`` (Romans-Revelation). The validation and test verses come only from the chapters the
bundled model never trained on: the held-out split of ``glmkit prepare-data --val-fraction 0.05 --seed 0`` over
``scripts/get_kjv_corpus.py``'s chapters (``glmkit.data.prepare.held_out_draws``, the same rule), those chapters divided
between validation and test; the training verses come from the other chapters. Rows: ``{"text", "label", "ref"}``
in jsonl, verses of at least ``--min-words`` words.

    python scripts/make_kjv_tasks.py OUT_DIR [--train 3000] [--seed 0]

Needs Debian's ``bible-kjv`` (``apt-get install -y bible-kjv``), as the corpus script does.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

from glmkit.data.prepare import held_out_draws

# the first book of each division, in the `bible` program's abbreviations, and the division's label
DIVISIONS = [("Ge", "law"), ("Josh", "history"), ("Job", "wisdom"), ("Isa", "prophets"), ("Mat", "gospels"),
             ("Rom", "letters")]  # fmt: skip
LABELS = [label for _, label in DIVISIONS]
VAL_FRACTION, SPLIT_SEED = 0.05, 0  # scripts/train_bundled.sh's prepare-data arguments


def verses() -> list[tuple[str, str, str, str]]:
    """(book, chapter key, reference, text) of every verse, in order."""
    if shutil.which("bible") is None:
        sys.exit("the `bible` program is missing: apt-get install -y bible-kjv")
    raw = subprocess.run(["bible", "-f", "Ge1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    out = []
    for line in raw.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line.strip())  # as get_kjv_corpus.py parses it
        if m:
            out.append((m.group(1), f"{m.group(1)}{m.group(2)}", f"{m.group(1)} {m.group(2)}:{m.group(3)}", m.group(4)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=3000, help="training verses, balanced over the labels")
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = verses()
    books = list(dict.fromkeys(book for book, *_ in rows))
    if len(books) != 66 or [b for b in books if b in dict(DIVISIONS)] != [b for b, _ in DIVISIONS]:
        sys.exit(f"unexpected book list from `bible`: {books}")
    label_of, label = {}, None
    for book in books:
        label = dict(DIVISIONS).get(book, label)
        label_of[book] = label
    chapters = list(dict.fromkeys(ch for _, ch, *_ in rows))
    draws = islice(held_out_draws(VAL_FRACTION, SPLIT_SEED), len(chapters))
    held = {ch for ch, h in zip(chapters, draws, strict=True) if h}
    rng = random.Random(args.seed)
    held_list = sorted(held, key=chapters.index)
    rng.shuffle(held_list)
    val_chapters = set(held_list[: len(held_list) // 2])
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for book, ch, ref, text in rows:
        if len(text.split()) < args.min_words:
            continue
        split = "train" if ch not in held else "validation" if ch in val_chapters else "test"
        splits[split].append({"text": text, "label": label_of[book], "ref": ref})
    by_label: dict[str, list[dict]] = {lab: [r for r in splits["train"] if r["label"] == lab] for lab in LABELS}
    per_label = args.train // len(LABELS)
    train = [r for lab in LABELS for r in rng.sample(by_label[lab], min(per_label, len(by_label[lab])))]
    rng.shuffle(train)
    splits["train"] = train
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in split)
        counts = Counter(r["label"] for r in split)
        print(f"{name}: {len(split)} verses, " + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS))
    print(f"held-out chapters: {len(val_chapters)} validation, {len(held) - len(val_chapters)} test -> {args.out}")


if __name__ == "__main__":
    main()
