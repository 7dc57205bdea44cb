"""The Search page's backend: the app's choices as a ``SearchSpec`` and the split it reads from the cache.

The page runs the engine's one search function (``lowrank_core.search_job.run_search``) on the model and
split the app keeps cached, as the ``search`` command runs it on its own.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from lowrank_core.allocate import VAL_OVERDRAW, SearchSettings
from lowrank_core.compress import CompressSettings
from lowrank_core.job import DataSpec, ModelSpec
from lowrank_core.search_job import DEFAULT_VAL, SearchSpec

from . import cache, state

VAL_MAX_LEN = SearchSettings.val_max_len  # tokens per validation example (at most the app's max_len)


def search_spec(s: state.Settings, budget: Optional[str] = None, keep: Optional[float] = None,
                probe: str = SearchSettings.probe, val: int = DEFAULT_VAL, calib: int = DataSpec.calib,
                max_verify: int = SearchSettings.max_verify, eval: int = DataSpec.eval) -> SearchSpec:
    """The SearchSpec of the app's choices: model, data source, seed and max tokens per example from the
    Model & data page; the goal (a loss ``budget`` or a ``keep`` fraction of the decoder linears), the
    probe and the sizes from the Search form."""
    return SearchSpec(model=ModelSpec(source=s.model_source, dtype=s.dtype, device=s.device),
                      data=DataSpec(source=s.data_source, seed=s.seed, calib=calib, eval=eval, val=val),
                      search=SearchSettings(probe=probe, val_max_len=min(VAL_MAX_LEN, s.max_len), max_verify=max_verify,
                                            compression=CompressSettings(max_len=s.max_len)),
                      budget=budget, keep_params=keep, name="app")


def search_split(s: state.Settings, spec: SearchSpec):
    """The app's cached split with ``VAL_OVERDRAW · data.val`` validation-side examples (as ``search --val``
    reads); its calibration and evaluation examples are those of every other page (sides by content hash)."""
    return cache.data_split(replace(s, n_val=max(s.n_val, VAL_OVERDRAW * spec.data.val)))
