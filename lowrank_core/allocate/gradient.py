"""Gradient scores of whitened singular components (ZS-SVD style): a predicted Δloss per component.

**Components.** A matrix's :class:`~lowrank_core.decompose.WhitenedBasis` splits it into rank-1 terms
``W = Σ_i W_i`` whose first ``r`` sum to the whitened rank-``r`` truncation ``W_r`` exactly:

- ``out <= in`` (``basis.wide``): ``U`` = eigenvectors of ``W G Wᵀ`` (``basis.vectors``, orthogonal),
  ``W_i = u_i u_iᵀ W``; then ``⟨g, W_i⟩ = u_iᵀ (g Wᵀ) u_i``, the diagonal of ``Uᵀ (g Wᵀ) U``;
- ``out > in``: ``V`` = right singular vectors of ``A = W L`` (``L Lᵀ = G``), ``W_i = (W L v_i)(v_iᵀ L⁻¹)``
  (Σ_i W_i = W L V Vᵀ L⁻¹ = W); then ``⟨g, W_i⟩ = v_iᵀ (Lᵀ Wᵀ g L⁻ᵀ) v_i``, computed as the row-wise
  dot product of ``Vᵀ (Lᵀ Wᵀ g)`` with ``D = Vᵀ L⁻¹`` (the basis's ``down`` factor rows, one triangular
  solve through :meth:`~lowrank_core.decompose.Whitening.unwhiten`).

Both cost a few ``min(out, in)``-sized matrix products per gradient and never form a rank-1 matrix
(:func:`component_inner`).

**Gradients.** ``L = (1/N) Σ_e S_e`` is the mean answer-token cross-entropy of the validation split
(``S_e`` = Σ CE over example ``e``'s ``n_e`` answer tokens, ``N = Σ n_e``), and ``G_e = ∂S_e/∂W``. Each
validation example is run alone, unpadded (the same loss as the batched evaluation up to rounding),
with one backward pass through :func:`torch.autograd.grad` restricted to the eligible linears' weights:
their ``requires_grad`` is switched on for the pass and restored after it, nothing accumulates in any
``.grad``, no tensor of the teacher is written, and no other parameter's gradient is computed. Only
the per-component running sums are kept (two ``min(out, in)`` vectors per matrix); one example's
weight gradients (the eligible weights' size) and its autograd graph are alive at a time.

**Scores.** Removing component ``i`` (``W → W − W_i``) changes the loss by

- first order: ``first_i = −⟨g, W_i⟩`` with ``g = ∂L/∂W = (1/N) Σ_e G_e``, so the first-order Δloss of
  the rank-``r`` truncation, ``−⟨g, W − W_r⟩``, is exactly ``Σ_{i≥r} first_i``;
- second order (empirical Fisher for the Hessian): ``fisher_i = ½ (1/N) Σ_e ⟨G_e, W_i⟩²``, the per-token
  empirical Fisher ``½ (1/N) Σ_tokens ⟨∇ℓ_t, W_i⟩²`` estimated from per-*example* gradients (the two agree
  when token gradients within an example are uncorrelated; on the test model, over 154 (matrix, rank)
  tails, per-example / exact per-token: median 1.00, interquartile 0.89–1.08; per-batch, from the two
  validation batches the tests have: 0.72–1.29). Per-example costs no more backward compute than
  per-batch (no padding) and needs no per-token backward passes.

``score_i = |first_i| + fisher_i`` (``"taylor"``, the default) or ``fisher_i`` (``"fisher"``), and the
predicted Δloss of rank ``r`` is ``tail[r] = Σ_{i≥r} score_i``: non-negative, non-increasing in ``r``,
additive over matrices (cross terms between components and between matrices are dropped, as the
error-curve probes drop them). ``|first|`` rather than the signed value keeps every score non-negative and
bounds the signed first-order change from above, so predictions err on the expensive side.

Why ``taylor`` by default. A checkpoint that is not at a minimum of the validation loss (the tiny test
model after 60 Adam steps; a pretrained model scored on chat data it was not tuned on) moves its loss
mostly at first order: on the test model, over 154 single-matrix
truncations, the signed first-order sum predicts the measured Δloss with Spearman 0.998 and a median
ratio of 1.01, while the Fisher term is ~1000× (median) below it. Among the truncations that raise the
loss both scores rank alike (Spearman 0.95), but ``taylor`` is within ~4.5× (median, above) of the
measured Δloss and ``fisher`` ~1000× below it; the search verifies first where the prediction meets the
budget, then extrapolates forward (≤ 4× per pass) or bisects, so an overestimate costs a pass or two and
a thousand-fold underestimate starts it at the far end of a long path. Where the gradient does vanish
the ``|first|`` part shrinks and ``taylor`` tends to ``fisher``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arch import arch_of
from ..data import IGNORE_INDEX
from ..decompose import WhitenedBasis
from ..layerwise import model_device
from ..progress import Progress, ensure_progress
from .bases import live_basis

GRADIENT_SCORES = ("taylor", "fisher")


@dataclass
class ComponentScores:
    """One matrix's per-component terms, float64 CPU ``[min(out, in)]``, in basis order (descending
    whitened singular value): ``first`` = first-order Δloss of removing the component (``−⟨g, W_i⟩``,
    signed), ``fisher`` = its empirical-Fisher second-order term (``>= 0``)."""

    first: Tensor
    fisher: Tensor

    def score(self, kind: str = "taylor") -> Tensor:
        if kind == "taylor":
            return self.first.abs() + self.fisher
        if kind == "fisher":
            return self.fisher.clone()
        raise ValueError(f"unknown gradient score {kind!r}; allowed: {', '.join(GRADIENT_SCORES)}")

    def tail(self, kind: str = "taylor") -> list[float]:
        """Predicted Δloss at rank ``r`` for ``r = 0 .. k``: ``Σ_{i≥r} score_i`` (``tail[k] = 0``)."""
        s = self.score(kind)
        return [float(v) for v in s.flip(0).cumsum(0).flip(0)] + [0.0]

    def first_order(self, rank: int) -> float:
        """First-order Δloss of the rank-``rank`` truncation, ``−⟨g, W − W_r⟩`` (signed)."""
        return float(self.first[rank:].sum())


@dataclass
class GradientResult:
    scores: dict[str, ComponentScores]
    loss: float          # mean answer loss of the teacher over the scored examples (the gradients' loss)
    tokens: int          # N, answer tokens
    examples: int


def component_inner(basis: WhitenedBasis, W: Tensor, grad: Tensor) -> Tensor:
    """``⟨grad, W_i⟩`` for every whitened component ``W_i`` of ``W`` (the weight ``basis`` was solved
    for) at once: float64 ``[min(out, in)]`` in basis order (see module doc), on the basis's device — a
    :class:`~.bases.StoredBasis` (kept in CPU memory) is brought to the gradient's device first."""
    if grad.shape != W.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} differs from the weight's {tuple(W.shape)}")
    basis = live_basis(basis, grad.device)
    wh = basis.whitening
    W64 = W.detach().to(wh.device, torch.float64)
    g64 = grad.detach().to(wh.device, torch.float64)
    V = basis.vectors
    if basis.wide:                                   # u_iᵀ (g Wᵀ) u_i
        return ((g64 @ W64.T) @ V * V).sum(0)
    M = wh.factor.T @ (W64.T @ g64)                  # Lᵀ Wᵀ g   [in, in]
    D = wh.unwhiten(V.T.contiguous())                # rows v_iᵀ L⁻¹
    return ((V.T @ M) * D).sum(1)                    # v_iᵀ M L⁻ᵀ v_i


