"""Exact Kalman filter / RTS smoother / FFBS against independent oracles (float64):

* ``pyro.distributions.GaussianHMM`` (log-evidence and ``.filter()``),
* the brute-force joint Gaussian of :math:`(h_{0:T-1}, y_{0:T-1})` for small T (missing entries: the
  observed rows of the joint are kept, the others dropped), which also gives filtered, smoothed and
  lag-one cross-covariances by Gaussian conditioning,
* Monte Carlo (FFBS draws, forecasts) within a few standard errors.
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference import KalmanFilter, KalmanSmoother, kalman_filter, rts_smoother
from ppl_rnn.inference.kalman import ffbs_sample
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import ModelCapabilityError

from .gradcheck import central_difference, directional, random_direction

TOL = 1e-8


def _lg_model(H=2, D=2, I=0, seed=0):
    """A float64 LinearGaussianSSM with non-trivial everything (correlated Q, R, P0; offsets)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A0 = r(H, H)
    A = 0.8 * A0 / torch.linalg.eigvals(A0).abs().max()

    def spd(n, s):
        L = torch.tril(r(n, n)) * 0.3
        return L @ L.T + s * torch.eye(n, dtype=torch.float64)

    kw = dict(A=A, b=0.3 * r(H), C=r(D, H), d=r(D), Q=spd(H, 0.2), R=spd(D, 0.1), m0=r(H), P0=spd(H, 0.5))
    if I:
        kw.update(B=r(H, I), D=r(D, I))
    return LinearGaussianSSM(H, D, I, **kw).double()


def _params(model):
    p = model.linear_gaussian()
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}


def _brute(p, y, mask, u=None, upto=None):
    """Joint Gaussian of one sequence: y (T,D), mask (T,D), u (T,I)|None. Returns
    (log_evidence, post_mean (T,H), post_cov (T,H,T,H)) conditioning on the observed y_{0:upto}."""
    T, D = y.shape
    H = p["A"].shape[0]
    c = p["b"].expand(T, H).clone()
    e = p["d"].expand(T, D).clone()
    if u is not None:
        c = c + u @ p["B"].T
        if p["D"] is not None:
            e = e + u @ p["D"].T
    # h = mu_h + G eps, eps ~ N(0, blockdiag(P0, Q, ..., Q))
    mu = torch.zeros(T, H, dtype=y.dtype)
    mu[0] = p["m0"]
    for t in range(1, T):
        mu[t] = p["A"] @ mu[t - 1] + c[t]
    G = torch.zeros(T * H, T * H, dtype=y.dtype)
    for t in range(T):
        for s in range(t + 1):
            G[t * H:(t + 1) * H, s * H:(s + 1) * H] = torch.linalg.matrix_power(p["A"], t - s)
    E = torch.block_diag(p["P0"], *([p["Q"]] * (T - 1)))
    Sh = G @ E @ G.T
    Cb = torch.block_diag(*([p["C"]] * T))
    Sy = Cb @ Sh @ Cb.T + torch.block_diag(*([p["R"]] * T))
    Shy = Sh @ Cb.T
    my = (Cb @ mu.reshape(-1)) + e.reshape(-1)
    keep = mask.clone()
    if upto is not None:
        keep[upto + 1:] = False
    o = keep.reshape(-1)
    if not bool(o.any()):
        return torch.zeros((), dtype=y.dtype), mu, Sh.reshape(T, H, T, H)
    yo, myo, Syo, Shyo = y.reshape(-1)[o], my[o], Sy[o][:, o], Shy[:, o]
    logev = dist.MultivariateNormal(myo, Syo).log_prob(yo)
    K = Shyo @ torch.linalg.inv(Syo)
    pm = mu.reshape(-1) + K @ (yo - myo)
    pc = Sh - K @ Shyo.T
    return logev, pm.reshape(T, H), pc.reshape(T, H, T, H)


