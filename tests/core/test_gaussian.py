"""The Gaussian toolkit (ppl_rnn.gaussian) against brute-force Gaussian conditioning and autograd (float64)."""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import pytest
import torch

from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.gaussian import (
    NumericalJitterWarning,
    cholesky_pd,
    gaussian_moments,
    gaussian_sampler,
    kalman_update,
    linearize,
    matvec,
    psd_cholesky,
    safe_update,
    scalar_update,
    smoother_gain,
)


def _spd(n, s, g, batch=()):
    A = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return A @ A.transpose(-1, -2) * 0.3 + s * torch.eye(n, dtype=torch.float64)


def _problem(B=3, H=3, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H), _spd(H, 0.5, g, (B,)), r(B, D), r(D, H), r(D), _spd(D, 0.2, g)


def test_kalman_update_with_missing_entries_equals_conditioning_on_the_observed_subvector():
    m, P, y, C, e, R = _problem()
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    mn, Pn, ll = kalman_update(m, P, y, mask, C, e, R)
    for b in range(3):
        o = mask[b]
        if not bool(o.any()):  # fully missing: the prior, log-likelihood 0
            torch.testing.assert_close(mn[b], m[b], atol=1e-12, rtol=0)
            torch.testing.assert_close(Pn[b], P[b], atol=1e-12, rtol=0)
            assert float(ll[b]) == 0.0
            continue
        # joint of (h, y_o): cov(h, y_o) = P C_o^T, var(y_o) = C_o P C_o^T + R_oo
        Co, Roo = C[o], R[o][:, o]
        S = Co @ P[b] @ Co.T + Roo
        K = P[b] @ Co.T @ torch.linalg.inv(S)
        mu_y = Co @ m[b] + e[o]
        torch.testing.assert_close(mn[b], m[b] + K @ (y[b, o] - mu_y), atol=1e-12, rtol=0)
        torch.testing.assert_close(Pn[b], P[b] - K @ S @ K.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(ll[b], dist.MultivariateNormal(mu_y, S).log_prob(y[b, o]), atol=1e-12, rtol=0)


def test_scalar_update_equals_cholesky_update_values_and_gradients():
    m, P, y, C, e, R = _problem(B=4, H=3, D=1, seed=1)
    mask = torch.tensor([[True], [False], [True], [True]])
    C.requires_grad_(True)
    R.requires_grad_(True)
    a = kalman_update(m, P, y, mask, C, e, R)
    mf = mask.to(m.dtype)
    b = scalar_update(m, P, (y - matvec(C, m) - e) * mf, mf, C, R[..., 0], full=False)
    for x, z in zip(a, b, strict=True):
        torch.testing.assert_close(x, z, atol=1e-12, rtol=0)
    ga = torch.autograd.grad(sum(x.sum() for x in a), [C, R])
    gb = torch.autograd.grad(sum(x.sum() for x in b), [C, R])
    for x, z in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, z, atol=1e-10, rtol=0)
    # S <= 0 (a negative noise variance): the scalar path declines and the caller takes the general one
    assert scalar_update(m, P, y, mf, C.detach(), -100.0 * torch.ones(1, dtype=torch.float64), full=True) is None


