"""Write the knowledge-guided prompting proof's question set from the bundled model's corpus: multiple-choice
questions on who begat / said / did / went / whose son, built by regular expressions over the King James verses, with
the verses as the knowledge a retriever searches.

The test questions come only from the chapters the bundled model never trained on: the held-out split of
``glmkit prepare-data --val-fraction 0.05 --seed 0`` over ``scripts/get_kjv_corpus.py``'s chapters (the rule of
``glmkit.data.prepare.held_out_draws``, as ``scripts/make_kjv_tasks.py`` applies it; its validation and test chapters
together). The exemplar pool comes from trained chapters, so that no exemplar gives a test answer away. Patterns:

- begat: "And Arphaxad lived five and thirty years, and begat Salah" -> "Who begat Salah?" (Arphaxad)
- said: "And the LORD said unto Moses, Go down, charge the people" -> "Who said unto Moses, Go down, charge the
  people?" (the LORD)
- went: "Abram went down into Egypt" -> "Who went down into Egypt?" (Abram)
- kin: "Joshua the son of Nun" -> "Whose son was Joshua?" (Nun); daughter, wife and brother alike
- begat also: "The sons of Judah; Er, and Onan, and Shelah" -> "Whose sons were Er, Onan and Shelah?" (Judah)

A question whose text has two different answers anywhere in the Bible is left out. Distractors are three other
people of the same book (of the same testament where the book names too few), never a name of the answer's verse,
drawn with a seed; the answer takes the letters A-D in turn. Rows are glmkit's question layout
(``glmkit.prompting.datasets``): ``id``, ``question``, ``options``, ``answer``, ``subject`` (the book), ``qtype``,
``meta`` (``verse``: the citation, ``verse_id``, ``verse_text``, ``testament``, ``chapter``, and for exemplars
``explanation``). Writes OUT/questions.jsonl (held-out chapters), OUT/exemplars.jsonl (trained chapters, balanced
over the question types) and OUT/verses.jsonl (every verse: ``{"id": "Ge11:12", "text", "citation": "Genesis
11:12"}``, the knowledge source), and prints a sample and how often BM25 over the verses ranks a
question's own verse among the first ``--k``.

    python scripts/make_kjv_questions.py OUT_DIR [--exemplars 48] [--seed 0] [--k 3]

Needs Debian's ``bible-kjv`` (``apt-get install -y bible-kjv``), as the corpus script does.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_kjv_tasks import SPLIT_SEED, VAL_FRACTION, verses  # noqa: E402  (the same verses and split rule)

from glmkit.data.prepare import held_out_draws  # noqa: E402

# the `bible` program's book abbreviations, in order, and the books' names
ABBREVIATIONS = (
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam Eze "
    "Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph "
    "Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev"
).split()
BOOKS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
         "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
         "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
         "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
         "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
         "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy",
         "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
         "Jude", "Revelation"]  # fmt: skip
BOOK_NAMES = dict(zip(ABBREVIATIONS, BOOKS, strict=True))
OLD_TESTAMENT = 39
LETTERS = "ABCD"
# capitalised words that start a clause rather than name someone
NOT_NAMES = set(
    "And The Then But Now For So When Thus I Ye He She They We It This That These Those Behold Lo O Yea Therefore "
    "Wherefore If As In Of His Her My Thou Thee Which What Who Whom Let Go Also All Moreover Neither Nor Not How "
    "There Here Lord Son Father Mother King Master Sir Amen Verily After Before Because Even Whosoever Every One "
    "Yet Some Many Since Nevertheless Notwithstanding Howbeit Surely Again Whither Why Where Whence Art Is Are "
    "Hast Hath Have Do Did Shall Will Can Come Give Take Bring Hear See Speak Make Except Unto Until Till "
    "Whatsoever Blessed Woe Praise Arise Others Lest Peradventure Hearken Remember Suffer Hereby Whereas Whereby "
    "Wherein While".split()
)
NAME = r"[A-Z][a-z]+"
DIVINE = r"the LORD God|the LORD|God|Jesus"
GODHEAD = {"the LORD God", "the LORD", "God", "Jesus", "Christ", "Lord"}
SPEECH_VERBS = "said|saith|spake|answered|cried|called"
DEEDS = {  # verb -> question type
    **dict.fromkeys("went came departed fled returned journeyed passed".split(), "went"),
    **dict.fromkeys(
        "took gave sent built smote slew arose rose brought made commanded blessed saw heard did pitched reigned dwelt "
        "died wrote set turned removed numbered offered buried called gathered knew bare besought charged loved prayed "
        "wept walked sat stood lifted opened told asked sware fell cast kept led carried hid sought rent laid put "
        "shewed healed touched followed answered".split(),
        "did",
    ),
}
# the doer starts a clause: "And Abram went", "; then Moses said", not "the Chaldeans that besieged Jerusalem heard"
CLAUSE_START = r"(?:^|(?<=[,;:] )|(?<=\bAnd )|(?<=\bThen )|(?<=\bSo )|(?<=\bNow )|(?<=\bBut )|(?<=\bwhen )"
WHO = rf"{CLAUSE_START}|(?<=[,;:] and )|(?<=[,;:] then ))({DIVINE}|{NAME})\b"
PATTERNS = {
    "begat": re.compile(rf"\b({NAME}) (?:lived [^.;:]*?, and |also )?begat ({NAME})\b"),
    "said": re.compile(
        rf"{WHO} ((?:{SPEECH_VERBS})(?: and said)?(?: unto [^,.;:]{{1,30}})?),(?: saying,)? ([^.;:?!]+)"
    ),
    "said-then": re.compile(
        rf"\b(?:Then|And) ((?:{SPEECH_VERBS})) ({DIVINE}|{NAME})((?: unto [^,.;:]{{1,30}})?),(?: saying,)? ([^.;:?!]+)"
    ),
    "did": re.compile(rf"{WHO} ({'|'.join(DEEDS)}) ([^.;:?!,]+)"),
    "kin": re.compile(rf"(?<!of )\b({NAME}),? the (son|daughter|wife|brother) of ({NAME})\b"),
    "sons": re.compile(rf"\b[Tt]he sons of ({NAME})[;:,] ((?:{NAME})(?:(?:,? and |, ){NAME})+)"),
}


def _name(word: str) -> bool:
    return word not in NOT_NAMES and (word.startswith("the ") or word in ("God", "Jesus") or word.isalpha())


LOOSE_ENDS = set("the a an of and to into unto in upon with that which his her their my thy our your for from by at "
                 "on is was be not but or nor he she it they we ye".split())  # fmt: skip


def _clause(text: str, most: int = 9) -> str | None:
    """The first words of a clause, without the little words a cut would leave hanging at its end."""
    words = text.split()[:most]
    while words and words[-1].lower().strip(",") in LOOSE_ENDS:
        words.pop()
    if words:
        words[-1] = words[-1].rstrip(",")
    while words and words[-1].lower() in LOOSE_ENDS:
        words.pop()
    return " ".join(words) if len(words) >= 2 else None


def facts(text: str) -> list[tuple[str, str, str, list[str]]]:
    """(question type, question, answer, the people the verse names in those roles) found in one verse."""
    out = []
    for m in PATTERNS["begat"].finditer(text):
        father, son = m.groups()
        if _name(father) and _name(son):
            out.append(("begat", f"Who begat {son}?", father, [father, son]))
            out.append(("begat", f"Whom did {father} beget?", son, [father, son]))
    for m in PATTERNS["said"].finditer(text):
        speaker, verb, speech = m.groups()
        words = _clause(speech)
        if _name(speaker) and words and len(speech.split()) >= 3:
            out.append(("said", f"Who {verb}, {words}?", speaker, [speaker]))
    for m in PATTERNS["said-then"].finditer(text):
        verb, speaker, hearer, speech = m.groups()
        words = _clause(speech)
        if _name(speaker) and words and len(speech.split()) >= 3:
            out.append(("said", f"Who {verb}{hearer}, {words}?", speaker, [speaker]))
    for m in PATTERNS["did"].finditer(text):
        who, verb, rest = m.groups()
        words = _clause(rest)
        if _name(who) and words:
            out.append((DEEDS[verb], f"Who {verb} {words}?", who, [who]))
    for m in PATTERNS["kin"].finditer(text):
        who, kin, whose = m.groups()
        if _name(who) and _name(whose):
            out.append(("kin", f"Whose {kin} was {who}?", whose, [who, whose]))
            out.append(("kin", f"Who was the {kin} of {whose}?", who, [who, whose]))
    for m in PATTERNS["sons"].finditer(text):
        father, sons = m.group(1), re.split(r",? and |, ", m.group(2))
        if _name(father) and all(map(_name, sons)):
            listed = ", ".join(sons[:-1]) + " and " + sons[-1]
            out.append(("begat", f"Whose sons were {listed}?", father, [father, *sons]))
            out += [("begat", f"Whom did {father} beget?", son, [father, *sons]) for son in sons]  # ambiguous: out
    return [f for f in out if not re.search(rf"\b{re.escape(f[2])}\b", f[1])]  # the question must not name it


def build(rows: list[tuple[str, str, str, str]], seed: int) -> list[dict]:
    """Every unambiguous question of ``rows`` ((book abbreviation, chapter key, reference, text) in Bible order), with
    its options, in verse order; ``meta.chapter`` tells which chapter it came from."""
    found = [(book, chapter, ref, text, *f) for book, chapter, ref, text in rows for f in facts(text)]
    # people: the names of genealogies (begat, son of) and speakers; a place or a nation is neither
    persons = {n for *_, qtype, _, _, names in found if qtype in ("begat", "kin", "said") for n in names}
    answers, people = defaultdict(set), defaultdict(set)
    for book, _, _, _, _, question, answer, names in found:
        answers[question].add(answer)
        people[book].update(n for n in names if n in persons)
    by_testament: dict[bool, set[str]] = defaultdict(set)
    for book, names in people.items():
        by_testament[ABBREVIATIONS.index(book) < OLD_TESTAMENT].update(names)
    out, seen = [], set()
    for book, chapter, ref, text, qtype, question, answer, _ in found:
        if len(answers[question]) > 1 or question in seen or answer not in persons:
            continue
        seen.add(question)
        rng = random.Random(f"{seed}:{ref}:{question}")
        old = ABBREVIATIONS.index(book) < OLD_TESTAMENT
        # never a distractor that is the answer by another name: "God" beside "the LORD"
        others = [n for n in people[book] if n not in text and not (answer in GODHEAD and n in GODHEAD)]
        pool = sorted(others)
        if len(pool) < 3:
            pool = sorted(n for n in by_testament[old] if n not in text and not (answer in GODHEAD and n in GODHEAD))
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3)
        choices.insert(len(out) % len(LETTERS), answer)  # the answer's letter in turn: no letter is a better guess
        chapter_no, verse_no = ref.split(" ")[1].split(":")
        citation = f"{BOOK_NAMES[book]} {chapter_no}:{verse_no}"
        out.append({
            "id": f"kjv-{book}{chapter_no}:{verse_no}-{qtype}-{len(out)}",
            "question": question,
            "options": dict(zip(LETTERS, choices, strict=True)),
            "answer": LETTERS[choices.index(answer)],
            "subject": BOOK_NAMES[book],
            "qtype": qtype,
            "meta": {"verse": citation, "verse_id": f"{book}{chapter_no}:{verse_no}", "verse_text": text,
                     "testament": "old" if old else "new", "chapter": chapter},
        })  # fmt: skip
    return out


def verse_documents(rows: list[tuple[str, str, str, str]]) -> list[dict]:
    """The knowledge source's documents: ``{"id": "Ge11:12", "text", "citation": "Genesis 11:12"}`` per verse."""
    return [
        {"id": f"{book}{ref.split(' ')[1]}", "text": text, "citation": f"{BOOK_NAMES[book]} {ref.split(' ')[1]}"}
        for book, _, ref, text in rows
    ]


