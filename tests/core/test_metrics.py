"""Forecast metrics (ppl_rnn.workbench.metrics) against an independent implementation (scoringrules, for CRPS)
and hand computations (MASE, weighted quantile loss, coverage); the yardstick's Dataset reports exactly them."""

import numpy as np
import pytest
import torch
from ppl_rnn.models import ElmanSSM

from ppl_rnn.workbench.evaluate import evaluate, metric_names
from ppl_rnn.workbench.metrics import (
    COVERAGE_LEVELS,
    WQL_LEVELS,
    crps_samples,
    interval_coverage,
    mase,
    naive_scale,
    weighted_quantile_loss,
)


def test_crps_matches_scoringrules_fair_ensemble_estimator():
    sr = pytest.importorskip("scoringrules")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, 3, generator=g, dtype=torch.float64) * 2 + 0.5
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ref = sr.crps_ensemble(y.numpy(), x.numpy(), m_axis=0, estimator="fair", backend="numpy")
    np.testing.assert_allclose(crps_samples(x, y).numpy(), ref, rtol=1e-12, atol=1e-14)
    # and not the biased energy estimator (1/S^2 pair average), which differs by E|X-X'|/(2S)
    nrg = sr.crps_ensemble(y.numpy(), x.numpy(), m_axis=0, estimator="nrg", backend="numpy")
    assert np.abs(crps_samples(x, y).numpy() - nrg).min() > 1e-3


def test_interval_coverage_by_hand():
    x = torch.arange(101, dtype=torch.float64)[:, None].expand(101, 5)  # quantile q of 0..100 is 100 q
    y = torch.tensor([4.0, 5.0, 50.0, 95.0, 96.0], dtype=torch.float64)
    every = torch.ones(5, dtype=torch.bool)
    assert interval_coverage(x, y, every, 0.9) == pytest.approx(3 / 5)  # [5, 95]: 5, 50, 95 (ends included)
    assert interval_coverage(x, y, every, 0.5) == pytest.approx(1 / 5)  # [25, 75]: 50
    assert interval_coverage(x, y, torch.tensor([True, True, False, True, True]), 0.9) == pytest.approx(2 / 4)
    assert np.isnan(interval_coverage(x, y, torch.zeros(5, dtype=torch.bool), 0.9))


def test_weighted_quantile_loss_by_hand():
    # target 2 with draws {1,..,5}: quantiles 0.1/0.5/0.9 (linear) are 1.4, 3, 4.6;
    # target -1 with draws {-3,..,1}: -2.6, -1, 0.6; sum |y| = 3.
    # q=0.1: 0.1*0.6 + 0.1*1.6 = 0.22 -> 2*0.22/3;  q=0.5: 0.5*1 + 0 = 0.5 -> 1/3;
    # q=0.9: 0.1*2.6 + 0.1*1.6 = 0.42 -> 0.84/3;  mean = 0.76/3
    x = torch.stack([torch.arange(1.0, 6.0), torch.arange(-3.0, 2.0)], 1).double()
    y = torch.tensor([2.0, -1.0], dtype=torch.float64)
    w = weighted_quantile_loss(x, y, torch.ones(2, dtype=torch.bool), (0.1, 0.5, 0.9))
    np.testing.assert_allclose(w.numpy(), [0.44 / 3, 1 / 3, 0.84 / 3], rtol=1e-12)
    assert float(w.mean()) == pytest.approx(0.76 / 3, rel=1e-12)
    # a masked-out target leaves both sums: only target 2 -> q=0.5: 2*0.5/2 = 0.5
    w1 = weighted_quantile_loss(x, y, torch.tensor([True, False]), (0.5,))
    assert float(w1[0]) == pytest.approx(0.5)
    assert WQL_LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # GluonTS's default quantiles


