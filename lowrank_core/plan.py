"""Compression plans: which matrices get which rank, and the exact parameter accounting.

A plan is an ordered list of rules; later rules override earlier ones for the same matrix. File form
(YAML or JSON)::

    rules:
      - {layers: "6-31", modules: [attn], rank: 16}
      - {layers: "0-6", modules: [mlp], rank: 16}      # inclusive range: 7 layers
      - {layers: all, modules: [q_proj, o_proj], keep: 0.8, method: whitened}
      - {modules: [lm_head], rank: 16}
      - {layers: "3", modules: [v_proj], dense: true}  # leave dense
      - {layers: "5", modules: [experts, experts.2.down_proj], rank: 8}   # MoE: every expert / one expert's

Compact CLI form: rules separated by ``;``, fields by ``:`` -- ``[layers:]modules:spec[:method]`` where
modules are comma-separated and spec is ``r16`` (rank), ``k0.8`` (keep fraction) or ``dense``, e.g.
``"6-31:attn:r16; 0-6:mlp:r16; lm_head:r16"``.

``keep`` maps to ``rank = floor(keep * out * in / (out + in))``: the fraction of the matrix's
parameters that the factors keep.

Fused linears (Phi-3's ``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]): the fused name and the groups
factorise the whole matrix; ``q_proj`` ... ``up_proj`` name its row parts, each with its own rank (a part no
rule names stays dense). A fused matrix goes whole or by parts: the later rule decides (:func:`resolve_plan`).

Rank rounding (``rank_multiple``, one of 1, 8, 16, 32, 64, 128; 1 = off): every resolved rank, from a
``keep`` *and* from an explicit ``rank`` (so plans written by ``search``, which are all explicit ranks, can be
aligned too), is rounded DOWN to a multiple, at least the multiple, never above ``min(out, in)``
(:func:`round_rank`: a matrix narrower than the multiple keeps its rank). Matmul kernels run aligned ranks
faster. File form: a top-level ``rank_multiple: 64`` next to ``rules``; compact form: a ``rank_multiple=64``
chunk, e.g. ``"all:k0.8; rank_multiple=64"``; CLI: ``--rank-multiple 64`` (:class:`PlanOptions`), which
overrides the plan's own. Ranks are validated (at least 1, at most ``min(out, in)``) before rounding.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from . import methods
from .arch import EXPERTS_GROUP, all_head_modules
from .linears import ALL_MODULES, GROUPS, LinearInfo, count_parameters, linear_map, meta_model
from .options import option

RULE_KEYS = {"layers", "modules", "rank", "keep", "method", "dense"}
RANK_MULTIPLES = (1, 8, 16, 32, 64, 128)   # allowed rank roundings (1 = none)


class PlanError(ValueError):
    """A plan that cannot be applied; the message names the offending rule."""


def check_rank_multiple(multiple) -> int:
    """``multiple`` if it is one of :data:`RANK_MULTIPLES`, else ``ValueError`` naming it and what is allowed."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple not in RANK_MULTIPLES:
        raise ValueError(f"rank multiple {multiple!r} is not allowed; use one of "
                         f"{', '.join(map(str, RANK_MULTIPLES))} (1 = no rounding)")
    return multiple


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """``rank`` rounded DOWN to a multiple of ``multiple``, at least ``multiple``, never above ``limit``.

    ``limit`` is the matrix's ``min(out, in)``. ``multiple`` must be in :data:`RANK_MULTIPLES` (1 returns
    ``min(rank, limit)``). A rank below ``multiple`` is rounded UP to ``multiple``: this may exceed the
    parameter break-even rank (the plan's accounting then warns, as for any rank above break-even). When
    ``rank`` is above ``limit`` it is first clamped to ``limit``; when even ``multiple`` exceeds ``limit`` (a
    matrix narrower than the multiple) no aligned rank exists and ``min(rank, limit)`` is returned unrounded.
    """
    check_rank_multiple(multiple)
    for label, v in (("rank", rank), ("limit", limit)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label}={v!r} is not allowed; it must be a positive integer")
    rank = min(rank, limit)
    if multiple == 1 or multiple > limit:
        return rank
    return max(multiple, rank // multiple * multiple)


@dataclass
class Rule:
    modules: list[str]
    layers: str = "all"
    rank: Optional[int] = None
    keep: Optional[float] = None
    method: Optional[str] = None
    dense: bool = False

    def describe(self) -> str:
        spec = "dense" if self.dense else (f"rank {self.rank}" if self.rank is not None else f"keep {self.keep}")
        meth = f" ({self.method})" if self.method else ""
        return f"layers {self.layers}, modules {','.join(self.modules)}, {spec}{meth}"

    def to_dict(self) -> dict:
        d: dict = {"layers": self.layers, "modules": list(self.modules)}
        if self.dense:
            d["dense"] = True
        elif self.rank is not None:
            d["rank"] = self.rank
        else:
            d["keep"] = self.keep
        if self.method:
            d["method"] = self.method
        return d


@dataclass
class Plan:
    """Ordered rules and the rank rounding applied to every resolved rank (``rank_multiple``, 1 = off)."""

    rules: list[Rule] = field(default_factory=list)
    rank_multiple: int = 1

    def __post_init__(self):
        try:
            check_rank_multiple(self.rank_multiple)
        except ValueError as e:
            raise PlanError(f"plan rank_multiple: {e}") from None

    def to_dict(self) -> dict:
        """``{"rules": [...]}`` plus ``rank_multiple`` when rounding is on (plans without it are unchanged)."""
        d: dict = {"rules": [r.to_dict() for r in self.rules]}
        if self.rank_multiple != 1:
            d["rank_multiple"] = self.rank_multiple
        return d

    def describe(self) -> str:
        """The rules on one line, and the rounding when it is on."""
        text = "; ".join(r.describe() for r in self.rules)
        return text + (f"; ranks rounded to multiples of {self.rank_multiple}" if self.rank_multiple != 1 else "")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)


