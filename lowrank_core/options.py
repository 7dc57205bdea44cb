"""Settings dataclasses are the one source of defaults: CLI flags and recipe keys are derived from them.

A settings field is declared with :func:`option` (a ``dataclasses.field`` with metadata: help, allowed
values, lower bound, the CLI flag when it is not ``--<prefix><name>``, the recipe key when it is not
the field name, or ``derived=True`` for a field another section sets; ``label``: the app's widget label
when it is not the field's name). :func:`options_of` reads a
dataclass's fields and their resolved types (``typing.get_type_hints``, no string parsing);
:func:`add_arguments` / :func:`from_args` turn them into argparse flags and back, and
:func:`check_mapping` validates a recipe section against them, naming the key path of a bad value.

A field declared with ``sections=`` (a callable giving ``{name: settings dataclass}``, e.g. the method
registry's ``settings_classes``) holds ``{name: settings}``: each entry's options are those of a nested
section called ``name`` (flags ``--<prefix><name>-<field>``, recipe keys ``<path>.<name>.<key>``), so the
sections on offer follow the registry and no settings dataclass lists them.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Optional, Union

REQUIRED = object()  # the default of a field that has none


class OptionError(ValueError):
    """A value that does not fit its option; the message starts with the key path."""


def option(default: Any = MISSING, *, help: Union[str, Callable[[], str]] = "", choices: Union[tuple, Callable[[], tuple], None] = None,
           minimum: Optional[float] = None, pattern: Optional[str] = None, flag: Optional[str] = None,
           key: Optional[str] = None, derived: bool = False, convert: Optional[Callable[[str], Any]] = None,
           default_factory: Any = MISSING, label: Optional[str] = None,
           sections: Optional[Callable[[], dict]] = None):
    """A dataclass field with the metadata that CLI flags and recipe keys are derived from.

    ``choices`` may be a callable (e.g. a registry's names) evaluated when used; ``pattern`` is a regular
    expression also accepted besides ``choices`` (e.g. ``cuda:\\d+``); ``derived``: set from another
    section (no flag, no recipe key); ``convert``: parses a text value (a flag, or a string in a recipe),
    e.g. :func:`parse_count` for ``"2M"``; ``label``: the app's widget label (default: the name, spaced);
    ``sections``: a mapping field of named nested settings (see the module docstring).
    """
    metadata = {"help": help, "choices": choices, "minimum": minimum, "pattern": pattern, "flag": flag,
                "key": key, "derived": derived, "convert": convert, "label": label, "sections": sections}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One settings field as the CLI and the recipe schema see it."""

    name: str
    key: str
    types: tuple                 # accepted Python types (bool never counts as int)
    optional: bool               # None is accepted
    default: Any                 # REQUIRED when the field has no default
    help: Union[str, Callable[[], str]]  # a callable is evaluated when the flag is built (e.g. a registry)
    choices_spec: Any
    minimum: Optional[float]
    pattern: Optional[str]
    flag: Optional[str]
    derived: bool
    nested: Optional[type]       # a settings dataclass held by this field
    convert: Optional[Callable[[str], Any]] = None
    label: Optional[str] = None
    sections_spec: Optional[Callable[[], dict]] = None  # {name: settings dataclass}: a field of named sections

    @property
    def sections(self) -> dict:
        """``{name: settings dataclass}`` of a field of named sections (evaluated now: e.g. the registry)."""
        return dict(self.sections_spec()) if self.sections_spec is not None else {}

    @property
    def title(self) -> str:
        """The app's label of this option."""
        return self.label or self.name.replace("_", " ")

    @property
    def choices(self) -> tuple:
        c = self.choices_spec
        return tuple(c() if callable(c) else c or ())

    def check(self, value, path: str):
        """``value`` if it fits (ints accepted for floats), else ``OptionError`` naming ``path``."""
        if value is None:
            if self.optional:
                return None
            raise OptionError(f"{path}: a value is required")
        if self.convert is not None and isinstance(value, str):
            try:
                value = self.convert(value)
            except ValueError as e:
                raise OptionError(f"{path}: {e}") from None
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok and float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise OptionError(f"{path}: {value!r} is not a {' or '.join(t.__name__ for t in self.types)}")
        allowed = self.choices
        if allowed and value not in allowed and not (self.pattern and re.fullmatch(self.pattern, str(value))):
            extra = f" or {self.pattern}" if self.pattern else ""
            raise OptionError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}{extra}")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{path}: {value!r} is below the minimum {self.minimum:g}")
        return value