def test_safe_update_jitters_a_singular_innovation_with_a_warning():
    m, P, y, C, e, _ = _problem(B=2, H=2, D=3, seed=2)
    R = torch.zeros(3, 3, dtype=torch.float64)  # S = C P C^T has rank 2 < 3
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.warns(NumericalJitterWarning, match="innovation covariance at step t=7"):
        mn, Pn, ll = safe_update(m, P, y, mask, C, e, R, t=7)
    assert torch.isfinite(mn).all() and torch.isfinite(ll).all()
    torch.linalg.cholesky(Pn + 1e-9 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(ModelCapabilityError, match="innovation covariance"):
        safe_update(m, P, y, mask, C, e, torch.full((3, 3), float("nan"), dtype=torch.float64))


def test_gaussian_moments_and_non_gaussian_error():
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(2, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    mu, cov = gaussian_moments(dist.Normal(loc, scale).to_event(1))
    torch.testing.assert_close(mu, loc)
    torch.testing.assert_close(cov, torch.diag_embed(scale**2))
    S = _spd(3, 0.3, g)
    mu, cov = gaussian_moments(dist.MultivariateNormal(loc, S))
    torch.testing.assert_close(cov, S.expand(2, 3, 3))
    W = torch.randn(3, 2, generator=g, dtype=torch.float64)
    mu, cov = gaussian_moments(dist.LowRankMultivariateNormal(loc, W, scale))
    torch.testing.assert_close(cov, W @ W.T + torch.diag_embed(scale))  # cov_diag is a variance
    with pytest.raises(ModelCapabilityError, match="Poisson"):
        gaussian_moments(dist.Poisson(scale).to_event(1), role="emission")


@pytest.mark.parametrize("K", [3, 12])  # the per-row backward loop (K <= 8) and torch.func.jacrev (K > 8)
def test_linearize_jacobian_equals_autograd_per_row(K):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(K, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)

    def cond(z):
        return dist.Normal(torch.tanh(z @ W.T), torch.exp(0.1 * z.sum(-1, keepdim=True)).expand(z.shape[:-1] + (K,))
                           ).to_event(1)

    mu, J, cov = linearize(cond, x)
    for b in range(5):
        ref = torch.autograd.functional.jacobian(lambda v: torch.tanh(v @ W.T), x[b])
        torch.testing.assert_close(J[b], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(mu, torch.tanh(x @ W.T))
    assert cov.shape == (5, K, K)
    with torch.no_grad():  # under no_grad: the same numbers, detached
        mu0, J0, _ = linearize(cond, x)
    assert not J0.requires_grad and not mu0.requires_grad
    torch.testing.assert_close(J0, J.detach())
    # an analytic Jacobian is used when given, autograd when it returns None
    _, J2, _ = linearize(cond, x, jacobian=lambda z: torch.zeros(z.shape[:-1] + (K, 4), dtype=z.dtype))
    assert float(J2.abs().sum()) == 0.0
    _, J3, _ = linearize(cond, x, jacobian=lambda z: None)
    torch.testing.assert_close(J3, J)


def test_smoother_gain_is_the_backward_conditional():
    """h_t ~ N(m, P), h_{t+1} = A h_t + N(0, Q): J from the joint's conditional Cov(h_t, h_{t+1}) Var(h_{t+1})^{-1}."""
    g = torch.Generator().manual_seed(5)
    P, Q = _spd(3, 0.4, g, (2,)), _spd(3, 0.2, g)
    A = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    Pp = A @ P @ A.transpose(-1, -2) + Q
    ref = (P @ A.transpose(-1, -2)) @ torch.linalg.inv(Pp)
    torch.testing.assert_close(smoother_gain(A, P, Pp), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(smoother_gain(A, P, Pp, torch.linalg.cholesky(Pp)), ref, atol=1e-12, rtol=0)


def test_cholesky_pd_and_gaussian_sampler():
    g = torch.Generator().manual_seed(6)
    S = _spd(3, 0.5, g, (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cholesky_pd(S), torch.linalg.cholesky(S))
    singular = torch.ones(3, 3, dtype=torch.float64)
    with pytest.warns(NumericalJitterWarning, match="test matrix at step t=2"):
        L = cholesky_pd(singular, what="test matrix", t=2)
    torch.testing.assert_close(L @ L.T, singular, atol=1e-10, rtol=0)
    mean = torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    N = 20000
    x = gaussian_sampler(mean, S)(N)
    assert x.shape == (N, 2, 3)
    se = (torch.diagonal(S, dim1=-2, dim2=-1) / N).sqrt()
    assert ((x.mean(0) - mean).abs() < 6 * se).all()
    xc = x - mean
    cov = torch.einsum("nbi,nbj->bij", xc, xc) / N
    sd = torch.diagonal(S, dim1=-2, dim2=-1).sqrt()
    se_c = ((sd.unsqueeze(-1) * sd.unsqueeze(-2)) ** 2 + S**2).sqrt() / N**0.5
    assert ((cov - S).abs() < 6 * se_c).all()


def test_psd_cholesky_repairs_a_slightly_indefinite_float32_covariance():
    # an EM covariance that lost definiteness in float32 rounding (eigenvalue -1e-6 of a unit-scale matrix): a
    # relative jitter of 1e-12 (the float64 start) is below float32's rounding and cannot repair it
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    S = (V @ torch.diag(torch.tensor([1.0, 0.7, 0.4, 0.1, -1e-6], dtype=torch.float64)) @ V.T).float()
    L = psd_cholesky(S)
    assert L.dtype == torch.float32 and bool(torch.isfinite(L).all())
    assert float((L @ L.T - S).abs().max()) < 1e-3  # the smallest jitter that works: ~1e-5 to 1e-4 here
    # float64 keeps its 1e-12 start: an exactly PSD matrix is factorised without jitter
    P = (V @ torch.diag(torch.tensor([1.0, 0.7, 0.4, 0.1, 0.05], dtype=torch.float64)) @ V.T)
    torch.testing.assert_close(psd_cholesky(P) @ psd_cholesky(P).T, P, rtol=0, atol=1e-12)