def _rule_error(index: int, rule, message: str) -> PlanError:
    desc = rule.describe() if isinstance(rule, Rule) else repr(rule)
    return PlanError(f"plan rule {index + 1} ({desc}): {message}")


def _as_module_list(value, index: int, d: dict) -> list[str]:
    """Module names from a string (comma/space separated) or a list of strings."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"plan rule {index + 1} ({d!r}): modules must be a name, a comma list or a list of names "
                        f"(e.g. [q_proj, mlp]), got {value!r} ({type(value).__name__})")
    return [v.strip() for v in value]


def _typed(d: dict, index: int) -> None:
    """Every present key has its type: a string is never a boolean, a boolean never a number."""
    def bad(key: str, wanted: str) -> PlanError:
        value = d[key]
        return PlanError(f"plan rule {index + 1} ({d!r}): {key} must be {wanted}, got {value!r} "
                         f"({type(value).__name__})")

    if "dense" in d and not isinstance(d["dense"], bool):
        raise bad("dense", "a boolean (true or false, unquoted)")
    if d.get("rank") is not None and (isinstance(d["rank"], bool) or not isinstance(d["rank"], int)):
        raise bad("rank", "an integer")
    if d.get("keep") is not None and (isinstance(d["keep"], bool) or not isinstance(d["keep"], (int, float))):
        raise bad("keep", "a number in (0, 1]")
    if "layers" in d and (isinstance(d["layers"], bool) or not isinstance(d["layers"], (str, int))):
        raise bad("layers", "'all', a layer number or a range such as '6-31' or '0-3,8'")
    if d.get("method") is not None and not isinstance(d["method"], str):
        raise bad("method", f"a method name ({', '.join(methods.names())})")


def rule_from_dict(d: dict, index: int = 0) -> Rule:
    if not isinstance(d, dict):
        raise PlanError(f"plan rule {index + 1}: expected a mapping, got {d!r}")
    unknown = set(d) - RULE_KEYS
    if unknown:
        raise PlanError(f"plan rule {index + 1}: unknown key(s) {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
    if "modules" not in d:
        raise PlanError(f"plan rule {index + 1} ({d!r}): 'modules' is required")
    _typed(d, index)
    given = [k for k in ("rank", "keep") if d.get(k) is not None] + (["dense"] if d.get("dense") else [])
    if len(given) != 1:
        raise PlanError(f"plan rule {index + 1} ({d!r}): give exactly one of rank, keep or dense: true")
    rule = Rule(modules=_as_module_list(d["modules"], index, d), layers=str(d.get("layers", "all")).strip(),
                method=d.get("method"), dense=d.get("dense", False))
    if "rank" in given:
        rule.rank = d["rank"]
    elif "keep" in given:
        rule.keep = float(d["keep"])
    validate_rule(rule, index)
    return rule


def validate_rule(rule: Rule, index: int) -> None:
    """Checks that need no model: value ranges, module names, method names, layer syntax."""
    if rule.rank is not None and rule.rank < 1:
        raise _rule_error(index, rule, f"rank {rule.rank} is below 1")
    if rule.keep is not None and not (0.0 < rule.keep <= 1.0):
        raise _rule_error(index, rule, f"keep {rule.keep} is outside (0, 1]")
    if rule.method is not None and rule.method not in methods.names():
        raise _rule_error(index, rule, f"unknown method {rule.method!r}; allowed: {', '.join(methods.names())}")
    if not rule.modules:
        raise _rule_error(index, rule, "no modules named")
    allowed = set(GROUPS) | set(ALL_MODULES)
    for m in rule.modules:
        if m not in allowed and expert_module(m) is None:
            raise _rule_error(index, rule, f"unknown module {m!r}; allowed: groups {', '.join(GROUPS)}, "
                                           f"{', '.join(ALL_MODULES)}, or one expert's: experts.<e> or "
                                           f"experts.<e>.<{'|'.join(GROUPS[EXPERTS_GROUP])}>")
    parse_layers(rule.layers, None, rule, index)


_EXPERT_MODULE = re.compile(r"^experts\.(\d+)(?:\.(\w+))?$")


def expert_module(name: str) -> Optional[tuple[int, Optional[str]]]:
    """``experts.5`` -> (5, None), ``experts.5.down_proj`` -> (5, "down_proj"): one expert's linears in a
    plan rule; None for any other name."""
    m = _EXPERT_MODULE.match(str(name))
    if m is None or (m.group(2) is not None and m.group(2) not in GROUPS[EXPERTS_GROUP]):
        return None
    return int(m.group(1)), m.group(2)


def expert_rule_name(info: LinearInfo) -> str:
    """The plan name of one expert's linear: ``experts.5.down_proj``."""
    return f"{EXPERTS_GROUP}.{info.expert}.{info.module}"