def _data(model, T=5, B=3, missing=False, seed=0):
    u = None
    if model.input_dim:
        u = torch.randn(B, T, model.input_dim, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    y = model.simulate(T, B, inputs=u, seed=seed).observations
    if missing:
        y = y.clone()
        y[0, 1, 0] = float("nan")  # one entry of a 2-d observation
        y[1, 2] = float("nan")  # a whole step
        y[-1, 0, -1] = float("nan")
        y[-1, -1, 0] = float("nan")
    return y, u


CASES = [(0, False), (1, False), (0, True), (2, True)]


@pytest.mark.parametrize("I,missing", CASES)
def test_filter_and_smoother_match_brute_force(I, missing):
    model = _lg_model(H=2, D=2, I=I, seed=3)
    y, u = _data(model, T=5, B=3, missing=missing)
    p = _params(model)
    mask = ~torch.isnan(y)
    y0 = torch.nan_to_num(y)
    f = kalman_filter(model.linear_gaussian(), y0, mask, u)
    s = rts_smoother(p["A"], f)
    post = pr.infer(model, y, method=KalmanSmoother(), inputs=u)
    T, H = 5, 2
    for b in range(3):
        ub = None if u is None else u[b]
        logev, pm, pc = _brute(p, y0[b], mask[b], ub)
        assert torch.allclose(f.log_evidence[b], logev, atol=TOL, rtol=0)
        assert torch.allclose(post.log_evidence[b], logev, atol=TOL, rtol=0)
        assert torch.allclose(s.mean[b], pm, atol=TOL, rtol=0)
        assert torch.allclose(post.mean[b], pm, atol=TOL, rtol=0)
        for t in range(T):
            assert torch.allclose(s.cov[b, t], pc[t, :, t, :], atol=TOL, rtol=0)
            if t > 0:  # lag-one cross-covariance Cov(h_t, h_{t-1} | y)
                assert torch.allclose(s.cross_cov[b, t], pc[t, :, t - 1, :], atol=TOL, rtol=0)
                assert torch.allclose(post.cross_cov[b, t], pc[t, :, t - 1, :], atol=TOL, rtol=0)
        assert torch.allclose(post.var[b], torch.stack([torch.diagonal(pc[t, :, t, :]) for t in range(T)]), atol=TOL)
        # filtering marginals p(h_t | y_{0:t}) and the per-step increments of the evidence
        prev = torch.zeros((), dtype=torch.float64)
        for t in range(T):
            lt, fm, fc = _brute(p, y0[b], mask[b], ub, upto=t)
            assert torch.allclose(f.filt_mean[b, t], fm[t], atol=TOL, rtol=0)
            assert torch.allclose(f.filt_cov[b, t], fc[t, :, t, :], atol=TOL, rtol=0)
            assert torch.allclose(f.log_lik[b, t], lt - prev, atol=TOL, rtol=0)
            prev = lt
    assert H == s.mean.shape[-1]


def _gaussian_hmm(p, T, u=None):
    """GaussianHMM with the same law as our model: a zero first transition matrix whose noise is
    N(m0, P0) makes its first state our h_0 (GaussianHMM transitions once before the first observation)."""
    H, D = p["A"].shape[0], p["C"].shape[0]
    B = 1 if u is None else u.shape[0]
    A = p["A"].T.expand(B, T, H, H).clone()
    A[:, 0] = 0.0
    loc = p["b"].expand(B, T, H).clone()
    oloc = p["d"].expand(B, T, D).clone()
    if u is not None:
        loc = loc + u @ p["B"].T
        oloc = oloc + u @ p["D"].T
    loc[:, 0] = p["m0"]
    cov = p["Q"].expand(B, T, H, H).clone()
    cov[:, 0] = p["P0"]
    init = dist.MultivariateNormal(torch.zeros(H, dtype=torch.float64), torch.eye(H, dtype=torch.float64))
    return dist.GaussianHMM(init, A, dist.MultivariateNormal(loc, cov), p["C"].T.expand(B, T, H, D),
                            dist.MultivariateNormal(oloc, p["R"].expand(B, T, D, D)))


@pytest.mark.parametrize("I", [0, 2])
def test_matches_pyro_gaussian_hmm(I):
    model = _lg_model(H=3, D=2, I=I, seed=5)
    T, B = 12, 3
    y, u = _data(model, T=T, B=B)
    p = _params(model)
    hmm = _gaussian_hmm(p, T, u)
    ref = hmm.log_prob(y)
    post = pr.infer(model, y, method=KalmanFilter(), inputs=u)
    assert post.kind == "filtering" and post.evidence_kind == "exact"
    assert torch.allclose(post.log_evidence, ref.expand(B), atol=TOL, rtol=0)
    final = hmm.filter(y)
    assert torch.allclose(post.mean[:, -1], final.loc.expand(B, -1), atol=TOL, rtol=0)
    assert torch.allclose(post.cov[:, -1], final.covariance_matrix.expand(B, -1, -1), atol=TOL, rtol=0)


def test_elman_identity_is_its_linear_gaussian_form():
    torch.manual_seed(0)
    m = ElmanSSM(3, 2, 1, activation="identity", process_noise=[0.2, 0.3, 0.4], obs_noise=[0.5, 0.6],
                 seed=2).double()
    m.b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    m.d = torch.tensor([0.4, -0.1], dtype=torch.float64)
    m.m0 = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    y, u = _data(m, T=6, B=3, missing=True)
    p = _params(m)
    post = pr.infer(m, y, method=KalmanSmoother(), inputs=u)
    for b in range(3):
        logev, pm, _ = _brute(p, torch.nan_to_num(y[b]), ~torch.isnan(y[b]), u[b])
        assert torch.allclose(post.log_evidence[b], logev, atol=TOL, rtol=0)
        assert torch.allclose(post.mean[b], pm, atol=TOL, rtol=0)


def _se_check(est, ref, se, k=5.0):
    z = ((est - ref).abs() / se).max()
    assert z < k, f"max deviation {float(z):.2f} SE"


def test_ffbs_samples_match_rts_moments():
    model = _lg_model(H=2, D=2, I=1, seed=11)
    y, u = _data(model, T=5, B=2, missing=True)
    post = pr.infer(model, y, method=KalmanSmoother(), inputs=u)
    N = 4000
    x = post.sample(N, seed=1)  # (N,B,T,H)
    assert x.shape == (N, 2, 5, 2)
    torch.testing.assert_close(post.sample(3, seed=4), post.sample(3, seed=4))
    _se_check(x.mean(0), post.mean, (post.var / N).sqrt())
    xc = x - post.mean
    cov = torch.einsum("nbti,nbtj->btij", xc, xc) / N
    sd = post.var.sqrt()
    se = ((sd.unsqueeze(-1) * sd.unsqueeze(-2)) ** 2 + post.cov**2).sqrt() / N**0.5
    _se_check(cov, post.cov, se)
    # lag-one cross-covariance Cov(h_t, h_{t-1} | y)
    cross = torch.einsum("nbti,nbtj->btij", xc[:, :, 1:], xc[:, :, :-1]) / N
    se_x = ((sd[:, 1:].unsqueeze(-1) * sd[:, :-1].unsqueeze(-2)) ** 2 + post.cross_cov[:, 1:] ** 2).sqrt() / N**0.5
    _se_check(cross, post.cross_cov[:, 1:], se_x)


def test_ffbs_is_reparameterised():
    """FFBS draws are differentiable functions of the parameters at fixed noise: (1) the autograd gradient of the
    draws' mean equals the mean of their per-draw central finite differences with the same seed (common random
    numbers); (2) that pathwise derivative estimates the derivative of the exact smoothed mean E[h | y] (RTS):
    equal within 6 Monte Carlo standard errors."""
    model = _lg_model(H=2, D=1, seed=2)
    y, _ = _data(model, T=4, B=1)
    mask = torch.ones_like(y, dtype=torch.bool)
    params = [p for p in model.parameters() if p.requires_grad]
    N = 4000

    def draws():
        p = model.linear_gaussian()
        torch.manual_seed(0)
        return ffbs_sample(p.A, kalman_filter(p, y, mask), N).sum((1, 2, 3))  # (N,) one scalar per draw

    def smoothed_mean_sum():
        p = model.linear_gaussian()
        return rts_smoother(p.A, kalman_filter(p, y, mask)).mean.sum()

    grads = torch.autograd.grad(draws().mean(), params, allow_unused=True)
    eps = 1e-5
    for seed in range(3):
        v = random_direction(params, seed)
        with torch.no_grad():  # per-draw central differences, the same noise on both sides
            for p_, v_ in zip(params, v, strict=True):
                p_.add_(eps * v_)
            xp = draws()
            for p_, v_ in zip(params, v, strict=True):
                p_.sub_(2 * eps * v_)
            xm = draws()
            for p_, v_ in zip(params, v, strict=True):
                p_.add_(eps * v_)
        d = (xp - xm) / (2 * eps)
        g = directional(grads, v)
        assert abs(g - float(d.mean())) < 1e-6 * (1 + abs(g)), (seed, g, float(d.mean()))
        fd = central_difference(smoothed_mean_sum, params, v)
        se = float(d.std()) / N**0.5
        assert abs(g - fd) < 6 * se, (seed, g, fd, se)


def test_huge_observations_raise_data_error_naming_scale_and_fix():
    """float32 Kalman filter/smoother on data around 1e19 and above: a DataError naming the scale and the fix
    (standardise or float64), not log_evidence = -inf; the same data in float64 and moderate data are fine."""
    m = ElmanSSM(2, 1, activation="identity", seed=0)
    base = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    for method in (KalmanFilter(), KalmanSmoother()):
        for scale in (1e19, 1e25):
            with pytest.raises(pr.DataError, match=r"(?s)reach \|y\| = .*e\+(19|2\d).*float32.*standardise.*double"):
                pr.infer(m, base * scale, method=method)
        assert torch.isfinite(pr.infer(m, base * 1e3, method=method).log_evidence).all()
        post = pr.infer(m.copy().double(), (base * 1e19).double(), method=method)
        assert torch.isfinite(post.log_evidence).all()


def test_non_finite_model_raises_divergence_error_not_data_error():
    """A non-finite log-likelihood whose cause is not the data's scale (here a NaN offset in the model) raises a
    DivergenceError naming the sequence and step, not -inf/NaN and not a DataError about the data."""
    m = ElmanSSM(2, 1, activation="identity", seed=0)
    m.b = torch.tensor([float("nan"), 0.0])
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    for method in (KalmanFilter(), KalmanSmoother(), pr.inference.ExtendedKalmanFilter()):
        with pytest.raises(pr.DivergenceError, match="sequence 0 at step 1.*not the cause"):
            pr.infer(m, y, method=method)


def test_float64_data_for_float32_model_warn_once(monkeypatch):
    """Data follow the model's dtype; float64 data for a float32 model say so once per process."""
    import ppl_rnn.data as data_mod

    monkeypatch.setattr(data_mod, "_warned_downcast", [False])
    m = ElmanSSM(2, 1, activation="identity", seed=0)
    y64 = torch.randn(10, 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.infer(m, y64.float(), method=KalmanFilter())  # float32 data: silent
    with pytest.warns(data_mod.PrecisionWarning, match="float64.*float32.*model.double"):
        post = pr.infer(m, y64, method=KalmanFilter())
    assert post.mean.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.infer(m, y64.numpy(), method=KalmanFilter())  # once per process
        pr.infer(m.copy().double(), y64, method=KalmanFilter())  # no cast


def test_kalman_smoother_refuses_nonlinear_elman():
    m = ElmanSSM(2, 1, activation="tanh")
    y = torch.randn(10, 1)
    with pytest.raises(ModelCapabilityError, match="nonlinear"):
        pr.infer(m, y, method=KalmanSmoother())
    with pytest.raises(ModelCapabilityError):
        pr.infer(m, y, method=KalmanFilter())


def test_forecast_mean_matches_kalman_predictive():
    model = _lg_model(H=2, D=2, seed=4)
    y, _ = _data(model, T=8, B=2)
    k, S = 4, 4000
    fc = pr.forecast(model, y, horizon=k, method=KalmanFilter(), num_samples=S, seed=0)
    assert fc.samples.shape == (S, 2, k, 2) and fc.mean.shape == (2, k, 2)
    p = _params(model)
    f = kalman_filter(model.linear_gaussian(), y, torch.ones_like(y, dtype=torch.bool))
    m, P = f.filt_mean[:, -1].detach(), f.filt_cov[:, -1].detach()
    for j in range(k):
        m = m @ p["A"].T + p["b"]
        P = p["A"] @ P @ p["A"].T + p["Q"]
        ym = m @ p["C"].T + p["d"]
        yv = torch.diagonal(p["C"] @ P @ p["C"].T + p["R"], dim1=-2, dim2=-1)
        _se_check(fc.mean[:, j], ym, (yv / S).sqrt())
        # the predictive variance too (SE of a variance estimate ~ var * sqrt(2/S))
        _se_check(fc.samples[:, :, j].var(0), yv, yv * (2.0 / S) ** 0.5)