def _types(hint) -> tuple[tuple, bool, Optional[type]]:
    """(accepted types, None allowed, nested dataclass) of a resolved type hint."""
    origin = typing.get_origin(hint)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner, _, nested = _types(args[0]) if len(args) == 1 else (tuple(args), False, None)
        return inner, True, nested
    if dataclasses.is_dataclass(hint):
        return (hint,), False, hint
    if origin is not None:
        return (origin,), False, None
    return ((hint,) if isinstance(hint, type) else (object,)), False, None


def options_of(cls) -> list[Option]:
    """The options of a settings dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kinds, optional, nested = _types(hints[f.name])
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(Option(name=f.name, key=meta.get("key") or f.name, types=kinds, optional=optional,
                          default=default, help=meta.get("help", ""), choices_spec=meta.get("choices"),
                          minimum=meta.get("minimum"), pattern=meta.get("pattern"), flag=meta.get("flag"),
                          derived=bool(meta.get("derived")), nested=nested, convert=meta.get("convert"),
                          label=meta.get("label"), sections_spec=meta.get("sections")))
    return out


def _keys(opts: list[Option], path: str) -> list[str]:
    """The recipe keys of a section's options, a field of named sections giving one key per section;
    a section named like a key of its parent is refused (it could not be told apart)."""
    keys = []
    for opt in opts:
        for key in (opt.sections if opt.sections_spec is not None else [opt.key]):
            if key in keys:
                raise OptionError(f"{path or 'options'}: key {key!r} is declared twice (a settings section named "
                                  "like a key of its parent)")
            keys.append(key)
    return keys


def parse_count(text: str) -> int:
    """``"2M"`` -> 2_000_000, ``"500k"`` -> 500_000, ``"1.5M"``, ``"12000"``: a count of tokens or examples."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a count; use e.g. 2000000, 500k or 2M") from None
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole count")
    return int(value)


def checked(section: str, validate: Callable[[], None]) -> None:
    """Run a settings ``validate()``: a plain ``ValueError`` it raises becomes an :class:`OptionError` whose
    message starts with ``section`` (typed, so the CLI reports it as a user error); typed errors pass."""
    try:
        validate()
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise OptionError(f"{section}: {e}") from None


# ----------------------------------------------------------------------------- argparse
def _dest(section: str, name: str) -> str:
    return f"{section}__{name}" if section else name


def add_arguments(parser, cls, section: str, prefix: str = "", optional: bool = False) -> None:
    """One flag per non-derived field of ``cls`` (recursing into nested settings with ``<name>-``):
    ``--<prefix><name>`` unless the field names its flag; bools are switches (``--x`` / ``--no-x``
    when the default is on); values are stored under ``<section>__<name>``. ``optional``: the section
    may be left out (nothing is required, unset flags stay absent: see :func:`given`)."""
    import argparse

    for opt in options_of(cls):
        if opt.derived:
            continue
        dest = _dest(section, opt.name)
        if opt.sections_spec is not None:
            for name, cls in opt.sections.items():
                add_arguments(parser, cls, _dest(section, name), f"{prefix}{name.replace('_', '-')}-", optional)
            continue
        if opt.nested is not None:
            add_arguments(parser, opt.nested, dest, f"{prefix}{opt.name.replace('_', '-')}-", optional)
            continue
        shown = "" if opt.default in (REQUIRED, None) or isinstance(opt.default, bool) else f" (default: {opt.default})"
        text = opt.help() if callable(opt.help) else opt.help
        kw: dict = {"dest": dest, "help": (text + shown).replace("%", "%%") or None}  # argparse formats help
        if bool not in opt.types:
            kw["metavar"] = opt.name.upper()
        if bool in opt.types:
            kw["action"] = argparse.BooleanOptionalAction if opt.default is True else "store_true"
            kw["default"] = bool(opt.default)
        else:
            kw["type"] = str if opt.convert else (opt.types[0] if opt.types[0] in (int, float, str) else str)
            if opt.default is REQUIRED and not optional:
                kw["required"] = True
            elif opt.default is not REQUIRED:
                kw["default"] = opt.default
            if opt.choices and not opt.pattern:
                kw["choices"] = opt.choices
        if optional:
            kw["default"] = argparse.SUPPRESS
        parser.add_argument(flag_name(opt, prefix), **kw)