def parse_layers(spec: str, n_layers: Optional[int], rule: Optional[Rule] = None, index: int = 0) -> Optional[list[int]]:
    """``"all"`` -> every layer; ``"6-31"`` (inclusive), ``"17"``, ``"0-3,8"``. None if n_layers unknown and 'all'."""
    spec = str(spec).strip().lower()
    if spec in ("all", "*", ""):
        return None if n_layers is None else list(range(n_layers))
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise _rule_error(index, rule or spec, f"bad layers {spec!r}; use 'all', 'N', 'A-B' or a comma list")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise _rule_error(index, rule or spec, f"bad layer range {part.strip()!r}: end before start")
        if n_layers is not None and hi >= n_layers:
            raise _rule_error(index, rule or spec, f"unknown layer {hi}: the model has layers 0-{n_layers - 1}")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


_LAYER_RE = re.compile(r"^(all|\*|\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*)$", re.I)
_SPEC_RE = re.compile(r"^(dense|r\d+|rank[=:]?\d+|k[\d.]+|keep[=:]?[\d.]+|[\d.]+)$", re.I)


def _parse_spec(spec: str, index: int, text: str) -> dict:
    s = spec.strip().lower()
    try:
        if s == "dense":
            return {"dense": True}
        if s.startswith("rank"):
            return {"rank": int(s[4:].lstrip("=:"))}
        if s.startswith("r"):
            return {"rank": int(s[1:])}
        if s.startswith("keep"):
            return {"keep": float(s[4:].lstrip("=:"))}
        if s.startswith("k"):
            return {"keep": float(s[1:])}
        if re.fullmatch(r"\d+", s):
            return {"rank": int(s)}
        return {"keep": float(s)}
    except ValueError:
        raise PlanError(f"plan rule {index + 1} ({text!r}): bad rank/keep {spec!r}; "
                        "use r16 (rank), k0.8 (keep fraction) or dense") from None


_MULTIPLE_RE = re.compile(r"^rank[_-]?multiple\s*[=:]\s*(.*)$", re.I)


def _parse_multiple(value: str, chunk: str) -> int:
    try:
        return check_rank_multiple(int(value.strip()))
    except ValueError:
        raise PlanError(f"plan {chunk!r}: rank multiple {value.strip()!r} is not allowed; use one of "
                        f"{', '.join(map(str, RANK_MULTIPLES))} (1 = no rounding)") from None


