"""LinearAR with the order chosen by AIC on the training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference.reference import LinearAR
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
