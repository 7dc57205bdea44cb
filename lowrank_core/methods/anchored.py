"""``anchored``: whitened factors, then each decoder layer's matrices re-solved in closed form so that,
fed the STUDENT's inputs, they reproduce the TEACHER's outputs (the AA-SVD / SAES-SVD idea).

For one linear ``W`` [out, in] of decoder layer ``i``: ``X_t`` [N, in] are its inputs when the teacher
layer runs on the teacher's stream, ``X_s`` its inputs when the same teacher layer runs on the student's
stream (what the already-compressed earlier layers produce), paired token by token over the real
(non-padding) tokens of the fit batches. The method minimises over rank-r ``W′``

    ‖W X_tᵀ − W′ X_sᵀ‖²_F.

With ``G_s = X_sᵀX_s`` and ``D = (X_t − X_s)ᵀX_s`` (so the cross-Gram ``C = X_tᵀX_s = G_s + D``), the
unconstrained least-squares solution is ``W* = W C G_s⁻¹ = W + W D G_s⁻¹``. Its residual is orthogonal
to the columns of ``X_s`` (``(W X_tᵀ − W* X_sᵀ) X_s = W C − W* G_s = 0``), hence

    ‖W X_tᵀ − W′ X_sᵀ‖² = ‖W X_tᵀ − W* X_sᵀ‖² + ‖(W* − W′) X_sᵀ‖²,

and the rank-r minimiser is the whitened truncation of ``W*`` under ``G_s``
(``WhitenedBasis(W*, G_s).factors(W*, r)``). ``W*`` is computed in float64 by a Cholesky solve against
``G_s`` as prepared by :class:`~lowrank_core.decompose.Whitening` (its adaptive damping ``λ``, or its
eigendecomposition fallback; no inverse is formed). With ``λ > 0`` the solve gives
``W* = W (C + λI)(G_s + λI)⁻¹``, the least-squares solution with a ridge pulling towards the teacher's
``W`` (not towards 0). ``D`` is accumulated from the difference of the two inputs rather than as ``C − G_s``:
where the streams agree (layer 0, or any layer before the first compressed one) ``D = 0`` exactly and
``W* = W``, so the method gives exactly the ``whitened`` factors there.

Within a layer every matrix is solved against the TEACHER layer run on the student's stream: the
inputs of ``o_proj``, gate/up and ``down_proj`` are those of the teacher's own sublayers, not of the
student's (already anchored) ones, and all matrices of a layer share one pass.

Cost per layer: one extra pass of the teacher layer over the fit batches on each stream (the inputs of
one batch are held at a time), and per shared input (q/k/v read one, gate/up another) one ``G_s`` and one
``D`` [in, in] float64.
Mixture-of-experts linears keep their whitened factors: the teacher's and the student's streams route
tokens to different experts, so an expert has no per-token teacher target on the student's rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..arch import ARCHS, arch_of
from ..calibrate import add_symmetric_product
from ..decompose import (Factors, FactorizationError, WhitenedBasis, Whitening, solver_threads,
                         whitening)
from ..experts import expert_of
from ..layerwise import call_layer, to_device
from ..progress import Progress, ensure_progress
from ..sliced import fused_path, teacher_weight
from .base import LayerContext, register
from .whitened import Whitened

__all__ = ["Anchored", "anchored_target", "anchored_factors", "input_keys"]


# ----------------------------------------------------------------------------- the maths
def _solve_gram(wh: Whitening, M: Tensor) -> Tensor:
    """``M (G + λI)⁻¹`` [k, in] float64 with ``L Lᵀ = G + λI`` the whitening's factor (no inverse formed)."""
    L = wh.factor
    M = M.to(wh.device, torch.float64)
    if wh.kind == "eigh":
        q, root = wh.eigen_factor   # L = Q·diag(root): (L Lᵀ)⁻¹ = Q·diag(1/root²)·Qᵀ
        return ((M @ q) / (root * root)) @ q.T
    with solver_threads(L.device):
        return torch.cholesky_solve(M.T.contiguous(), L, upper=False).T   # G symmetric: (G⁻¹Mᵀ)ᵀ = M G⁻¹


def anchored_target(W: Tensor, gram_s, delta: Tensor) -> Tensor:
    """``W* = W + W·D·(G_s + λI)⁻¹`` [out, in] float64: the least-squares map taking the student's inputs
    to the teacher's outputs. ``gram_s``: ``G_s = X_sᵀX_s`` (tensor, ``GramStats`` or ``Whitening``);
    ``delta``: ``D = (X_t − X_s)ᵀX_s`` [in, in] (= the cross-Gram ``X_tᵀX_s`` minus ``G_s``)."""
    wh = whitening(gram_s, device=W.device)
    if tuple(delta.shape) != (wh.in_features, wh.in_features) or W.shape[1] != wh.in_features:
        raise FactorizationError(f"weight {tuple(W.shape)}, Gram {wh.in_features}² and cross term "
                                 f"{tuple(delta.shape)} do not match")
    W64 = W.detach().to(wh.device, torch.float64)
    D = delta.to(wh.device, torch.float64)
    if not torch.isfinite(D).all():
        raise FactorizationError("cross term has non-finite entries (NaN/inf)")
    if not D.any():
        return W64.clone()      # equal streams: exactly the teacher's weight (the whitened case)
    return W64 + _solve_gram(wh, W64 @ D)


