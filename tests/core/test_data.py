"""Data validation: every kind of malformed input raises DataError naming the argument; NaN = missing;
nothing mutates the caller's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanSmoother
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare, validate_inputs, validate_observations
from ppl_rnn.errors import DataError


@pytest.fixture
def model():
    return ElmanSSM(2, 2, activation="identity", seed=0)


@pytest.fixture
def model_u():
    return ElmanSSM(2, 2, input_dim=1, activation="identity", seed=0)


def test_promotion_and_mask(model):
    y = torch.randn(7, 2)
    y[3, 1] = float("nan")
    d = prepare(model, y)
    assert d.observations.shape == (1, 7, 2) and d.mask.shape == (1, 7, 2) and d.inputs is None
    assert not bool(d.mask[0, 3, 1]) and int(d.mask.sum()) == 13 and d.num_observed == 13
    assert d.observations[0, 3, 1] == 0.0 and torch.isfinite(d.observations).all()
    assert (d.num_sequences, d.num_steps, d.obs_dim) == (1, 7, 2)
    assert torch.isnan(d.with_nan()[0, 3, 1]) and torch.equal(d.with_nan()[0, :3], y[:3])
    assert torch.isnan(y[3, 1])  # the caller's tensor still has its NaN


def test_numpy_and_lists_accepted(model):
    y = np.random.default_rng(0).normal(size=(2, 5, 2))
    d = prepare(model, y)
    assert d.observations.dtype == model.dtype and d.observations.shape == (2, 5, 2)
    d2 = prepare(model, y.tolist())
    assert torch.allclose(d2.observations, d.observations)
    d3 = prepare(model, y.astype(np.float32))
    assert d3.observations.dtype == model.dtype


def test_inputs_promoted_and_broadcast(model_u):
    y = torch.randn(3, 5, 2)
    d = prepare(model_u, y, torch.randn(5, 1))
    assert d.inputs.shape == (3, 5, 1) and torch.equal(d.inputs[0], d.inputs[2])


@pytest.mark.parametrize(
    "obs,match",
    [
        (torch.randn(10), r"observations.*rank 1"),
        (torch.randn(2, 3, 4, 2), r"observations.*rank 4"),
        (torch.randn(5, 3), r"observations.*obs_dim=2"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), r"observations.*inf"),
        (torch.tensor([[0.0, 1.0], [-float("inf"), 2.0]]), r"observations.*inf"),
        (torch.ones(5, 2, dtype=torch.int64), r"observations.*floating dtype"),
        (np.ones((5, 2), dtype=np.int32), r"observations.*floating dtype"),
        (torch.ones(5, 2, dtype=torch.bool), r"observations.*floating dtype"),
        (np.array([[1.0, 2.0], [3.0]], dtype=object), r"observations.*object"),
        ([[1.0, 2.0], [3.0]], r"observations"),  # ragged list
        (torch.zeros(0, 2), r"observations.*at least one"),
        (torch.zeros(0, 5, 2), r"observations.*at least one"),
        (None, r"observations is None"),
    ],
    ids=["rank1", "rank4", "obs_dim", "inf", "-inf", "int64", "np_int", "bool", "object", "ragged", "empty_T",
         "empty_B", "none"],
)
def test_malformed_observations(model, obs, match):
    with pytest.raises(DataError, match=match):
        pr.infer(model, obs, method=KalmanSmoother())
    with pytest.raises(ValueError):  # DataError is a ValueError
        prepare(model, obs)


def test_malformed_inputs(model, model_u):
    y = torch.randn(2, 5, 2)
    ks = KalmanSmoother()
    with pytest.raises(DataError, match=r"inputs is None.*input_dim=1"):
        pr.infer(model_u, y, method=ks)
    with pytest.raises(DataError, match=r"inputs given.*input_dim=0"):
        pr.infer(model, y, method=ks, inputs=torch.randn(2, 5, 1))
    for bad in (torch.randn(2, 5, 3), torch.randn(3, 5, 1), torch.randn(2, 4, 1), torch.randn(2, 6, 1),
                torch.randn(5), torch.randn(1, 2, 5, 1)):
        with pytest.raises(DataError, match=r"inputs has shape"):
            pr.infer(model_u, y, method=ks, inputs=bad)
    u = torch.randn(2, 5, 1)
    u[1, 2, 0] = float("nan")
    with pytest.raises(DataError, match=r"inputs contains NaN"):
        pr.infer(model_u, y, method=ks, inputs=u)
    u[1, 2, 0] = float("inf")
    with pytest.raises(DataError, match=r"inputs contains"):
        pr.infer(model_u, y, method=ks, inputs=u)
    with pytest.raises(DataError, match=r"inputs must have a floating dtype"):
        pr.infer(model_u, y, method=ks, inputs=torch.ones(2, 5, 1, dtype=torch.int64))


def test_malformed_mask(model):
    y = torch.randn(2, 5, 2)
    with pytest.raises(DataError, match=r"mask has shape"):
        model(y, mask=torch.ones(2, 5, 1, dtype=torch.bool))
    with pytest.raises(DataError, match=r"mask has shape"):
        model(y, mask=torch.ones(5, 5, 2, dtype=torch.bool))


def test_validators_copy_and_cast():
    y = torch.randn(4, 3, dtype=torch.float32)
    y[1, 1] = float("nan")
    obs, mask = validate_observations(y, obs_dim=3, dtype=torch.float64)
    assert obs.dtype == torch.float64 and obs.data_ptr() != y.data_ptr()
    assert torch.isnan(y[1, 1])
    obs[0, 0] = 99.0
    assert y[0, 0] != 99.0
    u = torch.randn(1, 4, 2)
    uu = validate_inputs(u, num_sequences=1, num_steps=4, input_dim=2)
    uu[0, 0, 0] = 99.0
    assert u[0, 0, 0] != 99.0
    assert validate_inputs(None, num_sequences=1, num_steps=4, input_dim=0) is None


def test_caller_tensors_not_mutated_by_infer():
    m = LinearGaussianSSM(2, 2, 1, seed=0)
    y = torch.randn(2, 6, 2)
    y[0, 2, 1] = float("nan")
    y[1, 4] = float("nan")
    u = torch.randn(2, 6, 1)
    y0, u0 = y.clone(), u.clone()
    post = pr.infer(m, y, method=KalmanSmoother(), inputs=u)
    assert torch.isfinite(post.log_evidence).all()
    assert torch.isnan(y[0, 2, 1]) and torch.isnan(y[1, 4]).all()
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(y0)) and torch.equal(u, u0)