@contextmanager
def _weights_requiring_grad(weights: Sequence[Tensor]) -> Iterator[None]:
    """``requires_grad`` on for ``weights`` inside the block, each weight's own flag restored after it."""
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def example_loss(model, input_ids: Tensor, labels: Tensor) -> Tensor:
    """Σ answer-token cross-entropy of unpadded examples ``[B, T]`` (no padding, so no mask), as a
    differentiable scalar: the evaluation's loss (head on answer positions, CE in at least float32)."""
    spec = arch_of(model, strict=False)
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    if spec is not None and spec.plain_head:   # devices: a dispatched model's layers may sit on several
        hidden = spec.decoder_of(model)(input_ids=input_ids, use_cache=False).last_hidden_state
        logits = spec.logits_of(model, hidden[:, :-1][selected.to(hidden.device)])
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
        logits = logits[:, :-1][selected.to(logits.device)]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets[selected].to(logits.device), reduction="sum")


def example_gradients(model, weights: dict[str, Tensor], batches: Sequence[dict]) -> Iterator[tuple[float, int, dict]]:
    """For each example of the (right-padded) ``batches``: ``(S_e, n_e, {name: ∂S_e/∂W})`` with ``S_e`` the
    summed answer cross-entropy over its ``n_e`` answer tokens; examples without answer tokens are skipped.

    One unpadded forward and one :func:`torch.autograd.grad` backward per example, with respect to
    ``weights`` only (their ``requires_grad`` is restored when the iterator ends or is closed)."""
    device = model_device(model)
    names = list(weights)
    params = [weights[k] for k in names]
    with torch.enable_grad(), _weights_requiring_grad(params):
        for batch in batches:
            for e in range(len(batch["input_ids"])):
                length = int(batch["attention_mask"][e].sum())
                labels = batch["labels"][e:e + 1, :length].to(device)
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                if n == 0:
                    continue
                loss = example_loss(model, batch["input_ids"][e:e + 1, :length].to(device), labels)
                grads = torch.autograd.grad(loss, params)
                yield float(loss.detach()), n, dict(zip(names, grads))


