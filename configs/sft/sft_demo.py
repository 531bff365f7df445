"""The SFT demo: build an instruction set from the demo corpus, fine-tune the demo base on it, compare exact match.

The task: given a play's title and one line of verse, name its speaker, one of
the four characters with the most verse lines in that play (chance 0.25). The
records are `{"prompt": "<Title>. Who says: <line>\\n", "completion": "<SPEAKER>"}`,
drawn deterministically (fixed seed, sorted inputs) into `speaker.jsonl`. The
fine-tune (configs/sft-demo.yaml) holds out its validation split by the prepare
stage's own rule (content hash of the record below `data.val_fraction`), and
exact match is measured on those held-out records only: the base prompted with
two solved examples of the same play from the training split (its context fits
two), the tuned model with the bare prompt; greedy decoding up to the EOS.

Run from the repository root, after the demo (`llmpipe run configs/demo.yaml`):
    PYTHONPATH=. python configs/sft/sft_demo.py build     # rewrite configs/sft/speaker.jsonl (same corpus, same bytes)
    PYTHONPATH=. python configs/sft/sft_demo.py run       # fine-tune from the demo's train folder, print the table
`run` finds the demo's cached train stage folder from configs/demo.yaml and passes it as `train.init_from` and
its tokenizer as `tokenizer.path` (the fine-tune must tokenize as the base did).
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "speaker.jsonl"
SEED, PER_PLAY, SPEAKERS, MAX_HELD_OUT = 23, 160, 4, 200


def _verse(line: str) -> bool:
    return 4 <= len(line.split()) <= 12 and len(line) <= 70


def build(config: str = "configs/demo.yaml") -> list[dict]:
    from pipeline.config import load_config
    from tokenization.documents import documents
    from tokenization.inputs import Piece, resolve_inputs
    from tokenization.readers import SkipLog

    sys.path.insert(0, str(HERE.parent / "tasks"))
    from make_tasks import speeches  # the demo task builder's speech parser

    cfg = load_config(config)
    rng = random.Random(SEED)
    records = []
    for f in sorted(resolve_inputs(cfg.data.inputs), key=lambda f: f.name):
        for text in documents([Piece(f.uri, 0, f.size, f.size)], cfg.data, SkipLog(), Counter()):
            title = text.splitlines()[0].lstrip("# ").strip()
            lines = [(sp, ln) for sp, ls in speeches(text) for ln in ls if _verse(ln) and sp.isupper()]
            top = {sp for sp, _ in Counter(sp for sp, _ in lines).most_common(SPEAKERS)}
            pool = sorted({(sp, ln.strip()) for sp, ln in lines if sp in top})
            for sp, ln in rng.sample(pool, min(PER_PLAY, len(pool))):
                records.append({"prompt": f"{title}. Who says: {ln}\n", "completion": sp})
    DATA.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def _split(records: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out) by prepare's rule: the canonical record's content hash (NFC) below val_fraction."""
    from tokenization.documents import doc_hash, is_validation
    from tokenization.taskdata import prompt_completion_record

    train, held = [], []
    for r in records:
        doc = unicodedata.normalize("NFC", prompt_completion_record(r, "prompt", "completion"))
        (held if is_validation(doc_hash(doc), val_fraction) else train).append(r)
    return train, held


def exact_match(model_dir: str, questions: list[tuple[str, str]], eos: str) -> float:
    """Greedy completions of the prompts, up to EOS; the share equal to the answer (whitespace stripped)."""
    from model import load_model
    from model.generation import generate_batch
    from tokenization.bpe import load_tokenizer

    model, _ = load_model(model_dir)
    tok = load_tokenizer(f"{model_dir}/tokenizer.json")
    eos_id = tok.token_to_id(eos)
    hits = 0
    for i in range(0, len(questions), 32):
        chunk = questions[i : i + 32]
        prompts = [tok.encode(p).ids[-(model.config.max_seq_len - 8):] for p, _ in chunk]
        outs = generate_batch(model, prompts, max_new_tokens=8, temperature=0.0, stop_tokens={eos_id})
        for (_, answer), out in zip(chunk, outs):
            hits += tok.decode([t for t in out if t != eos_id]).strip() == answer
    return hits / max(1, len(questions))


def run(config: str = "configs/sft-demo.yaml", base_config: str = "configs/demo.yaml") -> dict[str, float]:
    from pipeline import cli
    from pipeline.config import load_config
    from pipeline.engine.plan import plan
    from pipeline.engine.store import ArtifactStore
    from pipeline.stages import STAGES

    base_cfg = load_config(base_config)
    store = ArtifactStore(base_cfg.store.root)
    (item,) = [i for i in plan(base_cfg, store, STAGES) if i.stage.name == "train"]
    if item.state != "cached":
        raise SystemExit(f"the demo base is not trained yet ({item.state}): run `llmpipe run {base_config}` first")
    base = store.stage_path("train", item.fingerprint)
    overrides = [f"train.init_from={base}", f"tokenizer.path={base}/tokenizer.json"]
    if cli.main(["run", config, *overrides]) != 0:
        raise SystemExit("the fine-tune failed")
    cfg = load_config(config, overrides)
    (tuned,) = [i for i in plan(cfg, ArtifactStore(cfg.store.root), STAGES) if i.stage.name == "train"]
    train, held = _split([json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()], cfg.data.val_fraction)
    held = held[:MAX_HELD_OUT]
    shots = {}
    for r in train:  # two solved examples of the same play for the base
        shots.setdefault(r["prompt"].split(". Who says:")[0], []).append(r["prompt"] + r["completion"] + "\n\n")
    few_shot = [("".join(shots.get(r["prompt"].split(". Who says:")[0], [])[:2]) + r["prompt"], r["completion"]) for r in held]
    result = {"base (2-shot prompt)": exact_match(base, few_shot, cfg.tokenizer.eos_token),
              "tuned (bare prompt)": exact_match(store.stage_path("train", tuned.fingerprint),
                                                 [(r["prompt"], r["completion"]) for r in held], cfg.tokenizer.eos_token)}
    print(f"speaker exact match on {len(held)} held-out records (chance 0.25):")
    for name, acc in result.items():
        print(f"  {name:<22} {acc:.3f}")
    return result


if __name__ == "__main__":
    {"build": build, "run": run}[sys.argv[1] if len(sys.argv) > 1 else "run"]()
