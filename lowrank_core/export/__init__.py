"""Exporting a compressed student, one job per module (dependencies point downwards only):

- :mod:`.write`: tensors, configs, modeling file and safetensors shards of a ``dense`` or ``factorized``
  export, and :func:`export_student` (write into a temporary sibling -> verify -> move into place);
- :mod:`.verify`: reload an export as a user would and compare it with the in-memory student;
- :mod:`.manifest`: ``lowrank.json`` (what was compressed, how, with what result);
- :mod:`.card`: ``README.md``, the Hugging Face model card drawn from the manifest, and ``recipe.yaml``;
- :mod:`.load`: load a factorized export with lowrank_core's own ``LowRankLinear``;
- :mod:`.common`: ``ExportError``, ``ExportWriteError``, ``FORMATS``.

``low_rank_modules`` (of :mod:`lowrank_core.lowrank`) is re-exported here for compatibility.
"""
from ..lowrank import low_rank_modules
from .card import model_card
from .common import FORMATS, ExportError, ExportWriteError
from .load import load_factorized
from .manifest import MANIFEST, build_manifest, read_manifest
from .verify import ExportVerificationError, reload_export, verify_export
from .write import RECORDS_BYTES, ExportResult, check_room, check_target, export_bytes, export_student, write_export

__all__ = ["FORMATS", "MANIFEST", "RECORDS_BYTES", "ExportError", "ExportResult", "ExportVerificationError",
           "ExportWriteError", "build_manifest", "check_room", "check_target", "export_bytes", "export_student",
           "load_factorized", "low_rank_modules", "model_card", "read_manifest", "reload_export", "verify_export",
           "write_export"]
