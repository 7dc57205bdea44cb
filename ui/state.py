"""The app's committed choices, kept in ``st.session_state`` under keys no widget owns.

Widget keys are dropped by Streamlit when a page that owns them is left, so the choices every page
needs (model, data split, plan, compression runs) live in plain session-state entries set by forms.
Environment variables set the first defaults (test hooks): ``LOWRANK_APP_MODEL`` (e.g. ``tiny``) and
``LOWRANK_APP_DATA`` (e.g. ``chatterbot``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import streamlit as st

from lowrank_core.compress import CompressSettings
from lowrank_core.job import DataSpec, JobResult, ModelSpec

SETTINGS_KEY = "lowrank_settings"
PLAN_KEY = "lowrank_plan"          # dict: {"plan": Plan, "text": yaml, "source": str}
RUNS_KEY = "lowrank_runs"          # list[dict]: one row per finished compression run
RESULTS_KEY = "lowrank_results"    # {job key: JobResult}
CURRENT_KEY = "lowrank_current_job"  # job key of the result the Evaluate and Export pages use
JOB_KEY = "lowrank_pending_job"    # jobs.BackgroundJob of the compression running now
SEARCH_KEY = "lowrank_search"      # dict: the last finished rank-allocation search (see store_search)
SEARCH_JOB_KEY = "lowrank_pending_search"  # jobs.BackgroundJob of the search running now


@dataclass(frozen=True)
class Settings:
    """What the Model & data page chose. Sizes are numbers of examples."""

    model_source: str = ModelSpec.source      # defaults: the engine's job dataclasses
    dtype: str = ModelSpec.dtype
    device: str = ModelSpec.device
    data_source: str = DataSpec.source
    n_calib: int = DataSpec.calib
    n_val: int = DataSpec.val
    n_eval: int = DataSpec.eval
    seed: int = DataSpec.seed
    max_len: int = CompressSettings.max_len

    def to_dict(self) -> dict:
        return asdict(self)


def default_settings() -> Settings:
    """Defaults, overridden by ``LOWRANK_APP_MODEL`` / ``LOWRANK_APP_DATA`` (tiny sizes for tests)."""
    s = Settings(model_source=os.environ.get("LOWRANK_APP_MODEL") or "default",
                 data_source=os.environ.get("LOWRANK_APP_DATA") or "default")
    if s.model_source.startswith("tiny"):
        s = replace(s, n_calib=16, n_eval=32, max_len=128)
    return s


def settings() -> Settings:
    if SETTINGS_KEY not in st.session_state:
        st.session_state[SETTINGS_KEY] = default_settings()
    return st.session_state[SETTINGS_KEY]


def set_settings(new: Settings) -> None:
    st.session_state[SETTINGS_KEY] = new


def runs() -> list[dict]:
    return st.session_state.setdefault(RUNS_KEY, [])


def results() -> dict[str, JobResult]:
    """{job key: JobResult} of this session's finished compression jobs (see ``jobs.store_result``)."""
    return st.session_state.setdefault(RESULTS_KEY, {})


def current_result() -> tuple[Optional[str], Optional[JobResult]]:
    """(job key, JobResult) of the last finished compression job, or (None, None)."""
    key = st.session_state.get(CURRENT_KEY)
    job = results().get(key) if key else None
    return (key, job) if job is not None else (None, None)


def stored_plan():
    """The plan the Budget page saved (or the Search page opened): dict(plan=Plan, text=yaml, source=str)
    or None."""
    return st.session_state.get(PLAN_KEY)


def store_plan(plan, source: str) -> None:
    st.session_state[PLAN_KEY] = {"plan": plan, "text": plan.to_yaml(), "source": source}


def search_result():
    """The Search page's last finished search (dict, see ``store_search``) or None."""
    return st.session_state.get(SEARCH_KEY)


def store_search(result, evaluation: dict, model: str, fingerprint: str, goal: str, comparison=None) -> dict:
    """Keep a finished search of this session: ``result`` (``allocate.Allocation``), ``evaluation``
    ({"teacher", "student"}: EvalResult on the first evaluation examples) and the paired ``comparison``
    behind it, the model's name and fingerprint, the goal as asked; ``run`` counts the session's searches."""
    previous = search_result()
    found = {"result": result, "evaluation": evaluation, "comparison": comparison, "model": model,
             "fingerprint": fingerprint, "goal": goal, "run": (previous["run"] if previous else 0) + 1}
    st.session_state[SEARCH_KEY] = found
    return found
