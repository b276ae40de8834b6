"""Data set loaders: shapes, finiteness, metadata, splits, scaling, missing extras, the synthetic benchmark."""

from __future__ import annotations

import sys

import pytest
import torch
from ppl_rnn.models import ElmanSSM

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.workbench.datasets import DATASETS, Dataset, MissingExtraError, load


def _check_record(d: Dataset, shape, input_dim=0):
    assert isinstance(d, Dataset)
    assert tuple(d.values.shape) == shape and d.values.dtype == torch.get_default_dtype()
    assert torch.isfinite(d.values).all()
    if input_dim:
        assert d.inputs.shape == shape[:2] + (input_dim,) and torch.isfinite(d.inputs).all()
        assert d.input_units
    else:
        assert d.inputs is None
    for f in ("units", "source", "licence", "description"):
        assert isinstance(getattr(d, f), str) and getattr(d, f)
    assert d.name in DATASETS and d.name in repr(d)
    train, test = d.split()
    assert train.num_steps + test.num_steps == d.num_steps
    assert train.num_steps == (d.train_steps or round(0.8 * d.num_steps))
    assert torch.equal(torch.cat([train.values, test.values], 1), d.values)
    if input_dim:
        assert torch.equal(torch.cat([train.inputs, test.inputs], 1), d.inputs)
    tr2, te2 = d.train_test_split(0.5)
    assert tr2.num_steps == round(0.5 * d.num_steps) and tr2.units == d.units
    with pytest.raises(dataclass_error()):
        d.values = None
    return train, test


def dataclass_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_santafe_laser():
    d = load("santafe-laser")
    _check_record(d, (1, 10093, 1))
    assert "MIT" in d.licence and d.sampling_interval is None
    assert float(d.values.min()) >= 0 and float(d.values.max()) > 200  # raw integer intensities


def test_gas_furnace():
    d = load("gas-furnace")
    _check_record(d, (1, 296, 1), input_dim=1)
    assert d.sampling_interval == 9.0 and d.time_unit == "s"
    assert 45 < float(d.values.min()) and float(d.values.max()) < 62  # CO2 %
    assert abs(float(d.inputs[0, 0, 0]) + 0.109) < 1e-6 and abs(float(d.values[0, 0, 0]) - 53.8) < 1e-4


def test_sunspots_and_scaling():
    raw = load("sunspots")
    _check_record(raw, (1, 309, 1))
    assert raw.sampling_interval == 1.0 and raw.time_unit == "year" and raw.licence == "public domain"
    std = load("sunspots", scale="standard")
    train, _ = std.split()
    assert abs(float(train.values.mean())) < 1e-5 and abs(float(train.values.std(unbiased=False)) - 1) < 1e-5
    torch.testing.assert_close(std.values * std.scale + std.offset, raw.values)
    rob = load("sunspots", scale="robust", dtype=torch.float64)
    assert rob.values.dtype == torch.float64
    torch.testing.assert_close(float(rob.split()[0].values.median()), 0.0, atol=0.02, rtol=0)
    with pytest.raises(ConfigurationError, match="scale"):
        load("sunspots", scale="minmax")


def test_respiration():
    pytest.importorskip("biopeaks")
    d = load("respiration", duration_s=120)
    _check_record(d, (1, 3000, 1))
    assert d.sampling_interval == 0.04 and "GPL" in d.licence
    # robust scaling on the training part: median 0, IQR 1
    tr = d.split()[0].values.flatten()
    q25, q50, q75 = torch.quantile(tr.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert abs(float(q50)) < 0.01 and abs(float(q75 - q25) - 1) < 0.01
    # a later segment lies on the same 25 Hz grid as a longer load (raw units)
    seg = load("respiration", start_s=20.0, max_steps=250)
    assert seg.num_steps == 250
    raw_d = d.values[0, 500:750, 0] * d.scale + d.offset
    raw_s = seg.values[0, :, 0] * seg.scale + seg.offset
    torch.testing.assert_close(raw_s, raw_d, atol=1e-2, rtol=1e-5)
    # breathing: dominant period between 2 and 10 s
    x = d.values[0, :, 0].double()
    spec = torch.fft.rfft(x - x.mean()).abs()
    f = torch.fft.rfftfreq(x.numel(), d=0.04)
    fpk = float(f[1:][spec[1:].argmax()])
    assert 0.1 <= fpk <= 0.5, fpk
    with pytest.raises(ConfigurationError, match="duration_s"):
        load("respiration", duration_s=-1)
    with pytest.raises(ConfigurationError, match="max_steps"):
        load("respiration", max_steps=0)


@pytest.mark.parametrize("name,module", [("santafe-laser", "reservoirpy"), ("gas-furnace", "TimeSeriesSRC"),
                                         ("respiration", "biopeaks")])
def test_missing_extra_names_the_extra(monkeypatch, name, module):
    for mod in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, module, None)  # import of module now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'ppl_rnn\[data\]'") as e:
        load(name)
    assert isinstance(e.value, ImportError)


