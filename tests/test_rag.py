"""Retrieval-augmented evaluation, decoding and the facts check: the leakage guard, sources, fingerprints, bad input,
and a tiny model that answers facts absent from its training text only when the passage is retrieved."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, ModelConfig
from model.rag import RetrieveOptions, answer_matches, passage_prefix
from model.retrieval import Retriever
from pipeline import cli
from pipeline.engine.plan import plan
from pipeline.engine.store import ArtifactStore
from pipeline.errors import ConfigError
from pipeline.rag import document_hash, facts_check, rag_evaluate
from pipeline.stages import STAGES
from pipeline.stages.decode import decode_samples
from tests.test_decode import make_model_dir
from tokenization.bpe import EOS, load_tokenizer, token_byte_lengths, train_bpe
from tokenization.corpus import tokenize_shard
from tokenization.documents import DocOptions
from tokenization.inputs import InputError, Piece, resolve_inputs
from tokenization.passages import PassageOptions, file_passages
from tokenization.shards import read_documents


def _fps(cfg) -> dict[str, str]:
    return {it.stage.name: it.fingerprint for it in plan(cfg, ArtifactStore(cfg.store.root), STAGES)}


def _facts(root: Path, color: str = "vermilion") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "facts.md").write_text(f"The lamp room of Varnholm is painted {color}.\n", encoding="utf-8")
    return root


def test_retrieval_off_keeps_every_fingerprint_and_index_inputs_reach_only_the_readers(tiny_config, tmp_path):
    plain = _fps(tiny_config())
    knowledge = {"inputs": [str(_facts(tmp_path / "a"))]}
    only_index = _fps(tiny_config(index=knowledge))
    assert {n: only_index[n] for n in plain} == plain  # retrieval off: evaluate and decode are as before
    on = {"evaluate": {"retrieve": {"k": 1, "query_tokens": 8, "target_tokens": 8}}, "decode": {"retrieve": 1}}
    a = _fps(tiny_config(index=knowledge, **on))
    b = _fps(tiny_config(index={"inputs": [str(_facts(tmp_path / "b", "teal"))]}, **on))
    assert [n for n in a if a[n] != b[n]] == ["index", "evaluate", "decode"]  # never tokenizer, prepare, train
    assert a["evaluate"] != plain["evaluate"] and a["decode"] != plain["decode"]


@pytest.mark.parametrize("section, key", [({"evaluate": {"retrieve": {"k": 1}}}, "evaluate.retrieve"),
                                          ({"decode": {"retrieve": 2}}, "decode.retrieve")])
def test_retrieval_without_an_index_is_one_line_naming_the_key(tiny_config, section, key):
    cfg = tiny_config(**section)
    with pytest.raises(ConfigError, match=rf"^{key}: retrieval needs a knowledge index: add an `index:` section"):
        plan(cfg, ArtifactStore(cfg.store.root), STAGES)


def test_a_facts_check_without_retrieval_is_one_line(tiny_config, tmp_path):
    qa = tmp_path / "q.jsonl"
    qa.write_text(json.dumps({"question": "The lamp room of Varnholm is painted", "answer": "vermilion"}) + "\n")
    cfg = tiny_config(index={"inputs": [str(_facts(tmp_path / "a"))]}, decode={"qa_file": str(qa)})
    with pytest.raises(ConfigError, match=r"^decode\.qa_file: .*set decode\.retrieve$"):
        plan(cfg, ArtifactStore(cfg.store.root), STAGES)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    """The conftest corpus as prepare (validation split) and index (passages) read it, with one tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    files = resolve_inputs([str(corpus_dir)])
    tok = train_bpe([Path(f.uri).read_text() for f in files], vocab_size=300, special_tokens=[EOS])
    tok.save(str(root / "tokenizer.json"))
    pieces = [Piece(f.uri, 0, f.size, f.size) for f in files]
    tokenize_shard(0, pieces, np.zeros(0, dtype=np.int64), tokenizer_path=str(root / "tokenizer.json"), eos_token=EOS,
                   opts=DocOptions(), val_fraction=0.2, append_eos=True, out_dir=str(root))
    passages, _, _ = file_passages(files, tok, DocOptions(), PassageOptions(passage_tokens=48, overlap=8))
    return tok, read_documents(root / "val-00000.arrow"), Retriever.build(passages, "bm25")


