"""Writes copy_drills.jsonl: invented facts, each stated and then repeated after a blank line.

The rag-demo trains on these beside Shakespeare so its small model learns to
copy a span from its context, the skill the facts check measures; the facts
it is asked about (facts.jsonl) are never among them. Deterministic:
`python configs/rag/make_drills.py` rewrites the same file.
"""

import json
import random
from pathlib import Path

SYLLABLES = "ar bel cor dun el fen gar hol ith jor kel lum mar nor ost pel quin ros sul tam ul vor wen yr zan".split()
TEMPLATES = [
    "The lighthouse keeper of {p} is named {a} {b}.",
    "The bell of {p} was cast by {a} {b}.",
    "The ferry to {p} is captained by {a} {b}.",
    "The orchard of {p} belongs to {a} {b}.",
    "The mayor of {p} is {a} {b}.",
    "The library of {p} is kept by {a} {b}.",
]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def main(n: int = 2500) -> None:
    rng = random.Random(17)
    out = Path(__file__).with_name("copy_drills.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(n):
            fact = rng.choice(TEMPLATES).format(p=word(rng), a=word(rng), b=word(rng))
            f.write(json.dumps({"text": f"{fact}\n\n{fact}"}) + "\n")


if __name__ == "__main__":
    main()
