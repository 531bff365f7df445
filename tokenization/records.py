"""JSON records to document texts: a JSON Lines line, or each element of a `.json` array, streamed.

A record is good when it is an object whose `text_field` is a string (in a
`.json` array, a bare string is good too), and that string is valid Unicode;
otherwise it is `(reason, detail)` for the reader's bad-record policy. Nothing
a user's file holds escapes as a Python error: a line of 200,000 `[`
(RecursionError in `json`) is `malformed_json`, and a number of more than
4,300 digits (Python's int-string limit) is read as a `Decimal` rather than
failing the whole record, since only the text field matters.

`iter_json_array` parses a `[ ... ]` file element by element from a stream,
holding the element being parsed and one chunk, never the whole file. Bytes
that are not UTF-8 are decoded with `surrogateescape`, so they stay inside
their element and make exactly that element `invalid_utf8`. After a syntax
error there is no telling where the next element starts: the error is the last
item and the rest of the file is not read.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

SURROGATE = re.compile("[\ud800-\udfff]")  # what "\\ud800" (or a surrogate-escaped byte) decodes to; not valid Unicode
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")  # what could still continue a number read so far
_NEAR_END = 64  # a parse error this close to the end of the buffer may just be an element cut by the chunk
CHUNK = 1 << 20

Result = str | tuple[str, str]  # the text, or (reason, detail)


def _number(digits: str) -> int | Decimal:
    return int(digits) if len(digits) <= 4000 else Decimal(digits)  # int() refuses more than 4300 digits


_DECODER = json.JSONDecoder(parse_int=_number)


def _kind(value: Any) -> str:
    return "int" if isinstance(value, Decimal) else type(value).__name__


def record_text(record: Any, text_field: str | Callable[[Any, bool], Result], *, replace: bool = False,
                strings: bool = False) -> Result:
    """The document of one parsed record. `strings` accepts a bare string (a `.json` array's element). A callable
    `text_field` reads a task record instead (`tokenization.taskdata.record_reader`)."""
    if callable(text_field):
        return text_field(record, replace)
    if strings and isinstance(record, str):
        text, what = record, "the element"
    else:
        if not isinstance(record, dict) or text_field not in record:
            return "missing_field", f"field {text_field!r} is missing"
        text, what = record[text_field], f"field {text_field!r}"
        if not isinstance(text, str):
            return "not_a_string", f"field {text_field!r} is {_kind(text)}, not a string"
    if not text.isascii() and (bad := SURROGATE.search(text)):  # isascii() is O(1): the common case costs nothing
        if not replace:
            return "invalid_utf8", (f"{what} holds a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()} "
                                    "(invalid UTF-8 or a \\ud800-style escape), which is not valid Unicode")
        text = SURROGATE.sub("\ufffd", text)
    return text


def parse_line(line: bytes | memoryview, text_field: str | Callable[[Any, bool], Result], *, replace: bool = False) -> Result:
    """The text of one JSON Lines line, or (reason, detail). `replace` puts U+FFFD for invalid UTF-8."""
    try:
        s = str(line, "utf-8", "replace" if replace else "strict")
    except UnicodeDecodeError as e:
        return "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line"
    try:
        record = _DECODER.decode(s)
    except json.JSONDecodeError as e:
        return "malformed_json", f"malformed JSON ({e.msg}, column {e.colno})"
    except RecursionError:
        return "malformed_json", "malformed JSON (nested too deeply)"
    return record_text(record, text_field, replace=replace)


class _Text:
    """Decoded text of a byte stream, consumed from the front: `buf[pos:]` is what is left, `line` where it starts."""

    def __init__(self, read: Callable[[int], bytes]):
        self.read, self.buf, self.pos, self.line, self.eof = read, "", 0, 1, False
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def more(self, n: int = CHUNK) -> None:
        data = self.read(n)
        self.eof = not data
        self.buf = self.buf[self.pos:] + self.decoder.decode(data, final=self.eof)
        self.pos = 0

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def skip_ws(self) -> str:
        """The next non-blank character ("" at the end)."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.more()

    def _number_may_go_on(self, value: Any, end: int) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            return False  # an object, array, string or literal ends at its own last character
        return _NUMBER_TAIL.match(self.buf, end).end() == len(self.buf)

    def value(self) -> tuple[Any, str | None]:
        """The next JSON value, or (None, why it is malformed)."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self.eof and (e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - _NEAR_END):
                    self.more(max(CHUNK, len(self.buf) - self.pos))  # doubling: a long element is re-parsed log(n) times
                    continue
                return None, f"malformed JSON ({e.msg})"
            except RecursionError:
                return None, "malformed JSON (nested too deeply)"
            if not self.eof and self._number_may_go_on(value, end):  # "1" of "12", "0" of "0.5": not a value yet
                self.more(max(CHUNK, len(self.buf) - self.pos))
                continue
            self.advance(end)
            return value, None


def iter_json_array(read: Callable[[int], bytes]) -> Iterator[tuple[int, Any, str | None]]:
    """(line where it starts, value, None) for each element of the JSON array that `read(n)` yields (UTF-8 bytes,
    no BOM, starting at the "["); a malformed file ends with one (line, None, why) item."""
    t = _Text(read)
    t.skip_ws()
    t.advance(t.pos + 1)  # the "[" the caller saw
    count = 0
    while True:
        c = t.skip_ws()
        if c == "]" and count == 0:
            t.advance(t.pos + 1)
            break
        start = t.line
        value, error = t.value() if c else (None, "malformed JSON (the array is not closed)")
        if error:
            yield start, None, error
            return
        yield start, value, None
        count += 1
        c = t.skip_ws()
        t.advance(t.pos + 1)
        if c == "]":
            break
        if c != ",":
            yield t.line, None, ("malformed JSON (the array is not closed)" if not c else
                                 f"malformed JSON (expected ',' or ']' after element {count}, found {c!r})")
            return
    if t.skip_ws():
        yield t.line, None, "malformed JSON (text after the end of the array)"
