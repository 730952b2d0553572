"""Writes facts_corpus.jsonl and facts_choice.jsonl: a multiple-choice task whose right ending is
recoverable from the corpus (each "NAME's THING is COLOUR ." fact is repeated in it), so a tiny GPT
trained on the corpus beats chance (1 in 4). Deterministic: rerun to regenerate the shipped files.

    python tests/assets/make_facts_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["anna", "boris", "chen", "dara", "emil", "fatima", "gus", "hana", "ivan", "jules", "kemal", "lena"]
THINGS = ["hat", "car", "door", "kite"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
REPEATS = 30


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    return [(n, t, rng.choice(COLOURS)) for n in NAMES for t in THINGS]


def main() -> None:
    rng = random.Random(26)
    table = facts(rng)
    lines = [f"{n}'s {t} is {c} ." for n, t, c in table for _ in range(REPEATS)]
    rng.shuffle(lines)
    # documents of a few facts each (prepare-text holds out whole documents for val)
    with (HERE / "facts_corpus.jsonl").open("w") as fh:
        for i in range(0, len(lines), 4):
            fh.write(json.dumps({"text": " ".join(lines[i : i + 4])}) + "\n")
    with (HERE / "facts_choice.jsonl").open("w") as fh:
        for n, t, c in table:
            choices = [c, *rng.sample([x for x in COLOURS if x != c], 3)]
            rng.shuffle(choices)
            fh.write(json.dumps({"context": f"{n}'s {t} is", "choices": choices, "gold": choices.index(c)}) + "\n")


if __name__ == "__main__":
    main()