def explanation(row: dict) -> str:
    letter, meta = row["answer"], row["meta"]
    return f'{meta["verse"]} says: "{meta["verse_text"]}" So the answer is ({letter}) {row["options"][letter]}.'


def held_out_chapters(rows: list[tuple[str, str, str, str]]) -> set[str]:
    chapters = list(dict.fromkeys(ch for _, ch, *_ in rows))
    draws = islice(held_out_draws(VAL_FRACTION, SPLIT_SEED), len(chapters))
    return {ch for ch, held in zip(chapters, draws, strict=True) if held}


def balanced(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn round-robin over the question types (seeded), in a seeded order."""
    rng = random.Random(seed)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_type[r["qtype"]].append(r)
    for group in by_type.values():
        rng.shuffle(group)
    picked: list[dict] = []
    for depth in range(max(map(len, by_type.values()), default=0)):
        picked += [g[depth] for _, g in sorted(by_type.items()) if depth < len(g)]
    return picked[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--exemplars", type=int, default=48, help="exemplar pool size, balanced over question types")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=3, help="retrieval depth of the printed recall check")
    args = ap.parse_args()
    rows = verses()
    books = list(dict.fromkeys(book for book, *_ in rows))
    if books != ABBREVIATIONS:
        sys.exit(f"unexpected book list from `bible`: {books}")
    held = held_out_chapters(rows)
    questions = build(rows, args.seed)
    test = [q for q in questions if q["meta"]["chapter"] in held]
    pool = balanced([q for q in questions if q["meta"]["chapter"] not in held], args.exemplars, args.seed)
    for q in pool:
        q["meta"]["explanation"] = explanation(q)
    docs = verse_documents(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in (("questions", test), ("exemplars", pool), ("verses", docs)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    counts = Counter(q["qtype"] for q in test)
    print(f"{len(test)} test questions from {len(held)} held-out chapters ({dict(sorted(counts.items()))}), "
          f"answer letters {dict(sorted(Counter(q['answer'] for q in test).items()))}; "
          f"{len(pool)} exemplars from trained chapters; {len(docs)} verses -> {args.out}")  # fmt: skip
    from glmkit.prompting.knowledge import BM25Knowledge, Document

    kb = BM25Knowledge(Document(**d) for d in docs)
    hits = sum(q["meta"]["verse"] in [s.citation for s in kb.retrieve(q["question"], args.k)] for q in test)
    print(f"BM25 over the verses ranks a question's own verse in its first {args.k}: {hits}/{len(test)}")
    for q in random.Random(args.seed).sample(test, min(8, len(test))):
        opts = " ".join(f"({k}) {v}" for k, v in q["options"].items())
        print(f"  {q['meta']['verse']} [{q['qtype']}] {q['question']} {opts} -> {q['answer']}")


if __name__ == "__main__":
    main()
