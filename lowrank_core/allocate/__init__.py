"""Rank allocation under a loss budget (or a parameter target): which rank for which matrix.

1. ``profile``: each eligible matrix's exact relative output error at every rank (its whitened
   spectrum, free) and its measured sensitivity on a validation split from the calibration side, so
   ``predicted Δloss_i(r) = sensitivity_i · err_i(r)``; or (``probe="gradient"``, ``gradient``) a score
   per whitened singular component from one backward pass per validation example, so
   ``predicted Δloss_i(r) = Σ_{j≥r} score_ij`` (the components rank ``r`` removes);
2. ``path``: from all-dense, the greedy sequence of moves with the most parameters saved per predicted
   Δloss (only ranks that save parameters); a path prefix is a set of ranks, i.e. a plan;
3. ``search``: the prefix is verified with real forward passes (bisected until the measured Δloss meets
   the budget) or chosen at a parameter target; optionally refitted; returned as an :class:`Allocation`.

Modules: ``bases`` (``StoredBasis``: a solved basis kept in CPU memory without its Gram, float64 or
float32), ``memory`` (``profile_memory``: the bytes of each phase, from shapes), ``gradient``
(``component_inner``, ``example_gradients``, ``gradient_scores``, ``ComponentScores``: the gradient
probe's maths), ``profile`` (``SearchSettings``, ``MatrixProfile``, ``Profile``,
``build_profile``, the probes, the suffix loss, ``fitting_examples`` / ``VAL_OVERDRAW``: the validation
examples), ``path`` (``Step``, ``greedy_path``, ``ranks_after``, ``plan_from_ranks``), ``search``
(``BudgetError``, ``parse_budget``, ``decoder_target``, ``search_goal``, ``Allocation`` with ``plan_at``
any Pareto point, the verifier, ``allocate``, refit).
"""
from __future__ import annotations

from .bases import BASIS_DTYPES, StoredBasis
from .gradient import GRADIENT_SCORES, ComponentScores, GradientResult, component_inner, gradient_scores
from .path import Step, greedy_path, plan_from_ranks, ranks_after
from .profile import (DEFAULT_KEEPS, ELIGIBLE, PROBES, VAL_OVERDRAW, MatrixProfile, Profile, SearchSettings,
                      build_profile, candidate_ranks, error_curve, fitting_examples, low_rank_module, suffix_loss)
from .search import Allocation, BudgetError, allocate, decoder_target, parse_budget, search_goal
from .memory import profile_memory

__all__ = ["BASIS_DTYPES", "DEFAULT_KEEPS", "ELIGIBLE", "GRADIENT_SCORES", "PROBES", "VAL_OVERDRAW", "Allocation",
           "BudgetError", "ComponentScores", "GradientResult", "MatrixProfile", "Profile", "SearchSettings", "Step",
           "StoredBasis", "allocate", "build_profile", "candidate_ranks", "component_inner", "decoder_target",
           "error_curve", "fitting_examples", "gradient_scores", "greedy_path", "low_rank_module", "parse_budget",
           "plan_from_ranks", "profile_memory", "ranks_after", "search_goal", "suffix_loss"]
