"""Chat templates checked before use: a template is code from a model folder, so it is rendered once on a
probe conversation in a separate process under a time, memory and output-size budget.

``check_chat_template(template, source)`` renders the probe (a user turn with the generation prompt, then
the user turn and an assistant answer) in a child Python (``-I``: no environment, no current folder on
its import path; the parent's path is passed) that compiles the template as transformers does (Jinja's ``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, loop controls, the ``generation`` tag, ``raise_exception``, ``strftime_now``,
``tojson``). The child is killed after :data:`RENDER_BUDGET_S` seconds, may use
:data:`MEMORY_LIMIT` bytes of address space, and the probe's output must stay under
:data:`MAX_PROBE_CHARS` characters. A template that runs out of any of these, trips the sandbox
(``SecurityError``) or fails to render is refused with one ``ChatTemplateError`` line naming the source
and the budget. Results are remembered per template text for the life of the process; the built-in
ChatML template is known to be good. ``render_error`` turns a Jinja error raised while rendering real
examples into the same one-line error.

This module imports nothing of the package.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from typing import Optional

RENDER_BUDGET_S = 10.0          # wall seconds for the child: interpreter start (~0.5 s) and both renders
MEMORY_LIMIT = 1 << 30          # address space of the child, bytes (1 GiB)
MAX_PROBE_CHARS = 100_000       # the probe renders a few words; a template printing more is refused
PROBE = [{"role": "user", "content": "What is one plus one?"}, {"role": "assistant", "content": "Two."}]
_checked: dict[tuple, Optional[str]] = {}  # (sha256 of a template, budget) -> None (good) or the refusal

# the child: read {"template", "probe", "max_chars"} on stdin, write {"ok": chars} or {"error": text} on stdout
_CHILD = r"""
import json, resource, sys
from datetime import datetime
limit = int(sys.argv[1])
try:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except (ValueError, OSError):
    pass
job = json.loads(sys.stdin.read())
sys.path[:] = job["path"]  # the parent's import path: the same jinja2, never the current folder
import jinja2, jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

class Generation(jinja2.ext.Extension):
    tags = {"generation"}
    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)
    def _body(self, caller):
        return caller()

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

try:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(job["template"])
    chars = 0
    for messages, prompt in ((job["probe"][:1], True), (job["probe"], False)):
        text = compiled.render(messages=messages, add_generation_prompt=prompt, bos_token="", eos_token="")
        chars = max(chars, len(text))
        if chars > job["max_chars"]:
            break
    print(json.dumps({"ok": chars}))
except MemoryError:
    print(json.dumps({"error": "memory"}))
except RecursionError:
    print(json.dumps({"error": "recursion: the template calls itself without end"}))
except Exception as e:
    first = (str(e).splitlines() or [""])[0][:200]
    print(json.dumps({"error": f"{type(e).__name__}: {first}"}))
"""


class ChatTemplateError(ValueError):
    """A chat template that cannot be used: too slow, too large, unsafe or failing; one line naming it."""


def budget_text() -> str:
    return (f"{RENDER_BUDGET_S:g} s, {MEMORY_LIMIT >> 20} MiB of memory and {MAX_PROBE_CHARS:,} characters of "
            "output for a two-message probe conversation")


def _refusal(source: str, why: str) -> str:
    return (f"the chat template of {source!r} {why}; refused (the budget: {budget_text()}). Fix or remove its "
            "chat_template (chat_template.jinja or tokenizer_config.json) to use the built-in ChatML template")


def _probe(template: str) -> Optional[str]:
    """Why ``template`` is refused (None when it renders the probe within the budget)."""
    path = [p for p in sys.path if p]  # '' (the current folder) is left out
    job = json.dumps({"template": template, "probe": PROBE, "max_chars": MAX_PROBE_CHARS, "path": path})
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(MEMORY_LIMIT)], input=job, capture_output=True,
                              text=True, timeout=RENDER_BUDGET_S)
    except subprocess.TimeoutExpired:
        return f"did not finish rendering a probe conversation within {RENDER_BUDGET_S:g} s"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return f"crashed the process rendering it (exit status {done.returncode}: {last})"
    if "error" in answer:
        if answer["error"] == "memory":
            return f"needed more than {MEMORY_LIMIT >> 20} MiB of memory to render a probe conversation"
        return f"cannot render a probe conversation ({answer['error']})"
    if answer["ok"] > MAX_PROBE_CHARS:
        return f"renders more than {MAX_PROBE_CHARS:,} characters for a probe conversation"
    return None


def check_chat_template(template: Optional[str], source: str, known: tuple = ()) -> None:
    """Raise ``ChatTemplateError`` unless ``template`` (None: nothing to check) renders the probe within the
    budget; ``known`` lists templates that are trusted without a probe (the built-in ChatML)."""
    if not template or template in known:
        return
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template of {source!r} is a {type(template).__name__}, not a template "
                                "text; only a single Jinja template is supported")
    key = (hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest(), RENDER_BUDGET_S, MEMORY_LIMIT,
           MAX_PROBE_CHARS)  # a verdict holds for the budget it was probed under
    if key not in _checked:
        _checked[key] = _probe(template)
    if _checked[key] is not None:
        raise ChatTemplateError(_refusal(source, _checked[key]))


def render_error(tokenizer, err: Exception) -> ChatTemplateError:
    """A Jinja error raised while rendering an example as one ``ChatTemplateError`` line."""
    first = (str(err).splitlines() or [""])[0][:200]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ChatTemplateError(f"the chat template of {name!r} failed to render an example ({type(err).__name__}: "
                             f"{first}); fix its chat_template or remove it to use the built-in ChatML template")