def test_unknown_name_and_option():
    with pytest.raises(ConfigurationError, match="available"):
        load("mnist")
    with pytest.raises(ConfigurationError, match="options"):
        load("sunspots", seed=3)


# ---------------------------------------------------------------------------------------------
# the synthetic benchmark


def test_unkelbach_synthetic_record():
    d = load("unkelbach-synthetic", seed=0)
    train, test = _check_record(d, (1, 1500, 1))
    assert train.num_steps == 1000 and test.num_steps == 500
    assert d.states.shape == (1, 1500, 4) and train.states.shape == (1, 1000, 4)
    m = d.true_model
    assert isinstance(m, ElmanSSM) and m.activation == "tanh" and (m.hidden_dim, m.obs_dim, m.input_dim) == (4, 1, 0)
    torch.testing.assert_close(m.q, torch.full((4,), 0.15))
    torch.testing.assert_close(m.r, torch.full((1,), 0.1))
    assert m.dtype == d.values.dtype


def test_unkelbach_seed_changes_noise_not_network():
    a = load("unkelbach-synthetic", seed=0)
    b = load("unkelbach-synthetic", seed=1)
    a2 = load("unkelbach-synthetic", seed=0, dtype=torch.float64)
    for name, p in a.true_model.named_parameters():
        torch.testing.assert_close(p, dict(b.true_model.named_parameters())[name])
    assert not torch.allclose(a.values, b.values)
    torch.testing.assert_close(a.values, a2.values.float())  # simulated in float64 whatever the dtype
    c = load("unkelbach-synthetic", seed=2, num_sequences=3, train_steps=200, test_steps=50)
    assert c.values.shape == (3, 250, 1) and c.split()[0].num_steps == 200
    with pytest.raises(ConfigurationError):
        load("unkelbach-synthetic", seed=None)
    with pytest.raises(ConfigurationError):
        load("unkelbach-synthetic", train_steps=0)


def test_unkelbach_dynamics_are_interesting_and_noise_matters():
    d = load("unkelbach-synthetic", seed=0, dtype=torch.float64)
    m, h, y = d.true_model.requires_grad_(False), d.states[0], d.values[0, :, 0]
    # neither collapsing nor saturated
    assert float(h.std(0).min()) > 0.3 and float((h.abs() > 0.95).double().mean()) < 0.1
    # the noiseless network keeps oscillating (no fixed point)
    with torch.no_grad():
        x = h[0]
        xs = []
        for _ in range(1499):
            x = m.transition_mean(0, x, None)
            xs.append(x)
        xd = torch.stack(xs)
    assert float(xd[300:].std(0).min()) > 0.3
    # given the true previous state, one step ahead is predictable (error sd = sqrt(q^2 |C|^2 + r^2) ~ 0.18) ...
    with torch.no_grad():
        pred = m.transition_mean(0, h[:-1], None) @ m.C.T[:, 0] + m.d
    err1 = float((y[1:] - pred).std())
    assert abs(err1 - (0.15**2 + 0.1**2) ** 0.5) < 0.02
    # ... but the deterministic free run from the true h_0 loses the phase: after 200 steps it is no better
    # than predicting the mean, while the signal itself has std ~0.5
    free = xd[:1499] @ m.C.T[:, 0]
    late = slice(300, 1499)
    assert float(y.std()) > 0.4
    assert float((y[1:][late] - free[late]).pow(2).mean().sqrt()) > float(y.std())
