"""``README.md`` of every export: a Hugging Face model card drawn from the complete manifest (``lowrank.json``),
and ``recipe.yaml``: the job's recipe, which ``python -m lowrank_core run recipe.yaml`` runs again.

:func:`model_card` is a pure function of the manifest; every key is read defensively (a manifest may lack
the job, the accounting, an evaluation or a verification).
"""
from __future__ import annotations

import re
import shlex
import statistics
import sys
from pathlib import Path, PurePath
from typing import Optional

import yaml

from .common import MODELING_FILE

CARD = "README.md"
RECIPE = "recipe.yaml"
CLI = "python -m lowrank_core"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = (".gguf", ".json", ".safetensors")


def invocation() -> Optional[str]:
    """The command line of this process when it is the CLI (``python -m lowrank_core ...``), else None."""
    if PurePath(sys.argv[0]).parts[-2:] != ("lowrank_core", "__main__.py"):
        return None
    return f"{CLI} {shlex.join(sys.argv[1:])}".rstrip()


def base_model_name(source) -> Optional[str]:
    """``source`` when it looks like a hub id or a plain name; a local path's folder name; None if unknown."""
    if not source:
        return None
    text = str(source).rstrip("/")
    looks_local = text.startswith((".", "/", "~")) or text.endswith(FILE_SUFFIXES) or "\\" in text
    if not looks_local and ("/" not in text or HUB_ID.match(text)):
        return text
    path = PurePath(text)
    return path.parent.name if path.suffix in FILE_SUFFIXES else path.name


def recipe_text(manifest: dict) -> Optional[str]:
    """The job's recipe as YAML (``manifest["job"]``, the ``JobSpec.to_dict`` form), None without a job."""
    job = manifest.get("job")
    if not isinstance(job, dict) or job.get("plan") is None:
        return None
    return yaml.safe_dump(job, sort_keys=False)


def write_card(folder: Path, manifest: dict) -> None:
    """Write ``README.md`` (the model card) and, when the manifest holds a job, ``recipe.yaml`` into ``folder``."""
    (Path(folder) / CARD).write_text(model_card(manifest))
    recipe = recipe_text(manifest)
    if recipe is not None:
        (Path(folder) / RECIPE).write_text(recipe)