def anchored_factors(W: Tensor, gram_s, delta: Tensor, rank: int, bias: Optional[Tensor] = None) -> Factors:
    """Rank-``rank`` minimiser of ``‖W X_tᵀ − W′ X_sᵀ‖²``: the whitened truncation of ``anchored_target``
    under ``G_s``; factors in ``W``'s dtype and device (see the module docstring)."""
    wh = whitening(gram_s, device=W.device)
    target = anchored_target(W, wh, delta)
    f = WhitenedBasis(target, wh).factors(target, rank, bias)
    dt, dev = W.dtype, W.device
    return Factors(f.up.to(dev, dt).contiguous(), f.down.to(dev, dt).contiguous(),
                   None if f.bias is None else f.bias.to(dev, dt))


# ----------------------------------------------------------------------------- shared inputs
def input_keys(layer: nn.Module, names: list[str]) -> dict[str, str]:
    """``{path in the layer: key of its input}``: linears reading one input (q/k/v, gate/up: the arch table's
    ``inputs``) share a key; a path the table does not know reads its own input."""
    spec = None
    for owner in (layer, getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
        spec = spec or arch_of(getattr(owner, "config", None), strict=False)
    specs = [spec] if spec is not None else list(ARCHS.values())
    keys = {}
    for rel in names:
        key = rel
        for s in specs:
            short = next((k for k, path in s.linears.items() if path == rel), None)
            if short is not None:
                key = "input:" + s.inputs[short]
                break
        keys[rel] = key
    return keys


class _Done(Exception):
    """Raised by a hook once every needed input of the pass has been seen: the rest of the layer is skipped."""


# ----------------------------------------------------------------------------- the method
@register
class Anchored(Whitened):
    name = "anchored"
    summary = ("sequential closed form: each layer's matrices map the student's inputs to the teacher's "
               "outputs (whitened truncation of the least-squares map)")
    order = 3
    needs_grams = True
    sequential = True

    # factorize: the whitened closed form (inherited); refine_layer re-solves each layer below

    @torch.no_grad()
    def layer_statistics(self, ctx: LayerContext, names: list[str],
                         progress: Optional[Progress] = None) -> tuple[dict, dict, dict]:
        """``(keys, grams, deltas)``: ``keys`` {path: input key}; per key ``G_s = X_sᵀX_s`` and
        ``D = (X_t − X_s)ᵀX_s`` [in, in] float64 on ``ctx.device``, over the real tokens of ``ctx.fit``."""
        progress = ensure_progress(progress)
        device = ctx.device
        mods = dict(ctx.layer.named_modules())
        paths = {rel: fused_path(rel, ctx.factors[rel]) for rel in names}   # a part reads its fused linear's input
        keys = {rel: input_keys(ctx.layer, list(paths.values()))[paths[rel]] for rel in names}
        first: dict[str, str] = {}
        for rel in names:
            first.setdefault(keys[rel], paths[rel])
        size = {k: int(mods[r].in_features) for k, r in first.items()}
        grams = {k: torch.zeros(n, n, dtype=torch.float64, device=device) for k, n in size.items()}
        deltas = {k: torch.zeros(n, n, dtype=torch.float64, device=device) for k, n in size.items()}
        state: dict = {"side": "teacher", "mask": None, "rows": {}}

        def hook_for(key):
            def hook(_mod, args):
                x = args[0]
                rows = x[state["mask"].to(x.device)].float()     # [real tokens, in]
                if state["side"] == "teacher":
                    state["rows"][key] = rows
                else:
                    xt = state["rows"].pop(key)
                    add_symmetric_product(grams[key], rows)
                    deltas[key] += ((xt - rows).T @ rows).to(torch.float64)
                seen_all = len(state["rows"]) == len(first) if state["side"] == "teacher" else not state["rows"]
                if seen_all:
                    raise _Done
            return hook

        handles = [mods[rel].register_forward_pre_hook(hook_for(key)) for key, rel in first.items()]
        try:
            for done, b in enumerate(ctx.fit, 1):
                kw = to_device(ctx.inputs.layer_kwargs[b][ctx.index], device)
                state["mask"] = ctx.inputs.masks[b].to(device).bool()
                for side, hidden in (("teacher", ctx.teacher_in), ("student", ctx.student_in)):
                    state["side"] = side
                    try:
                        call_layer(ctx.layer, hidden[b].to(device), kw)
                    except _Done:
                        pass
                if state["rows"]:
                    raise RuntimeError(f"layer {ctx.index}: inputs of {sorted(state['rows'])} were seen on the "
                                       "teacher's stream only")
                progress(done, len(ctx.fit), f"anchored layer {ctx.index}: statistics")
        finally:
            for h in handles:
                h.remove()
            state["rows"].clear()
        return keys, grams, deltas

    @torch.no_grad()
    def refine_layer(self, ctx: LayerContext, names: list[str], progress: Progress) -> Optional[dict]:
        """Replace ``ctx.factors[name]``'s weights (in place, same modules, ranks, dtype and device) by the
        anchored factors; returns None. Where the two streams are the same object (no earlier layer
        compressed), the ``whitened`` factors built by ``factorize`` already are the answer."""
        # experts keep their whitened factors: the two streams route tokens to different experts, so an
        # expert has no per-token teacher target on the student's rows
        names = [rel for rel in names if expert_of(ctx.layer, rel) is None]
        if not names or ctx.student_in is ctx.teacher_in or not ctx.fit:
            return None
        keys, grams, deltas = self.layer_statistics(ctx, names, progress)
        whitenings = {}
        for rel in names:
            key = keys[rel]
            new = ctx.factors[rel]
            wh = whitenings.setdefault(key, Whitening(grams[key], device=ctx.device))
            f = anchored_factors(teacher_weight(ctx.layer, rel, new), wh, deltas[key], new.rank)
            new.down.weight.copy_(f.down.to(new.down.weight.device, new.down.weight.dtype))
            new.up.weight.copy_(f.up.to(new.up.weight.device, new.up.weight.dtype))
        return None
