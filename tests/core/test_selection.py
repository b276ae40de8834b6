"""Choosing among fits by their forecasts of the training tail (ppl_rnn.workbench.selection)."""

import types

import numpy as np
import pytest
import torch
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DataError


@pytest.fixture
def setup(float64):
    truth = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, weight_scale=1.1, seed=3)
    y = truth.simulate(300, 1, seed=1).observations
    wrong = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, weight_scale=1.1, seed=5)
    blurred = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, weight_scale=1.1, seed=3)
    blurred.set_noise_scales(obs=torch.tensor([0.8], dtype=torch.float64))
    return truth, wrong, blurred, y


def _exact_tail(m, y, v):
    d = prepare(m, y)
    with torch.no_grad():
        return float(kalman_filter(m.linear_gaussian(), d.observations, d.mask).log_lik[:, -v:].sum()) / v


def test_picks_the_generating_model_and_ranks_like_the_exact_tail_evidence(setup):
    truth, wrong, blurred, y = setup
    fit_like = types.SimpleNamespace(model=blurred)  # FitResults are accepted (their .model is used)
    sel = pr.select_by_forecast({"wrong": wrong, "truth": truth, "blurred": fit_like}, y, validation_steps=100,
                                horizons=(1, 3), num_samples=100)
    assert sel.attrs["best"] == "truth" and sel.attrs["best_index"] == 1
    assert list(sel.candidate.values) == ["wrong", "truth", "blurred"]
    assert sel.score_rank.sel(candidate="truth") == 1
    assert float(sel.mean_crps.sel(candidate="truth")) == pytest.approx(float(sel.crps.sel(candidate="truth").mean()))
    exact = [_exact_tail(m, y, 100) for m in (wrong, truth, blurred)]
    np.testing.assert_allclose(sel.tail_logev_per_step.values, exact, atol=1e-9)  # linear: exact Kalman
    by_ev = pr.select_by_forecast([wrong, truth, blurred], y, validation_steps=100, horizons=1, score="logev",
                                  num_samples=20)
    assert list(by_ev.score_rank.values) == list(np.argsort(np.argsort(-np.asarray(exact))) + 1)
    assert by_ev.attrs["best"] == "1" and by_ev.attrs["score"] == "logev"


def test_bad_arguments(setup):
    truth, wrong, _, y = setup
    with pytest.raises(ConfigurationError, match="empty"):
        pr.select_by_forecast([], y, validation_steps=50)
    with pytest.raises(DataError, match="validation_steps"):
        pr.select_by_forecast([truth], y, validation_steps=299)
    with pytest.raises(DataError, match="largest horizon"):
        pr.select_by_forecast([truth], y, validation_steps=5, horizons=(1, 10))
    with pytest.raises(ConfigurationError, match="score"):
        pr.select_by_forecast([truth], y, validation_steps=50, score="rmse")
    with pytest.raises(ConfigurationError, match="validation_steps"):
        pr.select_by_forecast([truth], y, validation_steps=0)
