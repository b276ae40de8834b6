"""MeanFieldEM (Ma & Ji 1998), float64.

* oracle: with W = 0 the hidden states are independent given nothing, so the mean-field recursion is exact:
  its surrogate log-likelihood equals the exact Kalman log-evidence (identity activation, missing entries);
* the fit improves the particle-filter log-evidence of a tanh network over the initial model and its
  surrogate rises; saturated targets do not produce NaN; error cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanFilter, ParticleFilter
from ppl_rnn.inference.meanfield_em import MeanFieldEM, meanfield_estep
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError


def test_meanfield_estep_exact_without_recurrence(float64):
    m = ElmanSSM(2, 2, activation="identity", process_noise=0.4, obs_noise=0.3, seed=3)
    m.W = torch.zeros(2, 2)
    m.b = torch.tensor([0.5, -0.2])
    m.s0 = torch.tensor([0.4, 0.4])  # = q: every step has the same prior, as mean-field assumes
    y = m.simulate(30, 2, seed=0).observations.clone()
    y[0, 3, 1] = float("nan")
    y[1, 7] = float("nan")
    _, _, ll = meanfield_estep(m, prepare(m, y))
    exact = pr.infer(m, y, method=KalmanFilter()).log_evidence
    torch.testing.assert_close(ll.sum(-1), exact, rtol=1e-10, atol=1e-10)
    # with recurrence the mean-field surrogate differs from the exact evidence (it ignores propagated variance)
    m.W = 0.8 * torch.eye(2)
    _, _, ll2 = meanfield_estep(m, prepare(m, y))
    assert abs(float(ll2.sum()) - float(pr.infer(m, y, method=KalmanFilter()).log_evidence.sum())) > 0.1


def test_fit_improves_tanh_network(float64):
    true = ElmanSSM(2, 1, process_noise=0.1, obs_noise=0.1, weight_scale=1.5, seed=1)
    y = true.simulate(150, 1, seed=0).observations
    m = ElmanSSM(2, 1, seed=5)
    r = pr.fit(m, y, method=MeanFieldEM(num_iterations=15, tol=0), seed=0)
    assert r.evidence_kind == "approximation" and r.method == "meanfield_em"
    obj = r.trace.objective.values
    assert obj.size == 16 and np.isfinite(obj).all() and obj[-1] > obj[0] + 10

    def pf(mod):
        return float(pr.infer(mod, y, method=ParticleFilter(1000), seed=1).log_evidence.sum())

    assert pf(r.model) > pf(m) + 10
    assert r.posterior.mean.shape == (1, 150, 2)


def test_saturated_targets_stay_finite(float64):
    m = ElmanSSM(2, 1, process_noise=0.05, obs_noise=0.01, seed=0)
    y = 50.0 * torch.sign(torch.sin(torch.arange(60.0) / 5))[:, None]  # forces targets to +-1
    r = pr.fit(m, y, method=MeanFieldEM(num_iterations=5, tol=0), seed=0)
    assert all(bool(torch.isfinite(p).all()) for p in r.model.parameters())


def test_errors(float64):
    with pytest.raises(ModelCapabilityError):
        pr.fit(LinearGaussianSSM(2, 1), torch.randn(10, 1), method=MeanFieldEM(num_iterations=2))
    with pytest.raises(ConfigurationError):
        MeanFieldEM(tol=-1)
    with pytest.raises(ConfigurationError):
        MeanFieldEM(num_iterations=0)
