"""Paired forecast comparisons (ppl_rnn.workbench.paired) and the per-target losses evaluate keeps for them."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from ppl_rnn.models import ElmanSSM

from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.workbench.evaluate import evaluate
from ppl_rnn.workbench.paired import andrews_lag, forecast_difference, hac_mean_se


@pytest.fixture
def lin(float64):
    m = ElmanSSM(3, 2, activation="identity", process_noise=0.4, obs_noise=0.3, weight_scale=1.2, seed=3)
    y = m.simulate(260, 2, seed=1).observations
    return m, y[:, :160], y[:, 160:]


def _fake(losses: np.ndarray, horizon: int = 1) -> xr.Dataset:
    """An evaluate-like dataset whose per-target CRPS is ``losses`` ``(sequence, time)``."""
    B, T = losses.shape
    arr = losses[None, :, :, None]
    return xr.Dataset({"crps_by_target": (("horizon", "sequence", "time", "obs"), arr),
                       "sqerr_by_target": (("horizon", "sequence", "time", "obs"), arr ** 2)},
                      coords={"horizon": [horizon], "sequence": np.arange(B), "time": np.arange(100, 100 + T)})


def test_per_target_losses_reproduce_the_aggregates(lin):
    m, tr, te = lin
    te = te.clone()
    te[0, 5, 1] = float("nan")
    te[1, 20:23] = float("nan")
    ev = evaluate(m, tr, te, horizons=(1, 3), num_samples=40, seed=0)
    for h in (1, 3):
        c = ev.crps_by_target.sel(horizon=h).values
        s = ev.sqerr_by_target.sel(horizon=h).values
        assert np.nanmean(c) == pytest.approx(float(ev.crps.sel(horizon=h)), rel=1e-12)
        assert math.sqrt(np.nanmean(s)) == pytest.approx(float(ev.rmse.sel(horizon=h)), rel=1e-12)
        assert int(np.isfinite(c).sum()) == int(ev.num_forecasts.sel(horizon=h))
        assert np.isnan(c[:, :h - 1]).all() and np.isfinite(c[0, h - 1, 0])  # targets start at test index k-1
        assert np.isnan(c[0, 5, 1]) and np.isnan(c[1, 20:23]).all()


def _ar1_mean_sd(rho: float, sigma: float, n: int) -> float:
    """Exact sd of the sample mean of a stationary AR(1) with innovation sd sigma."""
    j = np.arange(1, n)
    var = sigma ** 2 / (1 - rho ** 2) * (n + 2 * ((n - j) * rho ** j).sum()) / n ** 2
    return math.sqrt(var)


def test_hac_interval_covers_the_mean_of_serially_correlated_differences():
    # d_t = AR(1), rho = 0.8, mean 0 (known). Over 200 seeds the 95% interval covers 0 in 90-98% of them and
    # the average SE is within 15% of the exact sd of the mean; the iid SE (lag 0) would cover ~60%.
    rho, sigma, n = 0.8, 1.0, 1000
    exact_sd = _ar1_mean_sd(rho, sigma, n)
    cover, cover_iid, ses = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        e = rng.normal(0, sigma, n + 200)
        d = np.zeros(n + 200)
        for t in range(1, n + 200):
            d[t] = rho * d[t - 1] + e[t]
        d = d[200:]
        base = rng.gamma(2.0, 1.0, n)
        r = forecast_difference(_fake((base + d)[None]), _fake(base[None]))
        mean, se = float(r.difference[0]), float(r.difference_se[0])
        assert mean == pytest.approx(d.mean(), abs=1e-12)
        cover.append(abs(mean) <= 1.96 * se)
        ses.append(se)
        _, se0, _ = hac_mean_se(d[None], 0)
        cover_iid.append(abs(mean) <= 1.96 * se0)
    assert 0.90 <= np.mean(cover) <= 0.98
    assert np.mean(ses) == pytest.approx(exact_sd, rel=0.15)
    assert np.mean(cover_iid) < 0.75


def test_hac_reduces_to_the_iid_standard_error_at_lag_zero():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 2.0, (3, 50))
    mean, se, n = hac_mean_se(d, 0)
    assert n == 150 and mean == pytest.approx(d.mean())
    assert se == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum()) / 150)
    assert andrews_lag(rng.normal(size=(1, 400)), 400) <= 3  # white noise: a short lag


def test_difference_finds_the_better_model_and_is_antisymmetric(lin):
    m, tr, te = lin
    other = ElmanSSM(3, 2, activation="identity", process_noise=0.4, obs_noise=0.3, weight_scale=1.2, seed=4)
    good = evaluate(m, tr, te, horizons=(1, 3), num_samples=60, seed=0)
    bad = evaluate(other, tr, te, horizons=(1, 3), num_samples=60, seed=0)
    r = forecast_difference(good, bad)
    assert list(r.horizon.values) == [1, 3]
    assert (r.z < -3).all() and (r.p_value < 0.01).all() and (r.ci95_high < 0).all()
    assert float(r.mean_a.sel(horizon=3)) == pytest.approx(float(good.crps.sel(horizon=3)), rel=1e-12)
    back = forecast_difference(bad, good, metric="sqerr", horizons=[3])
    fwd = forecast_difference(good, bad, metric="sqerr", horizons=[3])
    assert float(back.difference[0]) == pytest.approx(-float(fwd.difference[0]))
    assert float(back.difference_se[0]) == pytest.approx(float(fwd.difference_se[0]))
    assert float(fwd.mean_b[0]) == pytest.approx(float(bad.rmse.sel(horizon=3)) ** 2, rel=1e-12)
    same = forecast_difference(good, good)
    assert (same.difference == 0).all() and (same.p_value == 1).all()
    assert int(forecast_difference(good, bad, max_lag=0).lag[0]) == 0
    assert (r.lag.sel(horizon=3) >= 2).all()  # at least k - 1


def test_bad_arguments_name_the_fix(lin):
    m, tr, te = lin
    ev = evaluate(m, tr, te, horizons=(1, 3), num_samples=20, seed=0)
    with pytest.raises(DataError, match="Score the model again"):
        forecast_difference(ev.drop_vars("crps_by_target"), ev)
    with pytest.raises(DataError, match="different test parts"):
        forecast_difference(ev, ev.assign_coords(time=ev.time.values + 1))
    with pytest.raises(ConfigurationError, match="extra dims"):
        forecast_difference(xr.concat([ev, ev], "seed"), ev)
    with pytest.raises(ConfigurationError, match="metric"):
        forecast_difference(ev, ev, metric="rmse")
    with pytest.raises(ConfigurationError, match="common horizons"):
        forecast_difference(ev, ev, horizons=[2])
    with pytest.raises(ConfigurationError, match="max_lag"):
        forecast_difference(ev, ev, max_lag=-1)
    with pytest.raises(ConfigurationError, match="xarray.Dataset"):
        forecast_difference(torch.zeros(3), ev)
    with pytest.raises(DataError, match="all NaN"):
        forecast_difference(ev * np.nan, ev)
    te2 = te.clone()
    te2[0, 7] = float("nan")
    ev2 = evaluate(m, tr, te2, horizons=(1, 3), num_samples=20, seed=0)
    with pytest.raises(DataError, match="different targets"):
        forecast_difference(ev, ev2)


def test_independent_sequences_add_their_long_run_variances():
    # three independent AR(1) sequences (rho 0.6, n 400 each): the SE of the pooled mean is the exact
    # sqrt(sum_b n^2 var_b) / (3n) within 15% on average, and the 95% interval covers 0 in 90-98% of 200 seeds
    rho, n, B = 0.6, 400, 3
    exact = _ar1_mean_sd(rho, 1.0, n) / math.sqrt(B)
    cover, ses = [], []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        e = rng.normal(size=(B, n + 100))
        d = np.zeros_like(e)
        for t in range(1, n + 100):
            d[:, t] = rho * d[:, t - 1] + e[:, t]
        d = d[:, 100:]
        r = forecast_difference(_fake(d), _fake(np.zeros_like(d)))
        cover.append(abs(float(r.difference[0])) <= 1.96 * float(r.difference_se[0]))
        ses.append(float(r.difference_se[0]))
        assert int(r.num_targets[0]) == B * n
    assert 0.90 <= np.mean(cover) <= 0.98
    assert np.mean(ses) == pytest.approx(exact, rel=0.15)
