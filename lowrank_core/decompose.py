"""Rank-r factorisations of a linear weight: plain SVD and the activation-aware ("whitened") optimum.

Shapes: ``W`` is ``out x in`` (PyTorch layout), a Gram ``G = Σ_tokens x xᵀ`` is ``in x in`` float64.
Factors satisfy ``W ≈ up @ down`` with ``up [out, r]`` and ``down [r, in]``.

``whitened`` is the closed-form minimiser of the output error ``‖(W − W′)Xᵀ‖² = trace(ΔW G ΔWᵀ)`` over
rank-r ``W′`` (SVD-LLM): with ``G = L Lᵀ``, truncate the SVD of ``W·L`` and fold ``L⁻¹`` back. The same
optimum is ``P_r W`` with ``P_r`` the projector on the top-r eigenvectors of the output covariance
``W G Wᵀ``, which needs neither ``L`` nor its inverse; this module uses that form when ``out <= in``
(q/k/v/o/down) and the Cholesky form (triangular solves, never an explicit inverse) when ``out > in``
(gate/up, lm_head), choosing whichever symmetric eigenproblem is smaller. For ``out <= in`` the output
covariance can also be measured directly, ``C = Σ_tokens y yᵀ`` of the linear's outputs ``y = W x``
(:class:`OutputCovariance`): ``out²`` products per token instead of ``in²`` (down_proj: 576² instead
of 1536² for SmolLM2, 4096² instead of 14336² for Mistral-7B), the same optimum. All maths runs in float64 on
the weight's device; factors come back in the weight's dtype and are balanced (``‖up[:, i]‖ =
‖down[i]‖``), which keeps them well scaled for low-precision storage and for gradient refits.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

DAMPING_START = 1e-6      # first diagonal damping, relative to mean(diag(G))
DAMPING_GROWTH = 10.0
DAMPING_TRIES = 8         # 1e-6 ... 10 x mean(diag(G)), then the eigendecomposition fallback
# LAPACK eigen/Cholesky solvers on CPU run single-threaded: on 2 cores their many small synchronised steps
# gain little from a second thread and slow down 5-50x when the cores are shared (measured).
CPU_SOLVER_THREADS = 1


@contextmanager
def solver_threads(device: torch.device) -> Iterator[None]:
    """Run the enclosed LAPACK calls with ``CPU_SOLVER_THREADS`` threads on CPU (no-op on GPU)."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before <= CPU_SOLVER_THREADS:
        yield
        return
    torch.set_num_threads(CPU_SOLVER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FactorizationError(ValueError):
    """Bad input to a factorisation (rank, shapes, method, non-finite values)."""


@dataclass
class Factors:
    """``W ≈ up @ down (+ bias)``: ``up [out, r]``, ``down [r, in]``, ``bias [out]`` or None."""

    up: Tensor
    down: Tensor
    bias: Optional[Tensor] = None
    fit_error: Optional[float] = None  # relative output error on the statistics fitted (when the method knows it)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def merged(self) -> Tensor:
        """The rank-r weight ``up @ down`` [out, in] in the factors' dtype."""
        return self.up @ self.down

    def num_parameters(self) -> int:
        return self.up.numel() + self.down.numel() + (self.bias.numel() if self.bias is not None else 0)


# ----------------------------------------------------------------------------- whitening
class Whitening:
    """One input Gram ``G`` [in, in] prepared for factorising every linear that reads it.

    ``factor`` (lazy) is ``L`` with ``L Lᵀ = G + damping·I``: a Cholesky factor, with adaptive diagonal
    damping when ``G`` is not positive definite, or ``Q·diag(√λ)`` from a clamped eigendecomposition
    when even damping fails. Build one per Gram key and reuse it (q/k/v share one; gate/up share one).
    """

    def __init__(self, gram, device: Optional[torch.device] = None):
        gram = getattr(gram, "gram", gram)  # accept GramStats
        if not isinstance(gram, Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
            raise FactorizationError(f"gram must be a square [in, in] tensor, got {shape}")
        g = gram.to(device=device or gram.device, dtype=torch.float64)  # no copy when already there
        if not torch.isfinite(g).all():
            raise FactorizationError("gram has non-finite entries (NaN/inf); recollect the calibration statistics")
        self.gram = g  # symmetric; the solvers read its lower triangle only
        self.kind: Optional[str] = None   # "cholesky" or "eigh" once the factor is computed
        self.damping = 0.0                # absolute value added to the diagonal
        self._factor: Optional[Tensor] = None
        self._eig: Optional[tuple[Tensor, Tensor]] = None

    @property
    def in_features(self) -> int:
        return int(self.gram.shape[0])

    @property
    def device(self) -> torch.device:
        return self.gram.device

    @property
    def factor(self) -> Tensor:
        """``L`` [in, in] float64 with ``L Lᵀ ≈ G`` (lower-triangular unless ``kind == "eigh"``)."""
        if self._factor is None:
            self._compute()
        return self._factor

    @property
    def eigen_factor(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(Q, root)`` of the eigendecomposition fallback, ``L = Q·diag(root)``: ``Q`` [in, in] float64 the
        orthonormal eigenvectors of ``G`` (columns), ``root`` [in] float64 the square roots of its eigenvalues
        clamped at ``damping`` (in the units of ``x``, as ``G`` is in those of ``x xᵀ``); so
        ``(L Lᵀ)⁻¹ = Q·diag(1/root²)·Qᵀ`` and ``L⁻¹ = diag(1/root)·Qᵀ``. None when ``kind == "cholesky"``.
        Computes the factor first if needed."""
        self.factor
        return self._eig if self.kind == "eigh" else None

    def _compute(self) -> None:
        g = self.gram
        n = g.shape[0]
        scale = float(g.diagonal().mean().clamp_min(0))
        scale = scale if scale > 0 else 1.0  # an all-zero Gram whitens to the identity (plain SVD)
        eye = torch.eye(n, dtype=g.dtype, device=g.device)
        damping = 0.0
        for attempt in range(DAMPING_TRIES + 1):
            with solver_threads(g.device):
                L, info = torch.linalg.cholesky_ex(g + damping * eye if damping else g)
            if int(info) == 0 and torch.isfinite(L).all():
                self._factor, self.kind, self.damping = L, "cholesky", damping
                return
            damping = scale * DAMPING_START * DAMPING_GROWTH ** attempt
        with solver_threads(g.device):
            lam, q = torch.linalg.eigh(g)
        floor = scale * DAMPING_START
        lam = lam.clamp_min(floor)
        self._eig = (q, lam.sqrt())
        self._factor, self.kind, self.damping = q * lam.sqrt(), "eigh", floor

    def whiten(self, W: Tensor) -> Tensor:
        """``W·L`` [out, in] float64."""
        return W.to(self.device, torch.float64) @ self.factor

    def unwhiten(self, M: Tensor) -> Tensor:
        """``M·L⁻¹`` [k, in] float64, by a triangular solve (no inverse is ever formed)."""
        L = self.factor
        M = M.to(self.device, torch.float64)
        if self.kind == "eigh":
            q, root = self.eigen_factor
            return (M / root) @ q.T        # L = Q·diag(root), so L⁻¹ = diag(1/root)·Qᵀ
        with solver_threads(L.device):
            return torch.linalg.solve_triangular(L, M, upper=False, left=False)

    def output_covariance(self, W: Tensor) -> Tensor:
        """``W G Wᵀ`` [out, out] float64: the covariance of the layer's outputs (sum over tokens)."""
        W64 = W.to(self.device, torch.float64)
        return symmetric((W64 @ self.gram) @ W64.T)


def whitening(gram, device: Optional[torch.device] = None) -> Whitening:
    """Prepare a Gram [in, in] (tensor or ``GramStats``) for whitened factorisations; see ``Whitening``."""
    return gram if isinstance(gram, Whitening) else Whitening(gram, device=device)


# ----------------------------------------------------------------------------- helpers
def symmetric(M: Tensor) -> Tensor:
    """``(M + Mᵀ) / 2``: removes the rounding asymmetry of a product meant to be symmetric."""
    return (M + M.T) / 2


def _check_weight(W: Tensor) -> None:
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise FactorizationError(f"weight must be a 2-D [out, in] tensor, got "
                                 f"{tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__}")
    if not torch.isfinite(W).all():
        raise FactorizationError("weight has non-finite entries (NaN/inf)")


def _check_rank(W: Tensor, rank) -> int:
    max_rank = min(W.shape)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= max_rank:
        raise FactorizationError(f"rank {rank!r} is not allowed for a {W.shape[0]} x {W.shape[1]} weight; "
                                 f"allowed: an integer from 1 to {max_rank}")
    return int(rank)


def _top_eigvecs(M: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and the top-``rank`` eigenvectors of a symmetric PSD matrix."""
    with solver_threads(M.device):
        lam, vec = torch.linalg.eigh(M)
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    return lam, vec[:, :rank].contiguous()


def _balance(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each rank-1 term ``up[:, i] down[i]`` so both sides have the same norm (product unchanged)."""
    a, b = up.norm(dim=0), down.norm(dim=1)
    tiny = torch.finfo(up.dtype).tiny
    c = torch.where((a > tiny) & (b > tiny), (b.clamp_min(tiny) / a.clamp_min(tiny)).sqrt(), torch.ones_like(a))
    return up * c, down / c[:, None]


def factors_from(up: Tensor, down: Tensor, like: Tensor, bias: Optional[Tensor]) -> Factors:
    """Balanced ``Factors`` from float64 ``up [out, r]``, ``down [r, in]``, cast to ``like``'s dtype/device.

    Every factorisation ends here (one ``WhitenedBasis`` serves compression and rank allocation), so equal
    maths gives bit-identical factors.
    """
    up, down = _balance(up, down)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise FactorizationError("factorisation produced non-finite factors")  # defensive; should not happen
    dt, dev = like.dtype, like.device
    b = None if bias is None else bias.detach().to(device=dev, dtype=dt).clone()
    return Factors(up.to(dev, dt).contiguous(), down.to(dev, dt).contiguous(), b)


# ----------------------------------------------------------------------------- factorisations
def svd_factors(W: Tensor, rank: int, bias: Optional[Tensor] = None) -> Factors:
    """Plain truncated SVD: ``up = U_r S_r^½``, ``down = S_r^½ V_rᵀ`` (the best rank-r W′ in Frobenius norm)."""
    _check_weight(W)
    rank = _check_rank(W, rank)
    W64 = W.detach().to(torch.float64)
    if W.shape[0] <= W.shape[1]:
        _, U = _top_eigvecs(symmetric(W64 @ W64.T), rank)
        return factors_from(U, U.T @ W64, W, bias)
    _, V = _top_eigvecs(symmetric(W64.T @ W64), rank)
    return factors_from(W64 @ V, V.T.contiguous(), W, bias)


@dataclass
class OutputCovariance:
    """``cov = Σ_tokens y yᵀ`` [out, out] float64 of a linear's outputs ``y = W x`` over ``tokens`` tokens:
    ``W G Wᵀ`` measured without the input Gram (exact in exact arithmetic). Serves whitened factors of
    that one matrix (``out <= in``) and its output errors (:func:`relative_output_error`)."""

    cov: Tensor
    tokens: int = 0

    @property
    def out_features(self) -> int:
        return int(self.cov.shape[0])


class WhitenedBasis:
    """One matrix's whitened eigenproblem, solved once: its whitened singular values (descending) and its
    optimal factors at any rank by slicing. ``whitened_factors`` is ``WhitenedBasis(W, wh).factors(r)``,
    so a rank search and a compression give bit-identical factors. Holds one ``min(out, in)``-square
    float64 eigenvector matrix.

    ``out <= in``: the top-r eigenvectors ``U`` of ``W G Wᵀ`` give ``W′ = U Uᵀ W`` (no factor of ``G``
    needed, exact even for a singular ``G``); ``out > in``: right singular vectors ``V`` of ``W·L`` give
    ``W′ = (W L V)(Vᵀ L⁻¹)``.
    """

    def __init__(self, W: Tensor, gram):
        _check_weight(W)
        if isinstance(gram, OutputCovariance):
            self._from_output_covariance(W, gram)
            return
        self.whitening = wh = whitening(gram, device=W.device)
        if wh.in_features != W.shape[1]:
            raise FactorizationError(f"gram is {wh.in_features} x {wh.in_features} but the weight has "
                                     f"{W.shape[1]} input features")
        self.wide = W.shape[0] <= W.shape[1]
        self._solve(_whitened_gram(W, wh))

    def _from_output_covariance(self, W: Tensor, stats: "OutputCovariance") -> None:
        if W.shape[0] > W.shape[1]:
            raise FactorizationError(f"an output covariance serves only matrices with out <= in; this weight is "
                                     f"{W.shape[0]} x {W.shape[1]}: use its input Gram")
        if stats.out_features != W.shape[0]:
            raise FactorizationError(f"output covariance is {stats.out_features} x {stats.out_features} but the "
                                     f"weight has {W.shape[0]} outputs")
        self.whitening, self.wide = None, True
        self._solve(symmetric(stats.cov.to(W.device, torch.float64)))

    def _solve(self, M: Tensor) -> None:
        with solver_threads(M.device):
            lam, vec = torch.linalg.eigh(M)
        self.values = lam.flip(0).clamp_min(0).sqrt()   # whitened singular values, descending [min(out, in)]
        self.vectors = vec.flip(1)

    def error(self, rank: int) -> float:
        """Relative output error of the rank-``rank`` truncation on this basis's own tokens:
        ``Σ_{j>r} s_j² / Σ s_j²`` (exact arithmetic; the stored factors add their dtype's rounding)."""
        energy = self.values.square()
        total = float(energy.sum())
        return float(energy[rank:].sum()) / total if total > 0 else 0.0

    def factors(self, W: Tensor, rank: int, bias: Optional[Tensor] = None) -> Factors:
        """Optimal rank-``rank`` factors of ``W`` (the weight this basis was built from)."""
        rank = _check_rank(W, rank)
        wh = self.whitening
        W64 = W.detach().to(self.vectors.device, torch.float64)
        V = self.vectors[:, :rank].contiguous()
        if self.wide:
            f = factors_from(V, V.T @ W64, W, bias)
        else:
            f = factors_from(wh.whiten(W64) @ V, wh.unwhiten(V.T.contiguous()), W, bias)
        f.fit_error = self.error(rank)
        return f


def whitened_factors(W: Tensor, gram, rank: int, bias: Optional[Tensor] = None) -> Factors:
    """Activation-aware factors minimising ``trace((W−W′) G (W−W′)ᵀ)`` over rank-r ``W′`` (SVD-LLM closed form).

    ``gram`` is the input Gram [in, in] (tensor, ``GramStats`` or a prepared ``Whitening`` — pass the
    latter to reuse one Cholesky factor across linears reading the same input).
    """
    _check_weight(W)
    _check_rank(W, rank)
    return WhitenedBasis(W, gram).factors(W, rank, bias)


def whitened_singular_values(W: Tensor, gram) -> Tensor:
    """Singular values ``s_i`` of ``W·L`` (``L Lᵀ = G``), descending, float64 [min(out, in)].

    ``Σ_{i>r} s_i²`` is the output error ``‖(W − W_r)Xᵀ‖²`` of the rank-r whitened truncation and
    ``Σ s_i² = ‖W Xᵀ‖²``. Computed as square roots of eigenvalues of ``W G Wᵀ`` (or of ``(WL)ᵀWL``), so
    values below ~1e-7 of the largest carry little relative precision.
    """
    _check_weight(W)
    if isinstance(gram, OutputCovariance):  # its eigenvalues are the squared whitened singular values
        M = symmetric(gram.cov.to(W.device, torch.float64))
    else:
        M = _whitened_gram(W, gram)
    with solver_threads(M.device):
        lam = torch.linalg.eigvalsh(M)
    return lam.flip(0).clamp_min(0).sqrt()


def _whitened_gram(W: Tensor, gram) -> Tensor:
    """The smaller symmetric matrix whose eigenvalues are the squared whitened singular values of ``W``."""
    wh = whitening(gram, device=W.device)
    W64 = W.detach().to(wh.device, torch.float64)
    if W.shape[0] <= W.shape[1]:
        M = wh.output_covariance(W64)
    else:
        A = wh.whiten(W64)
        M = symmetric(A.T @ A)
    return M


def weight_singular_values(W: Tensor) -> Tensor:
    """Singular values of the weight itself, descending, float64 [min(out, in)] (via the smaller of
    ``W Wᵀ`` / ``Wᵀ W``: values below ~1e-7 of the largest carry little relative precision)."""
    _check_weight(W)
    W64 = W.detach().to(torch.float64)
    M = symmetric(W64 @ W64.T if W.shape[0] <= W.shape[1] else W64.T @ W64)
    with solver_threads(M.device):
        lam = torch.linalg.eigvalsh(M)
    return lam.flip(0).clamp_min(0).sqrt()


def relative_output_error(W: Tensor, W_hat: Tensor, gram) -> Optional[float]:
    """``trace(ΔW G ΔWᵀ) / trace(W G Wᵀ)`` = ``‖(W−W′)Xᵀ‖² / ‖WXᵀ‖²`` over the Gram's tokens (0 if both vanish).

    With an :class:`OutputCovariance` ``C`` instead of ``G`` the error is exact when ``W′ = M·W`` for some
    ``M`` [out, out] (every whitened factorisation of an ``out <= in`` matrix): ``trace((I−M) C (I−M)ᵀ)``;
    None when ``W′`` is not of that form (the output statistics cannot tell its error)."""
    if W.shape != W_hat.shape:
        raise FactorizationError(f"weight shapes differ: {tuple(W.shape)} vs {tuple(W_hat.shape)}")
    if isinstance(gram, OutputCovariance):
        return _error_from_outputs(W, W_hat, gram)
    g = getattr(gram, "gram", gram)  # GramStats / Whitening / tensor
    g = g.to(W.device, torch.float64)
    W64 = W.detach().to(torch.float64)
    dW = W64 - W_hat.detach().to(W.device, torch.float64)
    num = float(((dW @ g) * dW).sum())
    den = float(((W64 @ g) * W64).sum())
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den


def _error_from_outputs(W: Tensor, W_hat: Tensor, stats: OutputCovariance) -> Optional[float]:
    C = stats.cov.to(W.device, torch.float64)
    W64, H64 = W.detach().to(torch.float64), W_hat.detach().to(W.device, torch.float64)
    # W′ = M W  =>  M = W′ Wᵀ (W Wᵀ)⁻¹ (W has full row rank when out <= in, generically)
    try:
        M = torch.linalg.solve(W64 @ W64.T, W64 @ H64.T).T
    except RuntimeError:
        return None
    if float((H64 - M @ W64).norm()) > 1e-6 * max(float(H64.norm()), 1e-30):
        return None
    D = torch.eye(M.shape[0], dtype=M.dtype, device=M.device) - M
    num, den = float(((D @ C) * D).sum()), float(C.diagonal().sum())
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den
