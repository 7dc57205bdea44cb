"""Teacher and student answers side by side: greedy and seeded sampled generations on the same prompts.

Each prompt is rendered with the chat template and generation prompt (as evaluation renders it); both
models generate up to ``max_new_tokens`` tokens, stopping at the end-of-turn token. The first generated
position where the two token sequences differ is marked, so a reader sees where the student leaves
the teacher's answer. Sampling runs under a forked RNG seeded per prompt: the same seed gives the same
draws for both models and leaves the process's global RNG untouched.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .data import Example, clipped_example, end_of_turn_id, pad_id, prompt_messages
from .layerwise import model_device
from .progress import Progress, ensure_progress

MODES = ("greedy", "sampled")


PROMPT_TOKENS = 2048  # prompt fields are cut before tokenisation to about this many tokens each

@dataclass
class SideBySide:
    """One prompt answered by both models. ``diverge``: index (in generated tokens) of the first token that
    differs, None when both sequences are equal; ``common``: the decoded shared prefix."""

    key: str
    prompt: str
    mode: str
    teacher: str
    student: str
    teacher_tokens: int
    student_tokens: int
    diverge: Optional[int]
    common: str
    teacher_rest: str   # the teacher's text from the first diverging token on ("" when equal)
    student_rest: str

    def to_dict(self) -> dict:
        return asdict(self)


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first position where ``a`` and ``b`` differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, sample: bool, seed: int, eot: int,
              pad: int, temperature: float, top_p: float) -> list[int]:
    device = model_device(model)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad,
                  attention_mask=torch.ones_like(ids, device=device))
    if sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(ids.to(device), **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(eot) + 1] if eot in new else new


def side_by_side(teacher: nn.Module, student: nn.Module, tokenizer, examples: Sequence[Example], k: int = 4,
                 max_new_tokens: int = 64, modes: Sequence[str] = MODES, seed: int = 0, temperature: float = 0.7,
                 top_p: float = 0.9, progress: Optional[Progress] = None) -> list[SideBySide]:
    """Answers of both models to the first ``k`` prompts of ``examples``, once per mode (greedy, sampled)."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"generation modes {list(modes)!r}: allowed {', '.join(MODES)} (at least one)")
    if int(k) < 1 or int(max_new_tokens) < 1:
        raise ValueError(f"k {k!r} and max_new_tokens {max_new_tokens!r} must be >= 1")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature!r} must be > 0 and top_p {top_p!r} in (0, 1]")
    progress = ensure_progress(progress)
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    chosen = list(examples[: int(k)])
    out, total = [], len(chosen) * len(modes)
    for i, example in enumerate(chosen):
        prompt = clipped_example(tokenizer, example, PROMPT_TOKENS)  # a 5 MB record costs a bounded prompt
        text = tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        for mode in modes:
            pair = [_generate(m, ids, int(max_new_tokens), mode == "sampled", seed + i, eot, pad, temperature, top_p)
                    for m in (teacher, student)]
            at = first_difference(*pair)
            cut = len(pair[0]) if at is None else at
            decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
            out.append(SideBySide(
                key=example.key(), prompt=example.user, mode=mode, teacher=decode(pair[0]), student=decode(pair[1]),
                teacher_tokens=len(pair[0]), student_tokens=len(pair[1]), diverge=at, common=decode(pair[0][:cut]),
                teacher_rest=decode(pair[0][cut:]), student_rest=decode(pair[1][cut:])))
            progress(len(out), total, f"generating {mode} answers")
    return out