def parse_plan_string(text: str) -> Plan:
    """Parse the compact form ``[layers:]modules:spec[:method]; ...`` (a ``rank_multiple=N`` chunk sets the
    rank rounding)."""
    rules, multiple = [], 1
    for chunk in (c.strip() for c in text.split(";") if c.strip()):
        m = _MULTIPLE_RE.match(chunk)
        if m:
            multiple = _parse_multiple(m.group(1), chunk)
            continue
        index = len(rules)
        parts = [p.strip() for p in chunk.split(":")]
        if len(parts) == 2:
            layers, modules, spec, method = "all", parts[0], parts[1], None
        elif len(parts) == 3 and _LAYER_RE.match(parts[0]) and not _SPEC_RE.match(parts[1]):
            layers, modules, spec, method = parts[0], parts[1], parts[2], None
        elif len(parts) == 3:
            layers, modules, spec, method = "all", parts[0], parts[1], parts[2]
        elif len(parts) == 4:
            layers, modules, spec, method = parts
        else:
            raise PlanError(f"plan rule {index + 1} ({chunk!r}): expected [layers:]modules:spec[:method], "
                            "e.g. '6-31:attn:r16' or 'lm_head:r16'")
        d = {"layers": layers, "modules": modules.split(","), **_parse_spec(spec, index, chunk)}
        if method:
            d["method"] = method
        rules.append(rule_from_dict(d, index))
    if not rules:
        raise PlanError(f"empty plan string {text!r}")
    return Plan(rules, rank_multiple=multiple)


