"""The yardstick (ppl_rnn.workbench.evaluate) against exact Kalman answers."""

import math

import numpy as np
import pytest
import torch
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.workbench.evaluate import crps_samples, evaluate, onestep_predictive


@pytest.fixture
def lin(float64):
    m = ElmanSSM(3, 2, activation="identity", process_noise=0.4, obs_noise=0.3, weight_scale=1.2, seed=3)
    y = m.simulate(260, 2, seed=1).observations
    return m, y[:, :160], y[:, 160:]


def _exact_increments(m, y):
    from ppl_rnn.data import prepare

    d = prepare(m, y)
    with torch.no_grad():
        return kalman_filter(m.linear_gaussian(), d.observations, d.mask).log_lik


def test_heldout_logev_equals_kalman_conditional_evidence(lin):
    m, tr, te = lin
    ev = evaluate(m, tr, te, horizons=(1, 3), num_samples=50, seed=0)
    full = _exact_increments(m, torch.cat([tr, te], 1))
    exact = float(full[:, 160:].sum())
    assert ev.attrs["evidence_method"] == "kalman"
    assert float(ev.heldout_logev) == pytest.approx(exact, abs=1e-8)
    assert float(ev.heldout_logev_per_step) == pytest.approx(exact / (2 * 100), abs=1e-10)
    assert float(ev.heldout_logev_per_obs) == pytest.approx(exact / (2 * 100 * 2), abs=1e-10)
    np.testing.assert_allclose(ev.heldout_log_lik.values, full[:, 160:].numpy(), atol=1e-10)


def test_particle_yardstick_matches_kalman_within_standard_errors(lin):
    m, tr, te = lin
    tr, te = tr[:, :40], te[:, :30]
    exact = float(_exact_increments(m, torch.cat([tr, te], 1))[:, 40:].sum())
    vals = [float(evaluate(m, tr, te, horizons=1, filter="particle", num_particles=1000, num_samples=10,
                           seed=s).heldout_logev) for s in range(6)]
    se = np.std(vals, ddof=1) / math.sqrt(len(vals))
    assert abs(np.mean(vals) - exact) < 4 * se + 0.05


def test_crps_matches_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, s, y = 0.3, 1.7, torch.tensor([-1.0, 0.2, 2.5], dtype=torch.float64)
    x = mu + s * torch.randn(40000, 3, generator=g, dtype=torch.float64)
    z = (y - mu) / s
    nd = torch.distributions.Normal(0.0, 1.0)
    exact = s * (z * (2 * nd.cdf(z) - 1) + 2 * torch.exp(nd.log_prob(z)) - 1 / math.sqrt(math.pi))
    np.testing.assert_allclose(crps_samples(x, y).numpy(), exact.numpy(), rtol=0.02)
    # the unbiased pair average: two draws {0, 2} against y=1 -> E|X-y| = 1, E|X-X'| = 2 -> 0
    assert float(crps_samples(torch.tensor([[0.0], [2.0]]), torch.tensor([1.0]))) == pytest.approx(0.0)


def test_one_step_forecast_metrics_match_exact_predictive(lin):
    m, tr, te = lin
    ev = evaluate(m, tr, te, horizons=(1, 4), num_samples=2000, seed=0)
    f = kalman_filter(m.linear_gaussian(), torch.cat([tr, te], 1), torch.ones(2, 260, 2, dtype=torch.bool))
    p = m.linear_gaussian()
    with torch.no_grad():
        pm = f.pred_mean[:, 160:] @ p.C.T + p.d  # exact E[y_t | y_{0:t-1}]
    exact_rmse = float(torch.sqrt(((pm - te) ** 2).mean()))
    assert float(ev.rmse.sel(horizon=1)) == pytest.approx(exact_rmse, rel=0.03)
    # calibrated model: coverage near nominal (n = 400 entries at k=1, 4*SE tolerance)
    for k in (1, 4):
        n = int(ev.num_forecasts.sel(horizon=k))
        for lvl in (50, 90):
            c, q = float(ev[f"coverage_{lvl}"].sel(horizon=k)), lvl / 100
            assert abs(c - q) < 4 * math.sqrt(q * (1 - q) / n) + 0.03
    assert float(ev.crps.sel(horizon=4)) > float(ev.crps.sel(horizon=1))  # uncertainty grows with the lead