def test_the_leakage_guard_a_validation_document_never_retrieves_its_own_passages(prepared):
    tok, docs, retriever = prepared
    eos = tok.token_to_id(EOS)
    indexed = set(retriever.passages.column("doc_hash").to_pylist())
    own = [document_hash(tok, d, eos) for d in docs]
    assert docs and set(own) <= indexed  # the decoded validation document hashes as the index hashed its text
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=64))
    opts = RetrieveOptions(k=3, query_tokens=16, target_tokens=16)
    out = rag_evaluate(model, tok, retriever, docs, opts=opts, context=64, eos_id=eos,
                       byte_lengths=token_byte_lengths(tok))
    rows = out["documents"]
    assert len(rows) == len(docs)
    by_id = dict(zip(retriever.passages.column("id").to_pylist(), retriever.passages.column("doc_hash").to_pylist()))
    for row in rows:
        assert len(row["sources"]) == 3
        assert all(by_id[s["passage_id"]] != int(row["doc_hash"]) for s in row["sources"])
    # without the guard the query's own document is what BM25 finds first: the guard is what keeps it out
    queries = [tok.decode([t for t in d if t != eos][:16]) for d in docs]
    assert sum(h[0].doc_hash == o for h, o in zip(retriever.search(queries, 1), own)) > len(docs) // 2
    m = out["metrics"]
    assert {"rag/loss", "rag/bpb", "rag/base_loss", "rag/base_bpb", "rag/delta_bpb", "rag/k"} <= set(m)
    assert m["rag/delta_bpb"] == pytest.approx(m["rag/bpb"] - m["rag/base_bpb"]) and m["rag/k"] == 3
    assert m["rag/tokens"] == sum(r["targets"] for r in rows) and 0 < m["rag/mean_prefix_tokens"] <= 64 - 32 + 1
    with pytest.raises(InputError, match=r"^evaluate\.retrieve\.k: k=99999 exceeds the \d+ passages of the index"):
        rag_evaluate(model, tok, retriever, docs, opts=RetrieveOptions(k=99999), context=64, eos_id=eos,
                     byte_lengths=token_byte_lengths(tok))


def test_the_passage_prefix_is_best_first_within_its_budget_and_ends_with_a_blank_line(prepared):
    tok, _, retriever = prepared
    hits = retriever.search(["the king and the fool"], 3)[0]
    sep = tok.encode("\n\n").ids
    full = passage_prefix(tok, hits, 10_000)
    assert tok.decode(full) == "\n\n".join(h.text for h in hits) + "\n\n"
    cut = passage_prefix(tok, hits, 20)
    assert len(cut) == 20 and cut[-len(sep):] == sep and cut[:-len(sep)] == full[:20 - len(sep)]
    assert passage_prefix(tok, hits, len(sep)) == []


def test_decoded_samples_cite_their_sources_and_k_beyond_the_index_names_the_key(tmp_path):
    from model.generation import SamplingOptions

    model_dir = make_model_dir(tmp_path / "model", "alibi")
    tok = load_tokenizer(model_dir / "tokenizer.json")
    files = resolve_inputs([str(_facts(tmp_path / "k"))])
    table, _, _ = file_passages(files, tok, DocOptions(), PassageOptions(passage_tokens=8, overlap=2))
    Retriever.build(table, "bm25").save(tmp_path / "index")
    opts = SamplingOptions(max_new_tokens=4, num_samples=2)
    prompts = ["the lamp room of Varnholm is painted", "is the room painted", "a fool"]
    rows = decode_samples(str(model_dir), prompts=prompts, opts=opts, eos_token=EOS, index_dir=str(tmp_path / "index"),
                          retrieve=2)
    assert len(rows) == 6
    for r in rows[:4]:
        assert len(r["sources"]) == 2 and {"passage_id", "file", "line", "score"} == set(r["sources"][0])
        assert r["sources"][0]["file"].endswith("facts.md") and r["sources"][0]["line"] == 1
    assert rows[4]["sources"] == rows[5]["sources"] == []  # no word in common with the knowledge: nothing prepended
    plain = decode_samples(str(model_dir), prompts=["the lamp room"], opts=opts, eos_token=EOS)
    assert "sources" not in plain[0]
    with pytest.raises(InputError, match=rf"^decode\.retrieve: k=99 exceeds the {len(table)} passages of the index"):
        decode_samples(str(model_dir), prompts=["x"], opts=opts, eos_token=EOS, index_dir=str(tmp_path / "index"),
                       retrieve=99)
    # the same through `llmpipe generate`, and its bad input
    assert cli.main(["generate", str(model_dir), "--prompt", "the lamp room", "--retrieve", "1", "--index",
                     str(tmp_path / "index"), "--max-new-tokens", "3"]) == 0
    assert cli.main(["generate", str(model_dir), "--prompt", "x", "--retrieve", "1"]) == 2