def model_card(manifest: dict) -> str:
    """The Hugging Face model card (front matter + Markdown) of the export described by ``manifest``."""
    m = manifest
    parts = [_front_matter(m), _summary(m), _how_to_load(m), _plan(m), _parameters(m), _ranks(m),
             _evaluation(m), _verification(m), _healing(m), _reproduce(m)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ----------------------------------------------------------------------------- small helpers
def _get(m: dict, *keys):
    """``m[k1][k2]...`` or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(m, dict):
            return None
        m = m.get(key)
    return m


def _num(value, fmt: str = ",", unit: str = "") -> str:
    """``value`` formatted by ``fmt`` (and ``unit``), or ``n/a`` when it is missing."""
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header)] + [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _methods(m: dict) -> list[str]:
    """The job's method and any other method a plan rule names, in order, once each."""
    names = [_get(m, "method", "name")] + [r.get("method") for r in _get(m, "plan", "rules") or []]
    return list(dict.fromkeys(n for n in names if n))


# ----------------------------------------------------------------------------- sections
def _front_matter(m: dict) -> str:
    meta = {"base_model": base_model_name(_get(m, "source", "model")), "library_name": "transformers",
            "tags": ["lowrank", "low-rank", "svd", "compression"] + [n for n in _methods(m) if n != "svd"],
            "pipeline_tag": "text-generation"}
    meta = {k: v for k, v in meta.items() if v is not None}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _summary(m: dict) -> str:
    base = _get(m, "source", "model") or "a causal language model"
    acc, params, fmt = m.get("accounting") or {}, m.get("parameters") or {}, m.get("format")
    methods = ", ".join(f"`{n}`" for n in _methods(m)) or "an unrecorded method"
    size = (f"Parameters {acc['original']:,} → {acc['compressed']:,} ({acc['compressed'] / acc['original']:.1%} "
            "kept)." if acc.get("original") and acc.get("compressed") is not None
            else f"The compressed model has {_num(params.get('student'))} parameters.")
    form = {"dense": "This is the **dense** export: every pair of factors is multiplied back into one full "
                     "matrix, so it loads with plain transformers and has the base model's shapes and size.",
            "factorized": "This is the **factorized** export: every replaced matrix is stored as its two "
                          f"factors, {_num(params.get('stored'))} parameters in all, so it is smaller on disk "
                          "and in memory."}.get(fmt, "")
    tool = " ".join(filter(None, ["`lowrank`", _get(m, "tool", "version")]))
    return (f"# {base}, low-rank compressed\n\n{base} with linear layers replaced by low-rank factorisations "
            f"({tool}, method {methods}). {size} {form + ' ' if form else ''}"
            "Compression changes the model's outputs: the base model's license and limitations apply, and "
            "it should be evaluated on your own task before use.")


def _how_to_load(m: dict) -> str:
    if m.get("format") == "factorized":
        return ("## How to load\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                'path = "path/to/this/folder"\n'
                "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
                "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # no custom code\n```\n\n"
                f"For the model, `trust_remote_code=True` runs one file only: the bundled `{MODELING_FILE}` (torch and "
                "transformers, nothing else), which subclasses the base architecture's transformers classes "
                "and builds each matrix listed in `config.json` (`lowrank_ranks`) as two linears, "
                "`down [r × in]` then `up [out × r]` (a fused linear listed in `lowrank_slices`, as Phi-3's "
                "`qkv_proj`, as its row parts, outputs concatenated). Read it before loading; when loading from "
                "the Hub, pin "
                "`revision=` to a commit you have read. With `lowrank_core` installed no remote code runs at "
                "all: `from lowrank_core.export import load_factorized; model = load_factorized(path).model`.")
    return ("## How to load\n\nPlain transformers, no custom code:\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'path = "path/to/this/folder"\nmodel = AutoModelForCausalLM.from_pretrained(path)\n'
            "tokenizer = AutoTokenizer.from_pretrained(path)\n```")


def _plan(m: dict) -> str:
    rules = _get(m, "plan", "rules")
    if not rules:
        return "## Plan\n\nNot recorded."
    default = _get(m, "method", "name") or "n/a"
    rows = [[r.get("layers"), ", ".join(r.get("modules") or []), _rule_size(r), r.get("method") or default]
            for r in rules]
    return ("## Plan\n\nRules applied in order (a later rule overrides an earlier one on the same matrix):\n\n"
            + _table(["layers", "modules", "size", "method"], rows))


def _rule_size(rule: dict) -> str:
    if rule.get("dense"):
        return "dense (kept)"
    return f"rank {rule['rank']}" if rule.get("rank") is not None else f"keep {rule.get('keep')} of the energy"


def _parameters(m: dict) -> str:
    acc, params = m.get("accounting") or {}, m.get("parameters") or {}
    rows = [["base model", _num(acc.get("original"))], ["compressed model", _num(params.get("student"))],
            [" ".join(filter(None, ["stored in this", m.get("format"), "export"])), _num(params.get("stored"))],
            ["removed", _num(acc.get("removed"))], ["kept", _num(acc.get("ratio"), ".2%")]]
    warnings = "".join(f"\n- warning: {w}" for w in acc.get("warnings") or [])
    return "## Parameters\n\n" + _table(["", "parameters"], rows) + ("\n" + warnings if warnings else "")


def _ranks(m: dict) -> str:
    ranks = m.get("ranks") or {}
    if not ranks:
        return "## Ranks\n\nNo matrix is factorised."
    groups: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(rank)
    rows = [[f"`{g}`", len(v), min(v), f"{statistics.median(v):g}", max(v)] for g, v in groups.items()]
    every = list(ranks.values())
    return (f"## Ranks\n\n{len(every)} factorised matrices; rank min {min(every)}, median "
            f"{statistics.median(every):g}, max {max(every)}.\n\n"
            + _table(["matrices", "count", "min", "median", "max"], rows))


def _evaluation(m: dict) -> str:
    c = m.get("comparison")
    if isinstance(c, dict):
        body = _comparison(c)
    elif isinstance(_get(m, "metrics", "teacher"), dict) and isinstance(_get(m, "metrics", "student"), dict):
        body = _means(m["metrics"]["teacher"], m["metrics"]["student"])
    else:
        return "## Evaluation\n\nNot evaluated."
    return "## Evaluation\n\n" + body + _data_line(m)


def _loss_table(teacher: dict, student: dict) -> str:
    rows = [[name, _num(r.get("loss"), ".4f"), _num(r.get("perplexity"), ".3f")]
            for name, r in (("teacher (base model)", teacher), ("student (this model)", student))]
    return _table(["model", "answer loss (nats/token)", "perplexity"], rows)


def _comparison(c: dict) -> str:
    """Teacher and student scored on the same examples, with the paired difference and its verdict."""
    table = _loss_table({"loss": c.get("teacher_loss"), "perplexity": c.get("teacher_perplexity")},
                        {"loss": c.get("student_loss"), "perplexity": c.get("student_perplexity")})
    level = _num(c.get("ci_level", 0.95), ".0%")
    ci = c.get("delta_ci", [None, None])  # None: not shown at this N (its coverage fails there)
    interval = (f"{level} interval [{_num((list(ci) + [None, None])[0], '+.4f')}, "
                f"{_num((list(ci) + [None, None])[1], '+.4f')}], p = {_num(c.get('p_value'), '.3g')}"
                if ci is not None else f"no interval ({c.get('interval_note') or 'too few examples'})")
    lines = [f"Paired comparison on {_num(c.get('examples'))} held-out examples ({_num(c.get('skipped', 0))} "
             f"skipped), {_num(c.get('tokens'))} answer tokens:", "", table, "",
             f"- Δloss (student − teacher): {_num(c.get('delta'), '+.4f')} nats/token, {interval}",
             f"- equivalence margin: ±{_num(c.get('margin'), '.4f')} nats/token"
             + (f" (given as {c['margin_arg']})" if c.get("margin_arg") else ""),
             f"- verdict: **{c.get('verdict') or 'n/a'}**"]
    if c.get("procedure"):
        seq = c.get("sequential") or {}
        when = (f"decided after {_num(c.get('stopping_n'))} examples" if c.get("decided") and seq
                else f"undecided at the maximum of {_num(seq.get('max_n'))} examples" if seq
                else f"fixed N = {_num(c.get('examples'))}")
        lines.append(f"- procedure: {c['procedure']}; {when}")
    if c.get("more_examples"):
        lines.append(f"- about {c['more_examples']:,} more examples would be needed to settle it")
    lines.append(f"- mean KL(teacher ‖ student): {_num(c.get('kl'), '.4f')} nats/token; top-1 agreement "
                 f"{_num(c.get('top1_agreement'), '.1%')}")
    if c.get("verdict_text"):
        lines += ["", f"> {c['verdict_text']}"]
    return "\n".join(lines)


def _means(teacher: dict, student: dict) -> str:
    """Two mean losses on the same examples, without a paired comparison."""
    delta = (f"{student['loss'] - teacher['loss']:+.4f}" if teacher.get("loss") is not None
             and student.get("loss") is not None else "n/a")
    return (f"Mean answer loss on {_num(teacher.get('examples'))} held-out examples ({_num(teacher.get('skipped', 0))} "
            f"skipped), {_num(teacher.get('tokens'))} answer tokens:\n\n{_loss_table(teacher, student)}\n\n"
            f"Loss change (student − teacher): {delta} nats/token. No paired comparison was run: there is no "
            "interval or equivalence verdict for this difference.")


def _data_line(m: dict) -> str:
    split = m.get("split") or {}
    if not split.get("source"):
        return ""
    counts = split.get("counts") or {}
    return (f"\n\nData: the split of `{split['source']}` (seed {_num(split.get('seed'))}, fingerprint "
            f"`{split.get('fingerprint')}`): {_num(counts.get('calib'))} calibration and {_num(counts.get('eval'))} "
            "evaluation examples; evaluation examples are never used for calibration or healing.")


def _verification(m: dict) -> str:
    v = m.get("verification")
    if not isinstance(v, dict):
        return "## Verification\n\nNot verified: the export was not reloaded after writing."
    text = (f"## Verification\n\nReloaded after writing and compared with the in-memory student on probe "
            f"prompts: max |logit difference| {_num(v.get('max_logit_diff'), '.3g')} (tolerance "
            f"{_num(v.get('tolerance'), '.3g')}).")
    if v.get("reload_loss") is not None:
        text += (f" Answer loss after reload {v['reload_loss']:.4f} (in-memory student "
                 f"{_num(v.get('student_loss'), '.4f')} on the same examples).")
    return text


def _healing(m: dict) -> str:
    h = m.get("heal")
    if not isinstance(h, dict):
        return ""
    return (f"## Healing\n\nAfter compression the student's own tensors were trained against the teacher "
            f"(loss `{_get(h, 'settings', 'loss') or 'n/a'}`): {_num(h.get('tokens'))} tokens, "
            f"{_num(h.get('steps'))} steps, {_num(h.get('trained_parameters'))} trained parameters. Validation "
            f"loss {_num(h.get('initial_valid'), '.4f')} → {_num(h.get('best_valid'), '.4f')} (best at step "
            f"{_num(h.get('best_step'))}, on {_num(h.get('valid_examples'))} calibration-side examples).")


def _reproduce(m: dict) -> str:
    text = "## Reproduce\n\n"
    if m.get("command"):
        text += f"The command that wrote this export:\n\n```bash\n{m['command']}\n```\n\n"
    recipe = recipe_text(m)
    if recipe is None:
        return text + "No recipe was recorded for this export."
    target = _get(m, "job", "export", "dir")
    where = f" (it writes to `{target}`; add `--export-dir NEW_FOLDER` to write elsewhere)" if target else ""
    return (text + f"The job's recipe, also saved as `{RECIPE}` in this folder:\n\n```yaml\n{recipe}```\n\n"
            f"`{CLI} run {RECIPE}` reproduces the job{where}. The base model and the data sources it names "
            "must be available.")
