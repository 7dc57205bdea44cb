"""Local JSON data files read record by record, every refusal naming the file and line (or record).

- :func:`check_utf8`: a ``.json`` / ``.jsonl`` file is scanned once for bytes that are not UTF-8 before any
  record is read (1 MiB at a time), so a bad byte fails at once, naming its line and byte offset, not
  when (or whether) that record happens to be read.
- :func:`iter_json_file`: ``(where, record)`` pairs of a JSON-lines file (one object a line, blank lines
  skipped) or of a file holding one JSON array of records (streamed by ``iter_json_records``); ``where``
  is ``'file line 7'`` or ``'file record 7'`` (1-based).
- :func:`check_fields`: the OpenOrca fields of a record must be strings (or null / missing); a number or
  a list is refused naming the record, the field, the type found and the type allowed (it used to
  become the text ``'1'`` or ``'[1, 2]'``).

``DataSourceError`` comes from ``sources``; this module imports nothing else of the package.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Callable, Iterator

CHUNK = 1 << 20


def check_utf8(file: Path, error: Callable[[str], Exception]) -> None:
    """``error(message)`` raised at the first byte of ``file`` that is not UTF-8, naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(file, "rb") as f:
        while True:
            block = f.read(CHUNK)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = pending + block
                line = lines + data[:e.start].count(b"\n")
                raise error(f"{file}: byte {offset - len(pending) + e.start:,} (line {line}) is not UTF-8 "
                            f"({data[e.start:e.start + 1]!r}); "
                            "data files must be UTF-8 text: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not block:
                return
            offset += len(block)
            lines += block.count(b"\n")


def _first_char(file: Path) -> str:
    with open(file, encoding="utf-8-sig") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def iter_json_file(file: Path, error: Callable[[str], Exception], iter_array) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of a JSON-lines file (a leading byte-order mark is allowed) or of a JSON array
    file (``iter_array(file)`` streams it)."""
    file = Path(file)
    if _first_char(file) == "[":
        for i, record in enumerate(iter_array(file), 1):
            yield f"{file} record {i}", record
        return
    with open(file, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{file} line {n} is not JSON ({e.msg} at column {e.colno}); a .jsonl file holds one "
                            "JSON object per line") from None
            yield f"{file} line {n}", record


def check_fields(record: object, where: str, fields, error: Callable[[str], Exception]) -> dict:
    """``record`` when it is an object whose ``fields`` are strings, null or missing; else ``error``."""
    if not isinstance(record, dict):
        raise error(f"{where} is a JSON {type(record).__name__}, not an object; allowed: an object with the fields "
                    f"{', '.join(fields)}")
    for name in fields:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise error(f"{where}: field {name!r} is {type(value).__name__} ({shown}); allowed: a string (or null)")
    return record