def _commit_index(store: ArtifactStore, fp: str, knowledge: Path, tok) -> None:
    """What the index stage commits for this knowledge file (a BM25 retriever), without running Ray."""
    table, _, _ = file_passages(resolve_inputs([str(knowledge)]), tok, DocOptions(), PassageOptions(passage_tokens=64, overlap=8))
    work = store.working_dir("index", fp, keep_partial=False)
    Retriever.build(table, "bm25").save(work)
    store.commit("index", fp, work, {"stage": "index", "upstream": {"tokenizer": "x"}})


def test_generate_config_retrieves_from_the_configs_committed_index_and_follows_an_edited_fact(
        corpus_dir, tmp_path, capsys):
    """`llmpipe generate CONFIG --retrieve K`: the config's committed train and index folders, found by planning it;
    edit the knowledge file and only the index is new (the model is the same folder), the source is the edited fact."""
    import yaml

    from tests.conftest import tiny_raw

    knowledge = _facts(tmp_path / "k")
    root = tmp_path / "store"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(corpus_dir, root, index={"inputs": [str(knowledge)],
                                                                         "passage_tokens": 64})))
    store = ArtifactStore(str(root))
    fps = _fps(cli.load_config(str(cfg_path), []))
    tok_dir = make_model_dir(store.working_dir("train", fps["train"], keep_partial=False), "rope")
    store.commit("train", fps["train"], tok_dir, {"stage": "train", "upstream": {}})
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    args = ["generate", str(cfg_path), "--prompt", "the lamp room", "--retrieve", "1", "--max-new-tokens", "2"]
    assert cli.main(args) == 2  # the index is not committed yet: one line saying so
    err = capsys.readouterr().err
    assert "its index stage" in err and "is not committed: run `llmpipe run" in err
    _commit_index(store, fps["index"], knowledge, tok)
    assert cli.main(args) == 0
    assert "source: passage 0 facts.md:1" in capsys.readouterr().out

    _facts(tmp_path / "k", "teal")  # the seeds' claim: edit the fact; only the index (and its readers) is stale
    edited = _fps(cli.load_config(str(cfg_path), []))
    assert [n for n in fps if fps[n] != edited[n]] == ["index"]
    _commit_index(store, edited["index"], knowledge, tok)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "source: passage 0 facts.md:1" in out
    assert Retriever.load(store.local_dir("index", edited["index"])).search(["lamp room"], 1)[0][0].text.strip().endswith("teal.")
    assert cli.main(["generate", str(cfg_path), "model.n_layer=3", "--prompt", "x", "--retrieve", "1"]) == 2  # no such train


def test_answer_matching_compares_the_first_words():
    assert answer_matches(" Edrik Solbane, who lives", "Edrik Solbane")
    assert answer_matches("edrik solbane.", "Edrik Solbane")
    assert not answer_matches(" Edrik", "Edrik Solbane") and not answer_matches(" the Edrik Solbane", "Edrik Solbane")


# ---- the facts check on a synthetic corpus ------------------------------------------------------------------------
SYLLABLES = "kar vel dor min tas rue lo pen sha vi gor na bel tur ix om".split()


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()


def _fact(place: str, keeper: str) -> str:
    return f"The keeper of {place} is {keeper}."


STEPS = 400  # a few seconds of one CPU thread: exact match 0.8 with retrieval, 0 without (0.65 at 300)


def _training_text(rng: random.Random, n: int) -> list[str]:
    """Documents where a fact is stated, a blank line, then the same fact again (the template retrieval builds):
    the model learns to copy from its context, never the facts the test asks about."""
    docs = []
    for _ in range(n):
        place, keeper = _name(rng), _name(rng)
        docs.append(_fact(place, keeper) + "\n\n" + _fact(place, keeper))
    return docs


