"""Documents out of a Parquet file's text column, one row group at a time.

A piece of a Parquet file (see `tokenization.inputs.split_file`) owns the row
groups whose first page starts inside its byte range, so several tasks share
a large file and each row group is read once, by one of them; the footer is
read by every piece (it is small). Memory is one row group's text column.

Damage is reported where it is: a file whose footer cannot be read (a
truncated file: `ArrowInvalid`) is one `unreadable` skip naming the file; a
row group that cannot be decoded is one `unreadable` skip naming the file and
the row group, and the other row groups are still read; a value that is not a
string (a null) is `not_a_string` naming the row. Only the piece holding byte
0 reports what concerns the whole file, so a file split into pieces counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa

from tokenization.inputs import InputError, Piece, one_line, open_input

Bad = Callable[[str, str, str], None]  # (reason, message, where): raises under on_error=raise, else counts
# What a damaged file makes pyarrow raise: ArrowInvalid (a ValueError), OSError, or a UnicodeDecodeError (a ValueError)
# for a footer whose names are not UTF-8.
_DAMAGE = (pa.ArrowException, OSError, ValueError)


def row_group_start(meta, i: int) -> int:
    """The file offset of row group `i`'s first page (dictionary or data) over all its columns."""
    rg = meta.row_group(i)
    starts = []
    for j in range(rg.num_columns):
        col = rg.column(j)
        dict_offset = col.dictionary_page_offset if col.has_dictionary_page else None
        starts.append(dict_offset if dict_offset else col.data_page_offset)  # some writers put 0 for "none"
    return min(starts)


def parquet_documents(piece: Piece, name: str, text_field: str, bad: Bad, replaced: Callable[[], None] | None
                      ) -> Iterator[tuple[int, str]]:
    """The (1-based row, document) pairs of the row groups `piece` owns. `replaced` (replace_invalid_utf8) is called for each value
    whose invalid UTF-8 was replaced; without it such a value is `invalid_utf8`."""
    import pyarrow.parquet as pq

    owns_file = piece.start == 0
    with open_input(piece.uri) as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except _DAMAGE as e:
            if owns_file:
                bad("unreadable", f"{name}: cannot read ({one_line(e)})", name)
            return
        if text_field not in names:
            if owns_file:
                bad("missing_field", f"{name}: column {text_field!r} is missing (columns: {names})", name)
            return
        meta, row = pf.metadata, 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if piece.whole or piece.start <= row_group_start(meta, i) < piece.end:
                yield from _row_group(pf, i, row, name, text_field, bad, replaced)
            row += rows


def _row_group(pf, i: int, first_row: int, name: str, text_field: str, bad: Bad, replaced
               ) -> Iterator[tuple[int, str]]:
    row = first_row
    try:
        for batch in pf.iter_batches(batch_size=8192, row_groups=[i], columns=[text_field], use_threads=False):
            col = batch.column(0)
            text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            # A string column may still hold bytes that are not UTF-8 (a damaged or careless file): decode each
            # value ourselves, so that is one bad row rather than an exception for the whole file.
            values = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()) if text else col
            for value in values.to_pylist():
                row += 1
                if text and isinstance(value, bytes):
                    value = _decode(value, f"{name}: row {row}", bad, replaced)
                    if value is None:
                        continue
                if isinstance(value, str):
                    yield row, value
                else:
                    where = f"{name}: row {row}"
                    bad("not_a_string", f"{where}: column {text_field!r} is {type(value).__name__}, not a string", where)
    except InputError:
        raise  # a bad value under on_error=raise, not damage
    except _DAMAGE as e:
        where = f"{name}: row group {i}"
        bad("unreadable", f"{where}: cannot read from row {row + 1} on ({one_line(e)})", where)


def _decode(value: bytes, where: str, bad: Bad, replaced) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        if replaced is not None:
            replaced()
            return value.decode("utf-8", "replace")
        bad("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start} of the value", where)
        return None