def given(cls, args, section: str) -> list[str]:
    """Flags of an ``optional`` section that were given on the command line."""
    out = []
    for opt in options_of(cls):
        dest = _dest(section, opt.name)
        if opt.sections_spec is not None:
            for name, cls in opt.sections.items():
                out += given(cls, args, _dest(section, name))
        elif opt.nested is not None:
            out += given(opt.nested, args, dest)
        elif not opt.derived and hasattr(args, dest):
            out.append(flag_name(opt))
    return out


def from_args(cls, args, section: str):
    """An instance of ``cls`` from flags added by :func:`add_arguments` (absent flags: the defaults)."""
    kw = {}
    for opt in options_of(cls):
        dest = _dest(section, opt.name)
        if opt.derived:
            continue
        if opt.sections_spec is not None:
            kw[opt.name] = {name: from_args(cls, args, _dest(section, name)) for name, cls in opt.sections.items()}
        elif opt.nested is not None:
            kw[opt.name] = from_args(opt.nested, args, dest)
        elif hasattr(args, dest):
            kw[opt.name] = opt.check(getattr(args, dest), flag_name(opt))
    return cls(**kw)


def flag_name(opt: Option, prefix: str = "") -> str:
    return opt.flag or f"--{prefix}{opt.name.replace('_', '-')}"


# ----------------------------------------------------------------------------- recipe sections
def check_mapping(cls, data, path: str):
    """An instance of ``cls`` from a recipe mapping (keys = option keys; nested settings as mappings).

    Unknown keys, wrong types, values outside ``choices`` or below ``minimum`` raise ``OptionError``
    naming the key path, e.g. ``method.refit.lr: 'fast' is not a float``.
    """
    if data is None:
        data = {}
    opts = [o for o in options_of(cls) if not o.derived]
    keys = _keys(opts, path)
    if not isinstance(data, dict):
        raise OptionError(f"{path}: expected a mapping of {', '.join(keys)}, got {data!r}")
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise OptionError(f"{path}.{unknown[0]}: unknown key; allowed in {path}: {', '.join(keys)}")
    kw = {}
    for opt in opts:
        sub = f"{path}.{opt.key}"
        if opt.sections_spec is not None:
            kw[opt.name] = {name: check_mapping(sc, data.get(name), f"{path}.{name}") for name, sc in opt.sections.items()}
        elif opt.nested is not None:
            kw[opt.name] = check_mapping(opt.nested, data.get(opt.key), sub)
        elif opt.key in data:
            kw[opt.name] = opt.check(data[opt.key], sub)
        elif opt.default is REQUIRED:
            raise OptionError(f"{sub}: is required")
    return cls(**kw)  # derived fields keep their defaults: the section that owns them sets them


def to_mapping(obj) -> dict:
    """The recipe form of a settings instance (option keys; derived fields left out)."""
    out = {}
    for opt in options_of(type(obj)):
        if opt.derived:
            continue
        value = getattr(obj, opt.name)
        if opt.sections_spec is not None:
            out.update({name: to_mapping(sub) for name, sub in value.items()})
        else:
            out[opt.key] = to_mapping(value) if opt.nested is not None and value is not None else value
    return out