@pytest.mark.slow
def test_a_tiny_model_answers_facts_absent_from_its_training_text_only_with_retrieval(tmp_path):
    rng = random.Random(0)
    train_docs = _training_text(rng, 2000)
    tok = train_bpe(train_docs, vocab_size=300, special_tokens=[EOS])
    eos = tok.token_to_id(EOS)
    encoded = [tok.encode(d).ids + [eos] for d in train_docs]
    stream = np.concatenate(encoded).astype(np.int64)
    # every window starts at a document, so each step sees whole "fact, blank line, fact" drills in 32 tokens
    starts_at = np.cumsum([0] + [len(e) for e in encoded[:-1]])
    starts_at = starts_at[starts_at < len(stream) - 33]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=48, max_seq_len=48,
                            pos_encoding="rope"))
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    gen = np.random.default_rng(0)
    for _ in range(STEPS):
        starts = gen.choice(starts_at, size=16)
        batch = torch.from_numpy(np.stack([stream[s:s + 33] for s in starts]))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    seen = {d.split("\n\n")[1] for d in train_docs}
    new = [(p, k) for p, k in {(_name(rng), _name(rng)) for _ in range(40)} if _fact(p, k) not in seen][:20]
    knowledge = tmp_path / "knowledge.jsonl"  # one fact per record: one passage each
    knowledge.write_text("".join(json.dumps({"text": _fact(p, k)}) + "\n" for p, k in new), encoding="utf-8")
    table, _, _ = file_passages(resolve_inputs([str(knowledge)]), tok, DocOptions(), PassageOptions(passage_tokens=32))
    questions = [{"question": f"The keeper of {p} is", "answer": k} for p, k in new]
    rows, metrics = facts_check(model, tok, Retriever.build(table, "bm25"), questions, 1, eos_token=EOS)
    assert metrics["rag/facts_em"] >= 0.5 > metrics["rag/facts_em_base"] + 0.3
    assert all(json.loads(r["sources"]) for r in rows)


@pytest.mark.slow
def test_editing_a_fact_reruns_only_index_and_decode_and_the_samples_cite_the_edited_passage(
        ray_local, corpus_dir, tmp_path, tracking_uri, capsys):
    """The seeds' claim through `llmpipe run`: a committed tokenizer and model (a tiny random one, committed as the
    train stage would: nothing here trains), a knowledge file; edit its fact and only index and decode are stale."""
    import yaml

    from tests.conftest import tiny_raw

    knowledge = _facts(tmp_path / "k")
    root = tmp_path / "store"
    raw = tiny_raw(corpus_dir, root, index={"inputs": [str(knowledge)], "passage_tokens": 64},
                   decode={"prompts": ["the lamp room is painted"], "retrieve": 1, "num_samples": 1,
                           "max_new_tokens": 2})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    store = ArtifactStore(str(root))
    fps = _fps(cli.load_config(str(cfg), []))
    model_dir = make_model_dir(store.working_dir("train", fps["train"], keep_partial=False), "rope")
    store.commit("train", fps["train"], model_dir, {"stage": "train", "upstream": {"tokenizer": fps["tokenizer"]}})
    tok_dir = store.working_dir("tokenizer", fps["tokenizer"], keep_partial=False)
    (tok_dir / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    store.commit("tokenizer", fps["tokenizer"], tok_dir, {"stage": "tokenizer", "upstream": {}})

    def cited_text() -> str:
        assert cli.main(["run", str(cfg), "--only", "index"]) == 0
        assert cli.main(["run", str(cfg), "--only", "decode"]) == 0
        now = _fps(cli.load_config(str(cfg), []))
        (sample,) = [json.loads(x) for x in (store.local_dir("decode", now["decode"]) / "samples.jsonl").open()]
        (src,) = sample["sources"]
        index = Retriever.load(store.local_dir("index", now["index"]))
        return index.passages.column("text").to_pylist()[src["passage_id"]]

    assert "vermilion" in cited_text()
    _facts(tmp_path / "k", "teal")
    capsys.readouterr()
    assert cli.main(["status", str(cfg)]) == 0
    state = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    assert all("cached" in state[n] for n in ("tokenizer", "train")) and all(
        "cached" not in state[n] for n in ("index", "decode")), state
    assert "teal" in cited_text()
    # each decode logged the model with its index, which serves the edited fact too
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    decodes = client.search_runs([exp.experiment_id], "tags.stage = 'decode'", order_by=["attributes.start_time DESC"])
    served = mlflow.pyfunc.load_model(decodes[0].data.tags["model_uri"])
    (answer,) = served.predict({"prompt": ["the lamp room is painted"], "max_new_tokens": [2]})
    (src,) = answer["sources"]
    assert "teal" in Retriever.load(store.local_dir("index", _fps(cli.load_config(str(cfg), []))["index"])).passages.column(
        "text").to_pylist()[src["passage_id"]]
