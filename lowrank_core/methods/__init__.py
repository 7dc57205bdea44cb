"""Compression methods as plug-ins: each file of this package defines and registers one method.

Adding a method = one new file here (a :class:`Method` subclass decorated with :func:`register`) plus
its tests; the package imports every module it holds, so plans, the CLI, recipes and the app see it.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (LayerContext, Method, MethodError, basis_method, default_settings, get, help_text, names,
                   refining, register, settings_classes, unregister)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LayerContext", "Method", "MethodError", "basis_method", "default_settings", "get", "help_text", "names",
           "refining", "register", "settings_classes", "unregister"]