def test_missing_test_entries_are_skipped_like_kalman(lin):
    m, tr, te = lin
    te = te.clone()
    te[0, 5, 1] = float("nan")
    te[1, 7] = float("nan")
    ev = evaluate(m, tr, te, horizons=1, num_samples=20, seed=0)
    exact = float(_exact_increments(m, torch.cat([tr, te], 1))[:, 160:].sum())
    assert float(ev.heldout_logev) == pytest.approx(exact, abs=1e-8)
    assert ev.attrs["num_observed_test_entries"] == 400 - 3
    assert int(ev.num_forecasts.sel(horizon=1)) == 400 - 3


def test_onestep_draws_estimate_the_predictive_score(float64):
    m = ElmanSSM(2, 1, activation="identity", process_noise=0.5, obs_noise=0.5, seed=2)
    y = m.simulate(30, 1, seed=0).observations
    lp, yd, inc = onestep_predictive(m, y, num_samples=4000, seed=0)
    assert lp.shape == (4000, 1, 30) and yd.shape == (4000, 1, 30, 1)
    # importance reweighting of filtering draws by 1/p(y_t|h_t) gives 1/p(y_t|y_{0:t-1}) (what PSIS-LOO does);
    # a harmonic-mean estimate, so the tolerance is loose (measured: 0.13 max per step, 0.25 summed)
    est = -(torch.logsumexp(-lp, 0) - math.log(4000))
    assert float((est - inc).abs().max()) < 0.35
    assert abs(float((est - inc).sum())) < 1.0


def test_bad_arguments(lin):
    m, tr, te = lin
    with pytest.raises(ConfigurationError, match="horizon"):
        evaluate(m, tr, te, horizons=(1, 500))
    with pytest.raises(DataError, match="sequences"):
        evaluate(m, tr[:1], te)
    with pytest.raises(ConfigurationError, match="filter"):
        evaluate(m, tr, te, filter="ukf")
    assert callable(pr.evaluate)


def test_models_with_inputs(float64):
    m = ElmanSSM(2, 1, input_dim=1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=5)
    u = torch.sin(torch.arange(120, dtype=torch.float64) / 5)[None, :, None]
    y = m.simulate(120, 1, inputs=u, seed=0).observations
    ev = evaluate(m, y[:, :80], y[:, 80:], horizons=(1, 3), train_inputs=u[:, :80], test_inputs=u[:, 80:],
                  num_samples=400, seed=0)
    from ppl_rnn.data import prepare

    d = prepare(m, y, u)
    exact = kalman_filter(m.linear_gaussian(), d.observations, d.mask, d.inputs).log_lik[:, 80:].sum().detach()
    assert float(ev.heldout_logev) == pytest.approx(float(exact), abs=1e-8)
    f = kalman_filter(m.linear_gaussian(), d.observations, d.mask, d.inputs)
    with torch.no_grad():
        pm = f.pred_mean[:, 80:] @ m.C.T + m.d  # exact one-step predictive mean (uses u_t through the state)
    assert float(ev.rmse.sel(horizon=1)) == pytest.approx(float(torch.sqrt(((pm - y[:, 80:]) ** 2).mean())), rel=0.05)
    # the particle path uses the inputs too: it agrees with the exact value up to Monte Carlo error
    evp = evaluate(m, y[:, :80], y[:, 80:], horizons=(1,), train_inputs=u[:, :80], test_inputs=u[:, 80:],
                   filter="particle", num_particles=1000, num_samples=50, seed=0)
    assert float(evp.heldout_logev) == pytest.approx(float(exact), abs=1.5)
    with pytest.raises(DataError):
        evaluate(m, y[:, :80], y[:, 80:])