def plan_from_dict(data) -> Plan:
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict) or "rules" not in data:
        raise PlanError("a plan file must hold a mapping with a 'rules' list")
    rules = data["rules"]
    if not isinstance(rules, list) or not rules:
        raise PlanError("'rules' must be a non-empty list")
    multiple = data.get("rank_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int):
        raise PlanError(f"plan rank_multiple must be an integer, one of {', '.join(map(str, RANK_MULTIPLES))} "
                        f"(1 = no rounding), got {multiple!r} ({type(multiple).__name__})")
    return Plan([rule_from_dict(r, i) for i, r in enumerate(rules)], rank_multiple=multiple)


def plan_from_rows(rows: Sequence[dict], rank_multiple: int = 1) -> Plan:
    """A plan from table rows (``layers``, ``modules``, ``rank``, ``keep``, ``dense``, ``method``; e.g. the
    app's rule editor) and the rank rounding. Rows without modules are skipped; blank numbers (None/NaN)
    count as absent; ``PlanError`` names the bad rule."""
    rules = []
    for row in rows:
        if not str(row.get("modules") or "").strip():
            continue
        d: dict = {"layers": str(row.get("layers") or "all"), "modules": str(row["modules"])}
        rank, keep = _number(row.get("rank")), _number(row.get("keep"))
        if bool(row.get("dense")):
            d["dense"] = True
        elif rank is not None:
            if float(rank) != int(rank):
                raise PlanError(f"plan rule {len(rules) + 1}: rank must be an integer, got {rank!r}")
            d["rank"] = int(rank)
        elif keep is not None:
            d["keep"] = float(keep)
        if row.get("method"):
            d["method"] = row["method"]
        rules.append(d)
    return plan_from_dict({"rules": rules, "rank_multiple": rank_multiple})


def rows_from_plan(plan: Plan) -> list[dict]:
    """The inverse of :func:`plan_from_rows`: one row per rule."""
    return [{"layers": r.layers, "modules": ",".join(r.modules), "rank": r.rank, "keep": r.keep,
             "dense": r.dense, "method": r.method or ""} for r in plan.rules]


def _number(value) -> Optional[float]:
    """None for None/NaN/"" (a blank table cell), else the value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return None if math.isnan(float(value)) else value
    except (TypeError, ValueError):  # pandas' NA and other blanks
        return None


def load_plan(source: Union[str, Path, Plan, dict]) -> Plan:
    """A plan from a Plan, a dict, a ``.yaml``/``.yml``/``.json`` file, YAML or JSON text of a mapping
    (``rules: ...``, as :meth:`Plan.to_yaml` writes it), or the compact string form."""
    if isinstance(source, Plan):
        return source
    if isinstance(source, (dict, list)):
        return plan_from_dict(source)
    text = str(source)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise PlanError(f"plan file {text!r} not found")
        raw = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PlanError(f"plan file {text!r} is not valid JSON: {e}") from None
            return plan_from_dict(data)
        return _plan_from_yaml(raw, f"plan file {text!r}")
    if text.lstrip().startswith(("rules", "{")) or re.match(r"\s*rank_multiple\s*:[^;]*\n", text):
        # a mapping's text: never a compact rule
        return _plan_from_yaml(text, "plan text")
    return parse_plan_string(text)


def _plan_from_yaml(raw: str, what: str) -> Plan:
    """``plan_from_dict`` of YAML text (JSON text is YAML too)."""
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise PlanError(f"{what} is not valid YAML: {e}") from None
    return plan_from_dict(data)


def check_replaces_something(plan: Plan, replaced: Optional[Sequence] = None) -> None:
    """``PlanError`` when ``plan`` replaces no matrix: every rule is ``dense``, or (``replaced``: the matrices
    it resolves to on a model, e.g. ``resolve_plan``'s keys) its rules select nothing to factorise."""
    if all(rule.dense for rule in plan.rules) or (replaced is not None and not len(replaced)):
        rules = "; ".join(rule.describe() for rule in plan.rules)
        raise PlanError(f"the plan ({rules}) replaces no matrix, so there is nothing to compress; give a rule a rank "
                        "or keep fraction, e.g. 'mlp:k0.5' or {modules: [mlp], rank: 16}")


@dataclass(frozen=True)
class Assignment:
    """The rank (and method) chosen for one matrix."""

    info: LinearInfo
    rank: int
    method: Optional[str]
    rule_index: int
    planned_rank: Optional[int] = None  # the rule's rank before the plan's rank rounding (None: not rounded)

    @property
    def above_break_even(self) -> bool:
        return self.rank > self.info.break_even_rank

    @property
    def params_after(self) -> int:
        return self.info.factor_params(self.rank)


def rank_for_keep(info: LinearInfo, keep: float) -> int:
    return math.floor(keep * info.out_features * info.in_features / (info.out_features + info.in_features))


def _rule_targets(rule: Rule, linears: Sequence[LinearInfo], n_layers: int, index: int) -> list[LinearInfo]:
    """The matrices a rule names: a group names whole linears (a fused one as a whole), a module name also
    a part of a fused linear (``k_proj`` in Phi-3's ``qkv_proj``)."""
    names: set[str] = set()
    grouped: set[str] = set()
    for m in rule.modules:
        if m != EXPERTS_GROUP:  # "experts": the experts' linears only (their short names are the MLP's)
            (grouped if m in GROUPS else names).update(GROUPS.get(m, (m,)))
    experts = EXPERTS_GROUP in rule.modules
    one = [e for e in (expert_module(m) for m in rule.modules) if e is not None]   # (expert, short or None)
    layers = set(parse_layers(rule.layers, n_layers, rule, index))
    out = [li for li in linears
           if (li.module in names or (li.module in grouped and not li.rows) or (experts and li.group == EXPERTS_GROUP)
               or any(li.expert == e and short in (None, li.module) for e, short in one))
           and (li.layer is None or li.layer in layers)]
    for head in (h for h in all_head_modules() if h in names):   # the table's head names (lm_head)
        if not any(li.group == "head" and li.module == head for li in linears):
            raise _rule_error(index, rule, f"unknown module {head!r}: this model has no separate {head} linear")
    return out


def resolve_plan(plan: Plan, linears: Sequence[LinearInfo], default_method: Optional[str] = None) -> dict[str, Assignment]:
    """Map matrix name -> Assignment. Later rules override earlier ones; ``dense`` rules remove.

    A fused linear (``linears`` from ``linear_map(..., parts=True)``) is factorised whole or by parts,
    never both: a rule on the whole drops earlier assignments of its parts and a rule on a part (also
    ``dense``) drops the whole's (its other parts then stay dense unless named).

    Raises PlanError naming the rule for a rank above min(out, in), a rank below 1 (also from a small
    ``keep``), an unknown layer or module. Then every rank is rounded by ``plan.rank_multiple``
    (:func:`round_rank`; the rule's own rank is kept as ``Assignment.planned_rank``).
    """
    n_layers = 1 + max(li.layer for li in linears if li.layer is not None)
    chosen: dict[str, Assignment] = {}
    for index, rule in enumerate(plan.rules):
        validate_rule(rule, index)
        for li in _rule_targets(rule, linears, n_layers, index):
            for other in [n for n, a in chosen.items() if n == li.fused or (a.info.fused and a.info.fused == li.name)]:
                chosen.pop(other)
            if rule.dense:
                chosen.pop(li.name, None)
                continue
            rank = rule.rank if rule.rank is not None else rank_for_keep(li, rule.keep)
            if rank < 1:
                raise _rule_error(index, rule, f"gives rank {rank} for {li.name} ({li.out_features} x "
                                               f"{li.in_features}); ranks must be at least 1")
            if rank > li.max_rank:
                raise _rule_error(index, rule, f"rank {rank} exceeds min(out, in) = {li.max_rank} for {li.name} "
                                               f"({li.out_features} x {li.in_features})")
            rounded = round_rank(rank, plan.rank_multiple, li.max_rank)
            chosen[li.name] = Assignment(li, rounded, rule.method or default_method, index,
                                         planned_rank=rank if plan.rank_multiple != 1 else None)
    order = {li.name: i for i, li in enumerate(linears)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


@dataclass
class Accounting:
    """Parameter totals for a plan. ``rows`` has one dict per replaced matrix (pandas-friendly)."""

    original: int
    compressed: int
    rows: list[dict]
    warnings: list[str]

    @property
    def removed(self) -> int:
        return self.original - self.compressed

    @property
    def ratio(self) -> float:
        return self.compressed / self.original

    def to_dict(self) -> dict:
        return {"original": self.original, "compressed": self.compressed, "removed": self.removed,
                "ratio": self.ratio, "matrices": self.rows, "warnings": self.warnings}


def account(model_or_config, plan: Union[Plan, str, dict], default_method: Optional[str] = None) -> Accounting:
    """Exact parameter totals before/after applying ``plan``; a config is instantiated on the meta device.

    A rank-r replacement of an ``out x in`` weight costs ``r*(in+out)``; biases, embeddings and norms are
    kept. A tied lm_head frees nothing (the embedding stays), so factorising it adds parameters.
    """
    plan = load_plan(plan)
    model = model_or_config if hasattr(model_or_config, "named_modules") else meta_model(model_or_config)
    linears = linear_map(model, parts=True)
    original = count_parameters(model)
    assignments = resolve_plan(plan, linears, default_method)
    compressed, rows, warnings = original, [], []
    for name, a in assignments.items():
        li = a.info
        freed = 0 if li.tied else li.params
        compressed += a.params_after - freed
        if a.above_break_even:
            rounded = (f", rounded up from {a.planned_rank} to a multiple of {plan.rank_multiple}"
                       if a.planned_rank is not None and a.planned_rank < a.rank else "")
            warnings.append(f"{name}: rank {a.rank} is above the break-even rank {li.break_even_rank} "
                            f"(rule {a.rule_index + 1}{rounded}); factorising adds {a.params_after - li.params:,} "
                            "parameters")
        if li.tied:
            warnings.append(f"{name}: lm_head is tied to the embedding; factorising it frees nothing and adds "
                            f"{a.params_after:,} parameters")
        rows.append({"name": name, "layer": li.layer, "group": li.group, "module": li.module,
                     "shape": f"{li.out_features} x {li.in_features}", "rank": a.rank,
                     "planned_rank": a.rank if a.planned_rank is None else a.planned_rank,
                     "break_even_rank": li.break_even_rank, "params_before": li.params,
                     "params_after": a.params_after, "above_break_even": a.above_break_even,
                     "method": a.method, "rule": a.rule_index + 1})
    return Accounting(original, compressed, rows, warnings)


@dataclass
class PlanOptions:
    """Plan settings given beside a plan (the ``--rank-multiple`` flag of compress, compare, count and run)."""

    rank_multiple: Optional[int] = option(None, choices=RANK_MULTIPLES,
                                          help="round every rank of the plan (keep-derived and explicit) down to a "
                                               "multiple of this, at least the multiple (1 = off; default: the "
                                               "plan's own rank_multiple, else 1)")

    def apply(self, plan: Union[Plan, str, dict]) -> Plan:
        """``plan`` with these options (an unset option keeps the plan's own value)."""
        return with_rank_multiple(load_plan(plan), self.rank_multiple)


def with_rank_multiple(plan: Plan, multiple: Optional[int]) -> Plan:
    """A copy of ``plan`` rounding ranks to multiples of ``multiple`` (None: ``plan`` unchanged)."""
    if multiple is None:
        return plan
    return Plan(list(plan.rules), rank_multiple=multiple)
