"""Chat rendering with answer-only labels, and batching of encoded examples into LongTensors.

``encode_example(tokenizer, example, max_len)`` renders the prompt (system when non-empty, user) with
the tokenizer's chat template and generation prompt, appends the answer ids and the template's
end-of-turn id (``end_of_turn_id``, e.g. ``<|im_end|>``), and cuts the whole to ``max_len`` tokens:
``Encoded(input_ids, labels)``, plain lists of ints of one length, with ``labels`` = ``IGNORE_INDEX``
(-100) on the prompt and the ids on the answer and its end-of-turn. None when no answer token survives.

Batches are dicts of right-padded LongTensors ``input_ids``, ``attention_mask`` (1 on real tokens,
0 on padding) and ``labels`` (-100 on prompt and padding), each of shape [B, T] with T the longest
example of the batch; padding uses ``pad_id(tokenizer)`` (pad, else eos, else 0). Two builders:

- ``iter_batches`` / ``iter_encoded_batches``: evaluation batches, streamed in source order; an example
  whose prompt fills ``max_len`` (no answer token left) is skipped;
- ``calibration_batches``: a list of batches of whole examples (prompt and answer) cut to their first
  ``max_len`` tokens, none skipped for a long prompt, sorted by length (little padding). Compress,
  allocation, the ``spectrum`` command and the app's Grams all calibrate on these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from jinja2.exceptions import TemplateError

from .sources import Example
from .template import ChatTemplateError, render_error

IGNORE_INDEX = -100
CLIP_CHARS_PER_TOKEN = 8   # a text field is first cut to max_len * this (+ CLIP_SLACK) characters ...
CLIP_SLACK = 256
CLIP_MARGIN = 64           # ... and kept cut when that still gives max_len + this many tokens (else doubled)


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
        raise ChatTemplateError(f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # the sandbox's SecurityError, raise_exception(...), a syntax error
        raise render_error(tokenizer, e) from None


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


def clip_text(tokenizer, text: str, max_len: int) -> str:
    """``text`` cut before tokenisation so that memory per example stays bounded whatever its size: to
    ``max_len * CLIP_CHARS_PER_TOKEN + CLIP_SLACK`` characters, doubled while the cut text gives fewer than
    ``max_len + CLIP_MARGIN`` tokens; the whole text when it is not longer. A field cut this way alone
    fills the ``max_len`` window, so the first ``max_len`` tokens of an example are those of its uncut text:
    only the tokens of the word cut in two can differ, and they lie past the window unless that one word
    spans more than ``CLIP_MARGIN`` tokens."""
    limit = int(max_len) * CLIP_CHARS_PER_TOKEN + CLIP_SLACK
    while len(text) > limit:
        cut = text[:limit]
        if len(_ids(tokenizer, cut)) >= int(max_len) + CLIP_MARGIN:
            return cut
        limit *= 2
    return text


def clipped_example(tokenizer, example: Example, max_len: int) -> Example:
    """``example`` with each text field cut by :func:`clip_text` (the same object when nothing is cut)."""
    fields = [clip_text(tokenizer, text, max_len) for text in (example.system, example.user, example.answer)]
    if all(a is b for a, b in zip(fields, (example.system, example.user, example.answer))):
        return example
    return Example(*fields)


def encode_example(tokenizer, example: Example, max_len: int = 512,
                   end_of_turn: Optional[int] = None, whole: bool = False) -> Optional[Encoded]:
    """Prompt ids (chat template, generation prompt) + answer ids + end-of-turn id, cut to ``max_len``.

    Prompt ids are the rendered prompt tokenized alone; answer ids follow ``answer_ids`` (never a
    token spanning the boundary). Labels copy the answer and end-of-turn ids and are -100 on the
    prompt. Returns None when truncation leaves no answer token, unless ``whole`` (calibration: the first
    ``max_len`` tokens of prompt and answer, however long the prompt). ``end_of_turn`` defaults to
    ``end_of_turn_id(tokenizer)``. Text fields are cut before tokenisation (:func:`clipped_example`):
    a 5 MB record costs what a ``max_len`` one does.
    """
    if int(max_len) < 2:
        raise ValueError(f"max_len {max_len!r} must be >= 2")
    if end_of_turn is None:
        end_of_turn = end_of_turn_id(tokenizer)
    example = clipped_example(tokenizer, example, max_len)
    prompt_text = _render(tokenizer, prompt_messages(example), True)
    prompt = _ids(tokenizer, prompt_text)
    if len(prompt) >= max_len:
        if whole:
            return Encoded(input_ids=prompt[:max_len], labels=[IGNORE_INDEX] * max_len)
        return None
    answer = answer_ids(tokenizer, prompt_text, prompt, example.answer) + [int(end_of_turn)]
    answer = answer[: max_len - len(prompt)]
    return Encoded(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer)


def pad_id(tokenizer) -> int:
    """The id that pads batches: ``pad_token_id``, else ``eos_token_id``, else 0."""
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
                         limit: Optional[int] = None, stats: Optional[dict] = None,
                         sort_window: int = 1) -> Iterator[tuple]:
    """(batch dict, the batch's examples): ``iter_batches`` that also hands back the examples.

    Consumes ``examples`` lazily; stops after ``limit`` encoded examples (None = all). Examples whose
    answer does not survive truncation are skipped; ``stats["skipped"]`` counts them when given.
    ``sort_window`` > 1 buffers ``batch_size * sort_window`` encoded examples and batches them sorted by
    length (little padding; memory stays bounded); 1 keeps source order.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size {batch_size!r} must be >= 1")
    if int(sort_window) < 1:
        raise ValueError(f"sort_window {sort_window!r} must be >= 1")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    if limit is not None and limit <= 0:
        return
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    buffer, taken, capacity = [], 0, int(batch_size) * int(sort_window)

    def flush():
        if sort_window > 1:
            buffer.sort(key=lambda pair: len(pair[0].input_ids))
        for i in range(0, len(buffer), batch_size):
            chunk = buffer[i:i + batch_size]
            yield collate([e for e, _ in chunk], pad), [x for _, x in chunk]
        buffer.clear()

    for example in examples:
        enc = encode_example(tokenizer, example, max_len, end_of_turn=eot)
        if enc is None:
            stats["skipped"] += 1
            continue
        buffer.append((enc, example))
        taken += 1
        if len(buffer) == capacity:
            yield from flush()
        if limit is not None and taken >= limit:
            break
    yield from flush()


def iter_batches(tokenizer, examples: Iterable[Example], batch_size: int = 8, max_len: int = 512) -> Iterator[dict]:
    """Right-padded batches dict(input_ids, attention_mask, labels) of LongTensors [B, T], streamed.

    Padding uses ``pad_id(tokenizer)``; labels are -100 on prompt and padding tokens.
    """
    for batch, _ in iter_encoded_batches(tokenizer, examples, batch_size, max_len):
        yield batch


def calibration_batches(tokenizer, examples: Sequence, batch_size: int = 4, max_len: int = 512) -> list[dict]:
    """Right-padded batches of whole chat-formatted examples (prompt and answer) cut to their first
    ``max_len`` tokens — a long prompt is calibration data too —, sorted by length so that little padding
    is computed."""
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    encoded = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len, end_of_turn=eot, whole=True)
        if enc is not None:
            encoded.append(enc)
    encoded.sort(key=lambda e: len(e.input_ids))
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def batch_tokens(batches: list[dict]) -> int:
    """Real (non-padding) tokens of a list of batches."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def token_groups(order: Sequence[int], tokens: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Batch indices (in ``order``) grouped into steps of about ``batch_tokens`` real tokens each
    (``tokens[i]``: batch ``i``'s real tokens; every group holds at least one batch): the optimiser steps
    of refit and healing."""
    groups, cur, n = [], [], 0
    for i in order:
        cur.append(i)
        n += tokens[i]
        if n >= batch_tokens:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)
    return groups
