"""Paired forecast comparisons (ppl_rnn.workbench.paired) and the per-target losses evaluate keeps for them."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from ppl_rnn.models import ElmanSSM
from scipy.signal import lfilter

from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.workbench.evaluate import evaluate
from ppl_rnn.workbench.paired import andrews_lag, forecast_difference, hac_mean_se, mean_interval


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


def _ar1_batch(rho: float, n: int, S: int, seed) -> np.ndarray:
    """``(S, n)`` stationary Gaussian AR(1) series with unit innovations (vectorised)."""
    e = np.random.default_rng(seed).standard_normal((S, n))
    e[:, 0] /= math.sqrt(1 - rho ** 2)
    return lfilter([1.0], [1.0, -rho], e, axis=1)


@pytest.mark.parametrize("n", [300, 1000])
def test_interval_covers_persistent_ar1_differences(n):
    # 4000 AR(1) series of mean 0 per rho: the 95% interval covers 0 in at least 90% of them up to rho = 0.95
    # (Monte Carlo SE of a coverage near 0.9: sqrt(0.9 * 0.1 / 4000) = 0.0047). Measured (seeds below):
    # n = 300: 0.946, 0.940, 0.914; n = 1000: 0.949, 0.950, 0.938. The Newey-West interval with Andrews' lag
    # and 1.96 it replaces covered 0.91, 0.88, 0.78 (n = 300) and 0.93, 0.92, 0.87 (n = 1000).
    S = 4000
    for rho in (0.5, 0.8, 0.95):
        d = _ar1_batch(rho, n, S, [28, n, int(100 * rho)])
        r = mean_interval(d[:, None, :])
        assert r.mean.shape == (S,) and (r.n == n).all()
        cover = float((np.abs(r.mean) <= r.critical_value * r.se).mean())
        assert cover >= 0.9, (rho, n, cover)
        assert cover <= 0.97, (rho, n, cover)  # not bought by absurdly wide intervals
    # forecast_difference reports exactly this interval
    one = forecast_difference(_fake(d[:1] + 1.0), _fake(np.ones((1, n))))
    r0 = mean_interval(d[0])
    assert float(one.difference[0]) == pytest.approx(r0.mean, abs=1e-12)
    assert float(one.difference_se[0]) == pytest.approx(r0.se, rel=1e-9)
    assert float(one.ci95_high[0]) == pytest.approx(r0.mean + r0.critical_value * r0.se, rel=1e-9)
    assert float(one.ci95_low[0]) == pytest.approx(r0.mean - r0.critical_value * r0.se, rel=1e-9)
    assert int(one.lag[0]) == r0.lag and float(one.rho[0]) == pytest.approx(r0.rho)


def test_interval_parts_match_exact_answers():
    # the Bartlett sums are the Newey-West sums; kappa is E[V] / Var(sum d) under an AR(1), computed here by
    # brute force from the covariance matrix (two sequences, a gap); fixed-b critical values match Kiefer &
    # Vogelsang's (2005) Bartlett polynomial 1.96 + 2.9694 b + 0.4160 b^2 - 0.5324 b^3 scaled by
    # sqrt(E Q) = sqrt(1 - b + b^2/3) (SE normalised by its mean)
    rng = np.random.default_rng(5)
    d = rng.normal(size=(2, 40))
    d[1, 25:] = np.nan
    d[0, 7] = np.nan
    r = mean_interval(d, lag=4)
    mean, se_nw, n = hac_mean_se(d, 4)
    assert r.n == n == 64 and r.mean == pytest.approx(mean)
    assert r.se * math.sqrt(r.kappa) == pytest.approx(se_nw, rel=1e-10)
    lengths, M, rho = (39, 25), 5, r.rho
    cov = np.zeros((64, 64))
    cov[:39, :39] = rho ** np.abs(np.subtract.outer(np.arange(39), np.arange(39)))
    cov[39:, 39:] = rho ** np.abs(np.subtract.outer(np.arange(25), np.arange(25)))
    centre = np.eye(64) - 1.0 / 64
    ev = 0.0
    for start, m in zip((0, 39), lengths, strict=True):
        for s in range(-M + 1, m):
            a = np.zeros(64)
            a[start + max(s, 0):start + min(s + M, m)] = 1
            v = centre @ a
            ev += v @ cov @ v / M
    assert r.kappa == pytest.approx(ev / cov.sum(), rel=1e-10)
    z = np.random.default_rng(6).normal(size=200)
    for b in (0.1, 0.3, 0.5):
        cv = mean_interval(z, lag=int(b * 200) - 1).critical_value
        kv = 1.96 + 2.9694 * b + 0.4160 * b ** 2 - 0.5324 * b ** 3
        assert cv == pytest.approx(kv * math.sqrt(1 - b + b * b / 3), rel=0.02)
    assert mean_interval(z, lag=0).critical_value == pytest.approx(1.96, abs=0.02)
    # p-value and interval agree: the interval's end has p = 1 - level
    r = mean_interval(z, lag=30)
    shifted = mean_interval(z - r.mean + r.critical_value * r.se, lag=30)
    assert shifted.p_value == pytest.approx(0.05, abs=1e-3)
    with pytest.raises(ConfigurationError, match="lag must be"):
        mean_interval(z, lag=-1)
    with pytest.raises(ConfigurationError, match="level"):
        mean_interval(z, level=95)
    assert math.isnan(mean_interval(np.full((2, 5), np.nan)).se)
