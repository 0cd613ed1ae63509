"""A DAP corpus as a lazy sequence of texts: read from its file (or a hub dataset's memory-mapped Arrow table)
each time it is iterated and never held whole in memory, so a corpus larger than memory plans, audits and
tokenises in constant memory (docs/suites.md, "Corpora larger than memory"). A `Corpus` is the non-empty texts
of one source in file order (the first `limit`, if given); a view of it keeps the positions in [start, stop)
less a set of excluded texts (a held-out slice's) and of dropped positions (decontamination's). Its content
digest is the SHA-256 of the JSON list of its texts, computed while streaming, the same digest a list in
memory gives, so caches keyed by content stay valid."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cpt_bench.common.errors import BadInput

Records = Callable[[], Iterator[dict[str, Any]]]  # a fresh pass over a source's rows, each with its "_line"


def file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl (one object a line), .txt (one text a line, field `text`) or .csv (header) file, read
    line by line. Lines are split as `str.splitlines` splits the whole text (so a form feed or U+2028 inside
    a .txt line starts a new text, as it always did)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt", ".csv"):
        raise BadInput(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .txt or .csv)")
    if suffix == ".csv":
        yield from _csv_records(path)
        return
    for number, line in _lines(path):
        if not line.strip():
            continue  # blank lines carry no example
        if suffix == ".txt":
            yield {"text": line, "_line": number}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadInput(f"{path} line {number}: malformed JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path} line {number}: expected a JSON object")
        row["_line"] = number
        yield row


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) of a UTF-8 file, numbered as `str.splitlines` numbers the whole text."""
    number = 0
    with path.open("rb") as handle:
        for raw in handle:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"{path} line {number + 1}: not UTF-8 text") from None
            for line in text.splitlines():
                number += 1
                yield number, line


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        try:
            for number, row in enumerate(csv.DictReader(text), start=2):
                yield {**row, "_line": number}
        except UnicodeDecodeError:
            raise BadInput(f"{path}: not UTF-8 text") from None


def field_text(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise BadInput(f"{where} line {row['_line']}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise BadInput(f"{where} line {row['_line']}: field {field!r} is not a string")
    return value


class Corpus:
    """The non-empty texts of `records`' field `field` (the first `limit`), or a view of them (`view`).
    Iterating reads the source again; `len` and the digest are computed once, by one pass each."""

    def __init__(self, records: Records, field: str, where: str, limit: int | None = None, start: int = 0,
                 stop: int | None = None, excluded: frozenset[str] = frozenset(),
                 dropped: frozenset[int] = frozenset()):
        self.records, self.field, self.where, self.limit = records, field, where, limit
        self.start, self.stop, self.excluded, self.dropped = start, stop, excluded, dropped
        self._length: int | None = None
        self._digest: str | None = None

    @classmethod
    def of(cls, texts: Iterable[str], where: str) -> Corpus:
        """A corpus of texts already in memory (generated data, tests)."""
        rows = [{"text": text, "_line": n} for n, text in enumerate(texts, start=1)]
        return cls(lambda: iter(rows), "text", where)

    def positions(self) -> Iterator[tuple[int, str]]:
        """(position in the whole corpus, text) of every text of this view."""
        position = 0
        for row in self.records():
            text = field_text(row, self.field, self.where)
            if not text.strip():
                continue
            if self.limit is not None and position >= self.limit:
                return
            if self.stop is not None and position >= self.stop:
                return
            if position >= self.start and position not in self.dropped and text not in self.excluded:
                yield position, text
            position += 1

    def __iter__(self) -> Iterator[str]:
        return (text for _, text in self.positions())

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self.positions())
        return self._length

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts at positions [start, stop) of the whole corpus, in memory (a held-out slice)."""
        return [text for _, text in Corpus(self.records, self.field, self.where, self.limit, start, stop)
                .positions()]

    def view(self, start: int = 0, stop: int | None = None, excluded: frozenset[str] = frozenset(),
             dropped: frozenset[int] = frozenset()) -> Corpus:
        """The texts of this corpus at positions [start, stop), less `excluded` texts and `dropped` positions
        (and less what this view already leaves out)."""
        stop = stop if self.stop is None else (self.stop if stop is None else min(stop, self.stop))
        return Corpus(self.records, self.field, self.where, self.limit, max(start, self.start), stop,
                      self.excluded | excluded, self.dropped | dropped)

    def json_chunks(self) -> Iterator[str]:
        """`json.dumps(list(self))`, in pieces."""
        yield "["
        for index, text in enumerate(self):
            yield (", " if index else "") + json.dumps(text)
        yield "]"

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of `json.dumps(list(self))`, by one streaming pass."""
        if self._digest is None:
            hasher = hashlib.sha256()
            for chunk in self.json_chunks():
                hasher.update(chunk.encode())
            self._digest = hasher.hexdigest()
        return self._digest


def json_digest(value: Any) -> str:
    """SHA-256 (hex) of `json.dumps(value)` where `value` may hold corpora among lists, tuples, dicts, strings
    and numbers: a corpus is encoded as the list of its texts, streamed."""
    hasher = hashlib.sha256()
    for chunk in _json_chunks(value):
        hasher.update(chunk.encode())
    return hasher.hexdigest()


def _json_chunks(value: Any) -> Iterator[str]:
    if isinstance(value, Corpus):
        yield from value.json_chunks()
    elif isinstance(value, (list, tuple)):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ", "
            yield from _json_chunks(item)
        yield "]"
    elif isinstance(value, dict):
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield (", " if index else "") + json.dumps(str(key)) + ": "
            yield from _json_chunks(item)
        yield "}"
    else:
        yield json.dumps(value)
