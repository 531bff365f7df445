"""Build the demo's task set from Shakespeare's plays, deterministically: `next_line.jsonl` and `last_word.jsonl`.

The lines come only from the plays the demo holds out for validation: the same
rule as the prepare stage (a document is validation when its content hash falls
below `data.val_fraction`, read from configs/demo.yaml), so the demo's model
never trained on them. Both tasks keep the corpus's own markdown: a speech is
`**SPEAKER**  ` then its verse lines, each ending in two spaces (a line break).

- `next_line` (multiple choice, HellaSwag-like `{ctx, endings, label}`): the
  context is the speaker and one to two lines of a speech; the four endings are
  the line that follows and three lines drawn from the same play. Each ending
  starts with " \\n", so that with lm_eval's target delimiter " " the scored text
  is exactly the corpus's line break `"  \\n"`. Chance is 0.25.
- `last_word` (cloze, LAMBADA-like `{text}`): the speaker, the previous line and
  a line without its closing punctuation; the target is the line's last word.

Run from the repository root (rewrites both files; the same corpus gives the same bytes):
    PYTHONPATH=. python configs/tasks/make_tasks.py
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from pipeline.config import load_config
from tokenization.documents import doc_hash, documents, is_validation
from tokenization.inputs import Piece, resolve_inputs
from tokenization.readers import SkipLog

HERE = Path(__file__).parent
RECORDS = 250  # per task: a standard error of about 0.03 at 25% accuracy
SEED = 17
SPEAKER = re.compile(r"^\*\*(.+)\*\*\s*$")
WORD = re.compile(r"[A-Za-z][A-Za-z']*[A-Za-z]")


def held_out_plays(config: str = "configs/demo.yaml") -> list[tuple[str, str]]:
    """(name, text) of the plays the demo's prepare stage puts in the validation split."""
    cfg = load_config(config)
    out = []
    for f in resolve_inputs(cfg.data.inputs):
        for text in documents([Piece(f.uri, 0, f.size, f.size)], cfg.data, SkipLog(), Counter()):
            if is_validation(doc_hash(text), cfg.data.val_fraction):
                out.append((f.name, text))
    return out


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) per speech; stage directions, headings and blank lines end a run of lines."""
    out: list[tuple[str, list[str]]] = []
    speaker, lines = None, []
    for raw in text.splitlines() + [""]:
        line = raw.rstrip()
        if m := SPEAKER.match(line):
            speaker, lines = m[1], []
        elif speaker and line and not line.startswith(("_", "#")):
            lines.append(line)
        else:
            if speaker and len(lines) >= 2:
                out.append((speaker, lines))
            speaker, lines = (None, []) if not line.startswith("_") or not speaker else (speaker, [])
    return out


def _verse(line: str) -> bool:
    return 4 <= len(line.split()) <= 12 and len(line) <= 70


def next_line_records(plays: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    candidates, pool = [], {}
    for name, text in plays:
        sp = speeches(text)
        pool[name] = sorted({ln for _, lines in sp for ln in lines if _verse(ln)})
        for speaker, lines in sp:
            for i in range(len(lines) - 1):
                if _verse(lines[i]) and _verse(lines[i + 1]):
                    candidates.append((name, speaker, lines[max(0, i - 1) : i + 1], lines[i + 1]))
    out = []
    for name, speaker, before, answer in rng.sample(candidates, RECORDS):
        distractors = rng.sample([ln for ln in pool[name] if ln != answer and ln not in before], 3)
        endings = [answer, *distractors]
        rng.shuffle(endings)
        ctx = f"**{speaker}**  \n" + "  \n".join(before)
        out.append({"ctx": ctx, "endings": [" \n" + e for e in endings], "label": endings.index(answer)})
    return out


def last_word_records(plays: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    candidates = []
    for _, text in plays:
        for speaker, lines in speeches(text):
            for i in range(1, len(lines)):
                line = lines[i].rstrip(" .,;:!?-'\"")
                last = line.rsplit(" ", 1)[-1]
                if _verse(lines[i]) and WORD.fullmatch(last):
                    candidates.append(f"**{speaker}**  \n{lines[i - 1]}  \n{line}")
    return [{"text": t} for t in rng.sample(candidates, RECORDS)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    plays = held_out_plays()
    print("held-out plays:", ", ".join(name for name, _ in plays))
    write_jsonl(HERE / "next_line.jsonl", next_line_records(plays, random.Random(SEED)))
    write_jsonl(HERE / "last_word.jsonl", last_word_records(plays, random.Random(SEED + 1)))
    for name in ("next_line.jsonl", "last_word.jsonl"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
