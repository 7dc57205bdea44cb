"""Form widgets drawn from a settings dataclass's ``option(...)`` metadata: the very fields its CLI flags and
recipe keys come from (``lowrank_core/options.py``), so a method's own settings get their Compress-page
widgets without a line of page code. The widget follows the field: a checkbox for a bool, a selectbox for
choices, a number input for an int or a float (its ``minimum`` as lower bound), a text input otherwise;
the label is the option's ``label`` (or its name), the tooltip its help.
"""
from __future__ import annotations

import math

import streamlit as st

from lowrank_core.options import Option, check_mapping, options_of


def form_options(cls) -> list[Option]:
    """The options of ``cls`` a form shows: not derived (another section sets those), not nested."""
    return [o for o in options_of(cls) if not o.derived and o.nested is None and o.sections_spec is None]


def option_values(settings) -> dict:
    """``{recipe key: value}`` of the options a form shows, from a settings instance."""
    return {o.key: getattr(settings, o.name) for o in form_options(type(settings))}


def settings_from(cls, values: dict, path: str):
    """A ``cls`` instance from a form's ``{recipe key: value}``, checked like a recipe section at ``path``
    (an ``OptionError`` names the bad value)."""
    return check_mapping(cls, values, path)


def settings_widgets(cls, values: dict, key: str, disabled: bool = False, suffix: str = "",
                     per_row: int = 4) -> dict:
    """One widget per option of ``cls`` a form shows, ``per_row`` to a row, filled from ``values``
    (``{recipe key: value}``; missing: the default); widget keys ``<key>_<field name><suffix>``.
    Returns ``{recipe key: value}``."""
    opts = form_options(cls)
    out = {}
    for start in range(0, len(opts), per_row):
        for column, opt in zip(st.columns(per_row), opts[start:start + per_row]):
            out[opt.key] = option_widget(column, opt, values.get(opt.key, opt.default),
                                         f"{key}_{opt.name}{suffix}", disabled)
    return out


def option_widget(where, opt: Option, value, key: str, disabled: bool = False):
    """The widget of one option (in ``where``: a column or ``st``), showing ``value``; returns its value."""
    text = opt.help() if callable(opt.help) else opt.help
    kw = dict(key=key, disabled=disabled, help=text or None)
    if bool in opt.types:
        return where.checkbox(opt.title, value=bool(value), **kw)
    choices = list(opt.choices)
    if choices and not opt.pattern:
        return where.selectbox(opt.title, choices, index=choices.index(value) if value in choices else 0, **kw)
    if int in opt.types:
        low = None if opt.minimum is None else int(math.ceil(opt.minimum))
        return where.number_input(opt.title, min_value=low, value=None if value is None else int(value), step=1, **kw)
    if float in opt.types:
        low = None if opt.minimum is None else float(opt.minimum)
        small = value is not None and 0 < abs(value) < 1e-2   # a learning rate: scientific notation
        step = 10.0 ** math.floor(math.log10(abs(value))) if small else 0.01
        return where.number_input(opt.title, min_value=low, value=None if value is None else float(value),
                                  step=step, format="%.1e" if small else "%g", **kw)
    shown = where.text_input(opt.title, value="" if value is None else str(value), **kw)
    return None if opt.optional and not shown else shown
