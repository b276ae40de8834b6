"""LinearAR with the order chosen by AIC on the training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference.reference import LinearAR, Persistence
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.workbench.evaluate import evaluate


def _ar_series(phi, T, seed, c=0.2, sigma=0.3):
    rng = np.random.default_rng(seed)
    p = len(phi)
    y = np.zeros(T + 200)
    for t in range(p, len(y)):
        y[t] = c + sum(phi[i] * y[t - 1 - i] for i in range(p)) + sigma * rng.normal()
    return torch.tensor(y[200:], dtype=torch.float64).reshape(1, -1, 1)


def test_aic_finds_the_order_and_the_coefficients():
    phi = [0.6, -0.5, 0.3]  # stationary AR(3)
    y = _ar_series(phi, 3000, seed=0)
    model = ElmanSSM(2, 1).double()
    fit = pr.fit(model, y, method=LinearAR(order="aic", max_order=12))
    sel = fit.diagnostics["order_selection"][0]
    (p,) = fit.diagnostics["order"]
    assert p == int(np.argmin(sel["aic"])) + 1 and sel["max_order"] == 12
    assert p == 3, sel["aic"]
    assert fit.model.order == 3
    np.testing.assert_allclose(fit.model.phi[0].numpy(), phi, atol=0.05)
    # the lower orders are clearly worse by AIC, the higher ones pay their extra parameters
    assert sel["aic"][1] - sel["aic"][2] > 50 and min(sel["aic"][3:]) > sel["aic"][2] - 5


def test_aic_order_beats_a_too_small_order_on_held_out_data():
    y = _ar_series([0.6, -0.5, 0.3], 1500, seed=1)
    tr, te = y[:, :1000], y[:, 1000:]
    model = ElmanSSM(2, 1).double()
    scores = {}
    for order in ("aic", 1):
        fit = pr.fit(model, tr, method=LinearAR(order=order, max_order=10))
        scores[order] = float(evaluate(fit.model, tr, te, horizons=[1])["heldout_logev_per_step"])
    assert scores["aic"] > scores[1] + 0.05, scores


def test_aic_max_order_is_capped_for_short_series_and_options_are_checked():
    y = _ar_series([0.5], 40, seed=2)
    fit = pr.fit(ElmanSSM(2, 1).double(), y, method=LinearAR(order="aic", max_order=30))
    assert fit.diagnostics["order_selection"][0]["max_order"] == 10  # a quarter of 40 steps
    assert "aic" in repr(LinearAR(order="aic"))
    with pytest.raises(ConfigurationError, match="aic"):
        LinearAR(order="bic")
    with pytest.raises(ConfigurationError, match="max_order"):
        LinearAR(order="aic", max_order=0)


def test_a_float64_reference_model_takes_float64_data_without_a_cast():
    """The AR model has buffers only: its dtype comes from them (no float32 cast, no PrecisionWarning)."""
    import warnings

    from ppl_rnn.data import PrecisionWarning, model_dtype, prepare

    y = _ar_series([0.5], 200, seed=3)
    fit = pr.fit(ElmanSSM(2, 1).double(), y, method=LinearAR(order=2))
    assert model_dtype(fit.model) == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        assert prepare(fit.model, y).observations.dtype == torch.float64


# ---- the reference rows are scored as their own models (issue 28, point 1) -------------------------------------
def _two_sines(T=1500, noise=0.002, seed=0, dims=1, seqs=1):
    """A smooth series on which a least-squares AR's residual variance is tiny (0.002 noise against a unit
    signal): a regularising noise of 1e-3 of the scale on the companion form's lags and emission (the scoring
    before issue 28) moves the held-out score by about 0.04 nats/step here."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    y = np.stack([np.stack([np.sin(2 * np.pi * (t + 7 * b + 3 * d) / (50 + 9 * d)) + 0.5 * np.sin(2 * np.pi * t / 17)
                            for d in range(dims)], -1) for b in range(seqs)])
    return torch.tensor(y + noise * rng.normal(size=y.shape), dtype=torch.float64)


def _np_conditional(y, T1, p, kind):
    """Independent oracle, numpy only: per dimension, the reference's fit on the training part (rows with all
    ``p`` lags inside it, pooled over sequences) and the Gaussian conditional density of every test step given
    its past. ``kind="ar"``: least squares with intercept, variance = RSS / (n - p - 1); ``"rw"``: persistence,
    mean = last value, variance = mean squared one-step difference. Returns per-step log densities ``(B, T2, D)``
    and the predictive means and sds."""
    y = y.numpy()
    B, T, D = y.shape
    lp, mu, sd = (np.zeros((B, T - T1, D)) for _ in range(3))
    for d in range(D):
        def rows(lo, hi, d=d):  # targets t in [lo, hi): lags (B*(hi-lo), p), targets
            X = np.concatenate([np.stack([y[b, lo - i:hi - i, d] for i in range(1, p + 1)], 1) for b in range(B)])
            return X, np.concatenate([y[b, lo:hi, d] for b in range(B)])
        X, z = rows(p, T1)
        if kind == "ar":
            A = np.c_[X, np.ones(len(z))]
            coef = np.linalg.lstsq(A, z, rcond=None)[0]
            s2 = np.sum((z - A @ coef) ** 2) / (len(z) - p - 1)
            Xt, zt = rows(T1, T)
            m = np.c_[Xt, np.ones(len(zt))] @ coef
        else:
            s2 = np.mean((z - X[:, 0]) ** 2)
            Xt, zt = rows(T1, T)
            m = Xt[:, 0]
        lp[..., d] = (-0.5 * np.log(2 * np.pi * s2) - 0.5 * (zt - m) ** 2 / s2).reshape(B, -1)
        mu[..., d] = m.reshape(B, -1)
        sd[..., d] = np.sqrt(s2)
    return lp, mu, sd


