"""KalmanEM: exact EM for linear-Gaussian models (float64).

* the exact log-evidence trace is non-decreasing (EM's ascent property), with missing entries, inputs and
  several sequences, for the diagonal-noise ElmanSSM(identity) and the full-covariance LinearGaussianSSM
  (whose partially missing steps go through the imputation branch of the M-step);
* at a converged fit the gradient of the exact log-evidence (Kalman filter + autograd, an independent
  oracle) vanishes — a fixed point of EM is a stationary point of the likelihood;
* error cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanFilter
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.inference.kalman_em import KalmanEM
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError


def _monotone(le):
    d = np.diff(le)
    return float(d.min()) >= -1e-9 * np.abs(le).max()


def _elman_data(float64):
    true = ElmanSSM(2, 2, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    y = true.simulate(60, 2, seed=0).observations.clone()
    y[0, 5:9, 0] = float("nan")
    y[1, 20, :] = float("nan")
    return y


def test_trace_monotone_elman_identity_missing(float64):
    y = _elman_data(float64)
    m = ElmanSSM(2, 2, activation="identity", seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = pr.fit(m, y, method=KalmanEM(num_iterations=15, tol=0), seed=0)
    le = r.trace.log_evidence.values
    assert len(le) == 16 and r.evidence_kind == "exact"
    assert _monotone(le)
    assert le[-1] > le[0] + 50  # it actually learns (fails if the M-step is removed)
    # trace row k holds the exact evidence at the parameters of row k
    exact = float(pr.infer(r.model, y, method=KalmanFilter()).log_evidence.sum())
    assert exact == pytest.approx(le[-1], abs=1e-8)
    assert set(r.trace.data_vars) >= {"log_evidence", "objective", "wall_time_s", "W", "b", "C", "d", "q", "r"}
    assert r.trace.W.dims == ("iteration", "W_dim_0", "W_dim_1")
    np.testing.assert_allclose(r.trace.W.values[-1], r.model.W.detach().numpy())
    for k, v in m.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])


def test_trace_monotone_linear_gaussian_inputs_partial_missing(float64):
    u = torch.randn(2, 50, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lg = LinearGaussianSSM(2, 2, 1, B=torch.tensor([[0.5], [0.1]]), D=torch.tensor([[0.3], [0.0]]),
                           R=torch.tensor([[0.1, 0.05], [0.05, 0.2]]), seed=3)
    y = lg.simulate(50, 2, inputs=u, seed=1).observations.clone()
    y[0, 5:9, 0] = float("nan")  # partially missing steps: the imputation branch of the full-R update
    y[1, 20, :] = float("nan")
    m = LinearGaussianSSM(2, 2, 1, seed=7)
    r = pr.fit(m, y, inputs=u, method=KalmanEM(num_iterations=12, tol=0), seed=0)
    le = r.trace.log_evidence.values
    assert _monotone(le)
    assert le[-1] > le[0] + 20
    # B and D were learned towards the truth from zero
    assert float(r.model.D.detach()[0, 0]) > 0.1


def test_converged_fit_is_stationary(float64):
    """At an EM fixed point the exact log-evidence has zero gradient (w.r.t. the regression parameters)."""
    true = ElmanSSM(1, 1, activation="identity", process_noise=0.5, obs_noise=0.3, seed=2)
    true.W = torch.tensor([[0.8]])
    y = true.simulate(80, 3, seed=4).observations
    r = pr.fit(true, y, method=KalmanEM(num_iterations=300, tol=1e-10), seed=0)
    m = r.model
    p = m.linear_gaussian()
    from ppl_rnn.data import prepare

    d = prepare(m, y)
    ll = kalman_filter(p, d.observations, d.mask).log_evidence.sum()
    names = ["W_unconstrained", "C_unconstrained", "d_unconstrained", "b_unconstrained", "r_unconstrained",
             "q_unconstrained"]
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(ll, [params[n] for n in names], allow_unused=True)
    gmax = max(float(g.abs().max()) for g in grads if g is not None)
    assert gmax < 0.05, gmax


def test_errors(float64):
    y = torch.randn(20, 1)
    with pytest.raises(ModelCapabilityError):
        pr.fit(ElmanSSM(2, 1), y, method=KalmanEM(num_iterations=2))  # tanh: not linear-Gaussian
    with pytest.raises(ConfigurationError):
        KalmanEM(tol=-1.0)
    with pytest.raises(ConfigurationError):
        KalmanEM(num_iterations=0)
    with pytest.raises(ConfigurationError, match="init"):
        KalmanEM(init="zeros")


@pytest.mark.parametrize("H, D, p", [(3, 1, 3), (5, 2, 2)])
def test_ar_start_begins_at_the_ar_fit_and_climbs(float64, H, D, p):
    """``init="ar"``: iteration 0 is the companion form of least-squares AR(H // D) fits, padded to H states
    (one decoupled state when H = 5, D = 2), so its exact log-evidence is the AR reference model's (computed
    by the independent path LinearAR -> ARStateSpace -> Kalman filter); EM then only climbs."""
    from ppl_rnn.inference.reference import LinearAR

    true = ElmanSSM(2, D, activation="identity", process_noise=0.3, obs_noise=0.05, seed=1)
    y = true.simulate(200, 2, seed=0).observations.clone()
    y[0, 30:33, 0] = float("nan")
    fit = pr.fit(ElmanSSM(H, D, activation="identity", seed=4), y, method=KalmanEM(num_iterations=5, tol=0, init="ar"))
    ar = pr.fit(ElmanSSM(1, D), y, method=LinearAR(order=p)).model
    exact_ar = float(pr.infer(ar, y, method=KalmanFilter()).log_evidence.sum())
    le = fit.trace.log_evidence.values
    assert le[0] == pytest.approx(exact_ar, rel=1e-9, abs=1e-6)
    assert _monotone(le) and le[-1] > le[0] + 1.0
    if D > 1:  # fewer states than outputs: no lag to put the AR fit in
        with pytest.raises(ConfigurationError, match="hidden_dim"):
            pr.fit(ElmanSSM(1, D, activation="identity"), y, method=KalmanEM(num_iterations=1, init="ar"))


@pytest.mark.parametrize("make", [lambda: ElmanSSM(3, 1, 1, activation="identity", seed=4),
                                  lambda: LinearGaussianSSM(3, 1, 1, seed=4)], ids=["elman", "linear_gaussian"])
def test_ar_start_with_inputs_starts_their_terms_at_zero(float64, make):
    """With inputs the AR start sets their terms to zero, so iteration 0 is still the AR fit; EM then learns
    the input terms (here the data depend on the input, so the climb is large)."""
    from ppl_rnn.inference.reference import LinearAR

    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 150, 1, generator=g, dtype=torch.float64)
    true = ElmanSSM(2, 1, 1, activation="identity", process_noise=0.2, obs_noise=0.05, seed=1)
    with torch.no_grad():
        true.U.mul_(5.0)
    y = true.simulate(150, 2, inputs=u, seed=0).observations
    fit = pr.fit(make(), y, inputs=u, method=KalmanEM(num_iterations=5, tol=0, init="ar"))
    ar = pr.fit(ElmanSSM(1, 1), y, method=LinearAR(order=3)).model
    le = fit.trace.log_evidence.values
    assert le[0] == pytest.approx(float(pr.infer(ar, y, method=KalmanFilter()).log_evidence.sum()), rel=1e-9, abs=1e-6)
    assert _monotone(le) and le[-1] > le[0] + 10.0