def test_mase_by_hand():
    # series 0: training 1, 3, 2, 5 -> naive one-step |2|, |1|, |3|: scale 2; seasonal m = 2: |1|, |2|: 1.5
    # series 1: training 0, 0, 1, 1 -> |0|, |1|, |0|: scale 1/3; m = 2: |1|, |1|: 1
    train = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)[..., None]  # (B,T,D)
    ok = torch.ones_like(train, dtype=torch.bool)
    s = naive_scale(train, ok)
    np.testing.assert_allclose(s.numpy(), [[2.0], [1 / 3]])
    np.testing.assert_allclose(naive_scale(train, ok, season=2).numpy(), [[1.5], [1.0]])
    ok2 = ok.clone()
    ok2[0, 2] = False  # y_2 missing in series 0: only the pair (1, 3) is left
    assert float(naive_scale(train, ok2)[0, 0]) == pytest.approx(2.0)
    # targets (time, B, D): series 0 at two times with medians 3 and 7 against 4 and 6 (errors 1, 1);
    # series 1 at the first time, median 2 against 1 (error 1; the second time is missing)
    med = torch.tensor([[[3.0], [2.0]], [[7.0], [0.0]]], dtype=torch.float64)  # (2, B, D)
    y = torch.tensor([[[4.0], [1.0]], [[6.0], [0.0]]], dtype=torch.float64)
    m = torch.tensor([[[True], [True]], [[True], [False]]])
    draws = med[None] + torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1)  # median = med
    assert mase(draws, y, m, s) == pytest.approx((1 / 2 + 1 / 2 + 1 / (1 / 3)) / 3)
    assert np.isnan(mase(draws, y, m, torch.zeros_like(s)))  # no usable scale


def test_evaluate_reports_the_metrics_of_its_own_draws(float64):
    """End to end: at horizon 1 the yardstick's draws are in the Dataset (``onestep_y``), so its MASE, wQL and
    coverages can be recomputed here with numpy alone — with missing entries in the training and test parts."""
    m = ElmanSSM(2, 2, activation="identity", process_noise=0.4, obs_noise=0.3, seed=3)
    y = m.simulate(160, 2, seed=1).observations.clone()
    y[0, 10, 1] = float("nan")
    y[1, 130, 0] = float("nan")
    tr, te = y[:, :120], y[:, 120:]
    ev = evaluate(m, tr, te, horizons=(1, 5), num_samples=300, seed=0)
    assert set(metric_names) <= set(ev.data_vars)
    X = ev.onestep_y.values  # (draw, sequence, time, obs)
    yt = te.numpy()
    ok = ~np.isnan(yt)
    trn = tr.numpy()
    d = np.abs(trn[:, 1:] - trn[:, :-1])  # NaN where either end is missing
    scale = np.nanmean(d, axis=1)  # (B, D)
    med = np.quantile(X, 0.5, axis=0)
    want_mase = np.mean((np.abs(yt - med) / scale[:, None, :])[ok])
    assert float(ev.mase.sel(horizon=1)) == pytest.approx(want_mase, rel=1e-10)
    wql = []
    for q in WQL_LEVELS:
        u = yt - np.quantile(X, q, axis=0)
        wql.append(2 * np.sum(np.where(u >= 0, q * u, (q - 1) * u)[ok]) / np.sum(np.abs(yt[ok])))
    assert float(ev.mean_wql.sel(horizon=1)) == pytest.approx(np.mean(wql), rel=1e-10)
    for lvl in COVERAGE_LEVELS:
        lo, hi = np.quantile(X, [(1 - lvl) / 2, (1 + lvl) / 2], axis=0)
        want = np.mean(((yt >= lo) & (yt <= hi))[ok])
        assert float(ev[f"coverage_{round(100 * lvl)}"].sel(horizon=1)) == pytest.approx(want, abs=1e-12)
        # a calibrated (the generating) model: near nominal over the 2 x 40 x 2 - 1 entries
        assert abs(want - lvl) < 4 * np.sqrt(lvl * (1 - lvl) / ok.sum()) + 0.02
    assert float(ev.mase.sel(horizon=5)) > float(ev.mase.sel(horizon=1))  # errors grow with the lead