@pytest.mark.parametrize("kind, dims, seqs, p", [("ar", 1, 1, 6), ("ar", 2, 2, 3), ("rw", 1, 1, 1), ("rw", 2, 2, 1)],
                         ids=["AR(6)", "AR(3)-2d-2seq", "persistence", "persistence-2d-2seq"])
def test_reference_row_scores_its_own_conditional_likelihood(kind, dims, seqs, p):
    """The yardstick's held-out log-evidence of a reference row is the reference model's own likelihood of the
    test steps given the past, computed here independently with numpy least squares (to 1e-6 in total; before
    issue 28 the AR(6) row read +3.561 nats/step against its own +3.520), and its forecasts are that model's:
    one-step draws with the exact predictive mean and variance, CRPS that of the Gaussian predictive."""
    from scipy.stats import norm

    y = _two_sines(dims=dims, seqs=seqs)
    T1 = 1000
    tr, te = y[:, :T1], y[:, T1:]
    method = LinearAR(order=p) if kind == "ar" else Persistence()
    fit = pr.fit(ElmanSSM(2, dims).double(), tr, method=method)
    ev = evaluate(fit.model, tr, te, horizons=[1, 5], num_samples=400, seed=0)
    lp, mu, sd = _np_conditional(y, T1, p, kind)
    assert ev.attrs["evidence_method"] == "kalman" and float(ev.heldout_logev_se) == 0.0
    assert float(ev.heldout_logev) == pytest.approx(lp.sum(), abs=1e-6)
    np.testing.assert_allclose(ev.heldout_log_lik.values, lp.sum(-1), atol=1e-8)
    # one-step draws (draw, sequence, time, obs) come from N(mu, sd^2): the state (the last p values) is known
    # exactly, so the pooled z-scores are independent N(0, 1) draws
    z = (ev.onestep_y.values - mu[None]) / sd[None]
    n = z.size
    assert abs(z.mean()) < 6 / np.sqrt(n)
    assert abs(z.var() - 1) < 6 * np.sqrt(2 / n)
    # the horizon-1 CRPS is that of the exact Gaussian predictive (up to the sample estimator's noise)
    zt = (te.numpy() - mu) / sd  # CRPS of N(mu, sd^2) at y, closed form (Gneiting & Raftery 2007)
    exact_crps = (sd * (zt * (2 * norm.cdf(zt) - 1) + 2 * norm.pdf(zt) - 1 / np.sqrt(np.pi))).mean()
    assert float(ev.crps.sel(horizon=1)) == pytest.approx(exact_crps, rel=0.01)


def test_reference_row_marginalises_a_missing_lag_exactly():
    """A missing test value is integrated out under the AR itself: for AR(1) the step after a gap has the
    two-step predictive N(c + phi (c + phi y_{m-1}), sigma^2 (1 + phi^2)) (closed form, computed here from the
    fitted coefficients), and the gap's own step contributes nothing."""
    y = _ar_series([0.7], 400, seed=4)
    tr, te = y[:, :300], y[:, 300:].clone()
    te[0, 40] = float("nan")  # t = 340
    fit = pr.fit(ElmanSSM(2, 1).double(), tr, method=LinearAR(order=1))
    phi, c, s = float(fit.model.phi[0, 0]), float(fit.model.c[0]), float(fit.model.sigma[0])
    ev = evaluate(fit.model, tr, te, horizons=[1], num_samples=50, seed=0)
    ll = ev.heldout_log_lik.values[0]
    yy = y[0, :, 0].numpy()

    def logn(x, m, v):
        return -0.5 * np.log(2 * np.pi * v) - 0.5 * (x - m) ** 2 / v

    assert ll[40] == 0.0
    assert ll[41] == pytest.approx(logn(yy[341], c + phi * (c + phi * yy[339]), s**2 * (1 + phi**2)), abs=1e-9)
    assert ll[39] == pytest.approx(logn(yy[339], c + phi * yy[338], s**2), abs=1e-9)
    assert ll[42] == pytest.approx(logn(yy[342], c + phi * yy[341], s**2), abs=1e-9)
