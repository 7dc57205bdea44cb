"""svd / whitened factorisations: exactness at full rank, optimality, the Gram error formula, singular Grams."""
import pytest
import torch

from lowrank_core import methods
from lowrank_core.decompose import (FactorizationError, Factors, relative_output_error, svd_factors,
                                    whitened_factors, whitened_singular_values, whitening)


def factorize(W, rank, method, gram=None, bias=None):
    """A registered method's closed form (the plug-in interface the pipeline calls)."""
    return methods.get(method).factorize(W, rank, gram=gram, bias=bias)


def _data(out_f, in_f, tokens=400, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=dtype) / in_f ** 0.5
    # correlated, anisotropic inputs (like real activations: a few large directions)
    mix = torch.randn(in_f, in_f, generator=g) * torch.logspace(0, -2, in_f)
    X = (torch.randn(tokens, in_f, generator=g) @ mix.T).to(dtype)
    return W, X, (X.double().T @ X.double())


SHAPES = [(48, 32), (32, 48), (40, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_reproduces_the_layer(shape, method):
    W, X, G = _data(*shape)
    f = factorize(W, min(shape), method, gram=G)
    assert f.up.shape == (shape[0], min(shape)) and f.down.shape == (min(shape), shape[1])
    assert f.up.dtype == W.dtype == f.down.dtype
    torch.testing.assert_close(X @ f.merged().T, X @ W.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_whitened_beats_svd_at_every_rank(shape):
    W, X, G = _data(*shape)
    for r in range(1, min(shape) + 1):
        e_svd = relative_output_error(W, svd_factors(W, r).merged(), G)
        e_wh = relative_output_error(W, whitened_factors(W, G, r).merged(), G)
        assert e_wh <= e_svd + 1e-6, (r, e_wh, e_svd)
    assert relative_output_error(W, whitened_factors(W, G, 4).merged(), G) < \
        0.9 * relative_output_error(W, svd_factors(W, 4).merged(), G)


def test_svd_is_the_frobenius_optimum():
    W, _, _ = _data(30, 20)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    for r in (1, 5, 19):
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(svd_factors(W, r).merged().double(), best, rtol=1e-4, atol=1e-5)


def test_gram_error_equals_measured_error():
    W, X, G = _data(24, 36)
    W_hat = svd_factors(W, 5).merged()
    Wd, Xd = W.double(), X.double()
    measured = ((Xd @ (Wd - W_hat.double()).T) ** 2).sum() / ((Xd @ Wd.T) ** 2).sum()
    assert relative_output_error(W, W_hat, G) == pytest.approx(float(measured), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_discarded_whitened_energy_is_the_truncation_error(shape):
    W, _, G = _data(*shape, dtype=torch.float64)
    s = whitened_singular_values(W, G)
    assert s.shape == (min(shape),) and bool((s[:-1] >= s[1:]).all())
    for r in (1, 3, min(shape) // 2):
        predicted = float((s[r:] ** 2).sum() / (s ** 2).sum())
        assert relative_output_error(W, whitened_factors(W, G, r).merged(), G) == pytest.approx(predicted, rel=1e-8)


def test_whitened_singular_values_match_svd_of_w_times_cholesky():
    W, _, G = _data(20, 30, dtype=torch.float64)
    L = torch.linalg.cholesky(G)
    torch.testing.assert_close(whitened_singular_values(W, G), torch.linalg.svdvals(W @ L), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_singular_gram_gives_finite_factors(shape):
    W, X, _ = _data(*shape)
    X[:, :5] = 0  # dead input features
    few = X[: shape[1] // 3]  # fewer tokens than features: rank-deficient Gram
    for G in (X.double().T @ X.double(), few.double().T @ few.double(), torch.zeros(shape[1], shape[1],
                                                                                   dtype=torch.float64)):
        for r in (1, min(shape)):
            f = whitened_factors(W, G, r)
            assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
            assert f.up.abs().max() < 1e3 and f.down.abs().max() < 1e3
        assert torch.isfinite(whitened_singular_values(W, G)).all()
    # on the calibration tokens themselves, full rank is still exact
    G = few.double().T @ few.double()
    f = whitened_factors(W, G, min(shape))
    torch.testing.assert_close(few @ f.merged().T, few @ W.T, rtol=1e-3, atol=1e-4)


def test_whitening_damps_a_singular_gram_and_is_reusable():
    _, X, _ = _data(8, 32, tokens=10)
    wh = whitening(X.double().T @ X.double())
    L = wh.factor
    assert wh.kind == "cholesky" and wh.damping > 0
    assert torch.isfinite(L).all()
    M = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(wh.unwhiten(M) @ L, M, rtol=1e-6, atol=1e-6)
    W = torch.randn(64, 32)
    a, b = whitened_factors(W, wh, 6), whitened_factors(W, wh.gram, 6)
    torch.testing.assert_close(a.merged(), b.merged())
    assert wh.factor is L  # computed once


def test_eigh_fallback_when_cholesky_keeps_failing(monkeypatch):
    _, X, G = _data(8, 16)
    import lowrank_core.decompose as dec

    monkeypatch.setattr(dec.torch.linalg, "cholesky_ex",
                        lambda A: (torch.full_like(A, float("nan")), torch.tensor(1)))
    wh = dec.Whitening(G)
    L = wh.factor
    assert wh.kind == "eigh"
    torch.testing.assert_close(L @ L.T, G, rtol=1e-6, atol=1e-6 * float(G.diagonal().mean()))
    M = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(wh.unwhiten(M) @ L, M, rtol=1e-6, atol=1e-6)
    W = torch.randn(40, 16)
    e = relative_output_error(W, whitened_factors(W, wh, 4).merged(), G)
    s = whitened_singular_values(W, G)
    assert e == pytest.approx(float((s[4:] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


def test_factors_are_balanced_and_keep_dtype_and_bias():
    W, _, G = _data(32, 48)
    bias = torch.randn(32)
    f = factorize(W.to(torch.bfloat16), 8, "whitened", gram=G, bias=bias)
    assert f.up.dtype == torch.bfloat16 and f.bias.dtype == torch.bfloat16 and f.rank == 8
    torch.testing.assert_close(f.bias.float(), bias, rtol=1e-2, atol=1e-2)
    g = svd_factors(W, 8)
    torch.testing.assert_close(g.up.norm(dim=0), g.down.norm(dim=1), rtol=1e-4, atol=1e-6)
    assert isinstance(g, Factors) and g.num_parameters() == 8 * (32 + 48)


def test_bad_inputs_raise_value_errors():
    W, _, G = _data(16, 24)
    with pytest.raises(ValueError, match="rank 17"):
        svd_factors(W, 17)
    with pytest.raises(ValueError, match="rank 0"):
        svd_factors(W, 0)
    with pytest.raises(ValueError, match="'lora'"):
        factorize(W, 4, "lora")
    with pytest.raises(ValueError, match="needs the input Gram"):
        factorize(W, 4, "whitened")
    with pytest.raises(ValueError, match="24 input features"):
        whitened_factors(W, G[:10, :10], 4)
    with pytest.raises(ValueError, match="non-finite"):
        whitened_factors(W, G * float("nan"), 4)
    with pytest.raises(FactorizationError):
        svd_factors(torch.randn(3, 4, 5), 2)


def test_whitened_fit_error_is_the_spectrum_tail_and_matches_the_stored_factors():
    """``Factors.fit_error`` (free: the tail of the whitened spectrum) equals the measured output error of the
    float32 factors on the same statistics, for the input-Gram and the output-covariance routes."""
    from lowrank_core.decompose import OutputCovariance, relative_output_error, whitened_factors
    g = torch.Generator().manual_seed(3)
    X = torch.randn(800, 96, generator=g) @ torch.randn(96, 96, generator=g)
    for out in (40, 160):   # wide (out <= in) and tall
        W = torch.randn(out, 96, generator=g)
        G = X.double().T @ X.double()
        f = whitened_factors(W, G, 24)
        assert f.fit_error == pytest.approx(relative_output_error(W, f.merged(), G), rel=1e-5)
        if out <= 96:
            Y = (X @ W.T).double()
            fo = whitened_factors(W, OutputCovariance(Y.T @ Y, 800), 24)
            assert fo.fit_error == pytest.approx(f.fit_error, rel=1e-5)
            assert relative_output_error(W, fo.merged(), G) == pytest.approx(f.fit_error, rel=1e-4)
