"""The nonlinear warm start (``MonteCarloEM(start=NARStart())``): random-feature autoregression + ``embed_nar``.

* ``fit_nar`` recovers a nonlinear autoregression's noise level (and beats the linear AR one step ahead);
  rows with a missing value are dropped;
* ``ElmanSSM.embed_nar`` is exact: the embedded tanh network's one-step mean equals the autoregression's
  prediction for any state consistent with the lags, and its noise-free rollout reproduces the
  autoregression's, up to the tanh distortion of the scaled lags (O(gain^2));
* the network's particle-filter log-evidence equals the autoregression's conditional Gaussian likelihood;
* bad sizes, inputs and activations get errors naming the fix; a model without the capability gets a
  ModelCapabilityError from MonteCarloEM(start=NARStart()).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ppl_rnn.inference import ParticleFilter, ParticleSmoother
from ppl_rnn.inference.acceptance import Acceptance
from ppl_rnn.inference.mcem import MonteCarloEM
from ppl_rnn.inference.nar_start import fit_nar, nar_design
from ppl_rnn.inference.starts import LinearStart, NARStart
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DataError, ModelCapabilityError


def _nar_series(T=1500, B=1, sd=0.1, seed=0):
    """A nonlinear AR(2): y_t = 1.2 y_{t-1} - 0.5 y_{t-2} + 0.8 tanh(2 y_{t-1}) - 0.6 y_{t-1}^3/(1 + y_{t-1}^2) + e_t."""
    g = np.random.default_rng(seed)
    y = np.zeros((B, T))
    for t in range(2, T):
        a = y[:, t - 1]
        y[:, t] = 0.6 * a - 0.5 * y[:, t - 2] + 0.8 * np.tanh(2 * a) - 0.6 * a**3 / (1 + a**2) + sd * g.standard_normal(B)
    return torch.tensor(y[:, 100:, None])


def _data(y):
    return Data(y, torch.isfinite(y), None)


def _random_params(D=2, p=3, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return pr.NARParams(c=0.1 * r(D), A=0.2 * r(D, p * D), P=0.5 * r(M, p * D), beta=0.5 * r(M), V=0.3 * r(D, M),
                        sigma=torch.full((D,), 0.05, dtype=torch.float64), y0=0.1 * r(D),
                        y0_sd=torch.zeros(D, dtype=torch.float64), x0=0.1 * r(p * D),
                        x0_sd=torch.full((p * D,), 0.1, dtype=torch.float64))


def _nar_mean(params, x):
    return params.c + x @ params.A.T + torch.tanh(x @ params.P.T + params.beta) @ params.V.T


def test_fit_nar_recovers_the_noise_level_and_beats_linear_ar(float64):
    y = _nar_series()
    d = _data(y)
    params = fit_nar(d, 2, 30, seed=0)
    X, Y = nar_design(d, 2)
    X, Y = torch.tensor(X), torch.tensor(Y)
    resid = Y - _nar_mean(params, X)
    sd = float(resid.std())
    assert abs(sd - 0.1) < 0.01, sd
    assert abs(float(params.sigma[0]) - sd) < 1e-3
    lin = np.linalg.lstsq(np.concatenate([np.ones((len(X), 1)), X.numpy()], 1), Y.numpy(), rcond=None)
    lin_sd = float(np.sqrt(lin[1][0] / len(X)))
    assert lin_sd > 1.3 * sd, (lin_sd, sd)
    assert params.order == 2 and params.num_features == 30


def test_nar_design_drops_rows_with_missing_values(float64):
    y = _nar_series(T=300, B=2)
    y[0, 50, 0] = float("nan")
    X, Y = nar_design(_data(y), 3)
    # sequence 0 loses the rows whose target or one of 3 lags is step 50 (4 rows); sequence 1 none
    assert len(Y) == 2 * (200 - 3) - 4
    assert np.isfinite(X).all() and np.isfinite(Y).all()
    with pytest.raises(DataError, match="needs at least"):
        fit_nar(_data(y[:, :30]), 3, 30)


@pytest.mark.parametrize("D,p,M", [(1, 1, 3), (1, 4, 5), (2, 3, 4)])
def test_embed_nar_one_step_mean_is_the_autoregression(float64, D, p, M):
    params = _random_params(D, p, M)
    g = 1e-4
    m = ElmanSSM(p * D + M, D)
    m.embed_nar(params, gain=g)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, p * D, generator=gen, dtype=torch.float64)  # x_{t-1} = (y_{t-1}, ..., y_{t-p})
    f_prev = torch.tanh(torch.randn(7, M, generator=gen, dtype=torch.float64))  # any previous features
    ell = g * (x[:, :D] - f_prev @ params.V.T)  # so that C h_{t-1} = y_{t-1}
    h = torch.cat([ell, g * x[:, D:], f_prev], 1)
    torch.testing.assert_close(h @ m.C.T + m.d, x[:, :D])
    y_next = m.transition_mean(1, h, None) @ m.C.T + m.d
    torch.testing.assert_close(y_next, _nar_mean(params, x), atol=1e-6, rtol=1e-6)


def test_embed_nar_rollout_matches_the_autoregression(float64):
    params = _random_params(1, 4, 6, seed=2)
    m = ElmanSSM(10, 1)
    m.embed_nar(params, gain=0.01)
    x = torch.tensor([[0.3, -0.2, 0.1, 0.4]], dtype=torch.float64)
    h = torch.cat([0.01 * (x[:, :1] - torch.zeros(1, 1)), 0.01 * x[:, 1:], torch.zeros(1, 6)], 1)
    ys, yn = [], []
    for _ in range(30):
        h = m.transition_mean(1, h, None).detach()
        ys.append(float((h @ m.C.T + m.d).detach()))
        nxt = _nar_mean(params, x)
        yn.append(float(nxt))
        x = torch.cat([nxt, x[:, :-1]], 1)
    assert np.max(np.abs(np.array(ys) - np.array(yn))) < 1e-3 * (1 + np.max(np.abs(yn)))


def test_embedded_network_log_evidence_is_the_autoregression_likelihood(float64):
    """The embedded network's evidence of steps p.. given the first p equals the autoregression's conditional
    Gaussian likelihood (the network adds r = 0.05 sigma of emission noise: a (1 + 0.0025) variance factor)."""
    y = _nar_series(T=700)
    d = _data(y)
    params = fit_nar(d, 2, 10, seed=0)
    m = ElmanSSM(12, 1)
    m.embed_nar(params, gain=0.01)
    X, Y = nar_design(d, 2)
    s2 = float(params.sigma[0]) ** 2 * (1 + 0.05**2)
    res = Y[:, 0] - _nar_mean(params, torch.tensor(X))[:, 0].numpy()
    ll_nar = float(np.sum(-0.5 * np.log(2 * math.pi * s2) - 0.5 * res**2 / s2))
    runs = [pr.infer(m, y, method=ParticleFilter(400), seed=s).diagnostics["log_lik"][0] for s in range(4)]
    le = torch.stack(runs).to(torch.float64)
    tail = le[:, 2:].sum(1)  # steps 2.. (the first two are the initial state's business)
    est, se = float(tail.mean()), float(tail.std() / 2)
    assert abs(est - ll_nar) < max(4 * se, 0.002 * abs(ll_nar) + 1.0), (est, se, ll_nar)


def test_embed_nar_checks_sizes_inputs_and_activation(float64):
    params = _random_params(1, 3, 4)
    with pytest.raises(ConfigurationError, match="hidden_dim = 3 x 1 \\+ 4 = 7"):
        ElmanSSM(8, 1).embed_nar(params)
    with pytest.raises(ModelCapabilityError, match="inputs"):
        ElmanSSM(7, 1, input_dim=1).embed_nar(params)
    with pytest.raises(ModelCapabilityError, match="tanh"):
        ElmanSSM(7, 1, activation="identity").embed_nar(params)
    with pytest.raises(ConfigurationError, match="obs_dim"):
        ElmanSSM(7, 2).embed_nar(params)


def test_mcem_nar_start_needs_the_capability_and_room_for_features(float64):
    y = _nar_series(T=300)
    with pytest.raises(ModelCapabilityError, match="embed_nar"):
        pr.fit(LinearGaussianSSM(3, 1), y, method=MonteCarloEM(start=NARStart(), num_iterations=1))
    with pytest.raises(ConfigurationError, match="hidden_dim > 4"):
        pr.fit(ElmanSSM(4, 1), y, method=MonteCarloEM(start=NARStart(order=4), num_iterations=1))


def test_mcem_nar_start_is_the_embedded_fit(float64):
    """Row 0 of the run is fit_nar's autoregression embedded at the default gain; the AIC order is used when
    init_order is None, and the features fill the remaining units."""
    y = _nar_series(T=400)
    r = pr.fit(ElmanSSM(14, 1), y, method=MonteCarloEM(start=NARStart(), num_iterations=1,
                                                        smoother=ParticleSmoother(100, 20)), seed=3)
    p = r.diagnostics["init_order"]
    assert r.diagnostics["init"] == "nar" and r.diagnostics["init_features"] == 14 - p
    ref = ElmanSSM(14, 1)
    ref.embed_nar(fit_nar(_data(y), p, 14 - p, seed=3), gain=0.01)
    start = r.diagnostics["initial_model"]
    torch.testing.assert_close(start.W.detach(), ref.W.detach())
    torch.testing.assert_close(start.C.detach(), ref.C.detach())


@pytest.mark.slow
def test_mcem_from_nar_start_never_ends_below_it_and_beats_the_linear_start(float64):
    """Acceptance-style (as for the linear warm start): on a nonlinear autoregressive series MCEM from the
    nonlinear start never ends below its start's held-out log-evidence (within 2 SE), and that start is
    clearly above the linear warm start's (the series' nonlinearity is what it adds)."""
    from .test_mcem_warm_start import _heldout

    y = _nar_series(T=2100)[0]
    y_tr = y[:1500]
    sm = ParticleSmoother(200, 50, backward="mcmc")
    r = pr.fit(ElmanSSM(10, 1), y_tr, method=MonteCarloEM(start=NARStart(order=2), num_iterations=3, smoother=sm,
                                                          acceptance=Acceptance(ascent_z=1.0)), seed=0)
    start, end = _heldout(r.diagnostics["initial_model"], y_tr, y), _heldout(r.model, y_tr, y)
    assert end[0] >= start[0] - 2 * math.hypot(start[1], end[1]) - 1e-3, (start, end)
    lin = pr.fit(ElmanSSM(2, 1), y_tr, method=MonteCarloEM(start=LinearStart(iterations=50), num_iterations=1,
                                                          smoother=sm, acceptance=Acceptance(ascent_z=1.0)), seed=0)
    lin_start = _heldout(lin.diagnostics["initial_model"], y_tr, y)
    assert start[0] > lin_start[0] + 0.1, (start, lin_start)
