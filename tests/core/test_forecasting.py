"""pr.forecast for a model with exogenous inputs: the horizon-1 mean equals the exact Kalman prediction."""

import pytest
import torch

import ppl_rnn as pr
from ppl_rnn.errors import DataError


def test_forecast_with_inputs_matches_kalman_prediction(float64):
    model = pr.models.ElmanSSM(3, 1, input_dim=2, activation="identity", seed=3)
    u = torch.randn(2, 41, 2, generator=torch.Generator().manual_seed(0))
    sim = model.simulate(40, 2, inputs=u[:, :40], seed=0)
    fc = pr.forecast(model, sim.observations, horizon=1, inputs=u, num_samples=4000, seed=1)
    post = pr.infer(model, sim.observations, inputs=u[:, :40], method=pr.inference.KalmanFilter())
    p = model.linear_gaussian()
    m = post.mean[:, -1] @ p.A.T + p.b + u[:, 40] @ p.B.T
    P = p.A @ post.cov[:, -1] @ p.A.T + p.Q
    mean_y = m @ p.C.T + p.d
    var_y = torch.einsum("oh,bhk,ok->bo", p.C, P, p.C) + torch.diagonal(p.R)
    se = (var_y / 4000).sqrt()
    assert ((fc.mean[:, 0] - mean_y).abs() < 5 * se).all()
    # the inputs change the forecast: dropping the future input must shift it
    u2 = u.clone()
    u2[:, 40] += 5.0
    fc2 = pr.forecast(model, sim.observations, horizon=1, inputs=u2, num_samples=4000, seed=1)
    assert not torch.allclose(fc.mean, fc2.mean)


def test_forecast_requires_future_inputs(float64):
    model = pr.models.ElmanSSM(2, 1, input_dim=1, activation="identity")
    u = torch.randn(1, 20, 1)
    sim = model.simulate(20, 1, inputs=u, seed=0)
    with pytest.raises(DataError, match="inputs"):
        pr.forecast(model, sim.observations, horizon=3, inputs=None)
    with pytest.raises(DataError, match="inputs"):
        pr.forecast(model, sim.observations, horizon=3, inputs=u)  # covers T, not T + horizon