def gradient_scores(model, bases: dict[str, WhitenedBasis], batches: Sequence[dict],
                    progress: Optional[Progress] = None) -> GradientResult:
    """Per-component first-order and Fisher terms (see module doc) of every matrix in ``bases``
    (``{module name: the basis of its weight}``) on the validation ``batches``, streamed example by example.

    The model may be dispatched by accelerate over several devices (each inner product is computed on its
    gradient's device, stored bases are brought there one at a time), but the scored weights must be
    materialised: a weight offloaded by accelerate (a ``meta`` parameter refilled at every forward) has no
    gradient to take."""
    progress = ensure_progress(progress)
    if not bases:
        raise ValueError("gradient scores need at least one matrix")
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in bases}
    offloaded = [name for name, w in weights.items() if w.device.type == "meta"]
    if offloaded:
        raise ValueError(f"the gradient probe needs the scored weights in memory, but {len(offloaded)} are offloaded "
                         f"by accelerate ({offloaded[0]}, ...): load the teacher without offload (one device, or "
                         "device_map over GPUs only), or use probe='layer' / 'matrix'")
    N = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    if N == 0:
        raise ValueError("the validation batches hold no answer tokens; raise val_max_len or add examples")
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).any(1).sum()) for b in batches)
    sums = {name: torch.zeros(len(b.values), dtype=torch.float64, device=weights[name].device)
            for name, b in bases.items()}
    squares = {name: torch.zeros_like(v) for name, v in sums.items()}
    loss, seen = 0.0, 0
    for loss_e, _, grads in example_gradients(model, weights, batches):
        for name, g in grads.items():
            t = component_inner(bases[name], weights[name], g).to(sums[name].device)
            sums[name] += t
            squares[name] += t * t
        del grads
        loss, seen = loss + loss_e, seen + 1
        progress(seen, total, "gradient scores")
    scores = {name: ComponentScores(first=(-sums[name] / N).cpu(), fisher=(0.5 * squares[name] / N).cpu())
              for name in bases}
    return GradientResult(scores, loss / N, N, seen)
