"""Instruction data (moving into modules: sources, split, encoding); every name stays importable here."""
from .sources import *  # noqa: F401,F403
