"""Data set loaders: shapes, finiteness, metadata, splits, scaling, missing extras, the synthetic benchmark."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from ppl_rnn.models import ElmanSSM

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.workbench import datasets
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
    scaled = d.meta.get("scale", "none") != "none"  # a cut before the statistics' end warns (leakage)
    with pytest.warns(UserWarning, match="informed the preprocessing") if scaled else contextlib.nullcontext():
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
    assert d.meta["start_s"] == 1.0 and d.train_steps == 2400  # the first second is the filters' start-up
    # robust scaling on the training part: median 0, IQR 1
    tr = d.split()[0].values.flatten()
    q25, q50, q75 = torch.quantile(tr.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert abs(float(q50)) < 0.01 and abs(float(q75 - q25) - 1) < 0.01
    # a later segment lies on the same 25 Hz grid as a longer load (raw units)
    seg = load("respiration", start_s=20.0, max_steps=250)
    assert seg.num_steps == 250
    raw_d = d.values[0, 475:725, 0] * d.scale + d.offset  # d starts at 1 s: step 475 is 20 s
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
    with pytest.raises(ConfigurationError, match="start_s"):
        load("respiration", start_s=0.0)  # the filter edge is never returned
    with pytest.raises(ConfigurationError, match="window"):
        load("respiration", window=(20.0, 10.0), start_s=20.0)


def _corrupting(monkeypatch, corrupt):
    """Make the respiration loader read raw data changed by ``corrupt(raw) -> raw``."""
    orig = datasets._respiration_raw
    monkeypatch.setattr(datasets, "_respiration_raw", lambda path, nrows: corrupt(orig(path, nrows).copy()))


@pytest.mark.parametrize("scale", ["robust", "standard"])
def test_respiration_preprocessing_ignores_the_test_part(monkeypatch, scale):
    """The leakage test: change the raw data of the test part; the training part, its offset and its scale
    stay the same bit for bit (scaling statistics from the training part only, causal decimation)."""
    pytest.importorskip("biopeaks")
    kw = dict(window=(20.0, 40.0), train_s=30.0, scale=scale)
    a = load("respiration", **kw)
    assert a.train_steps == 750 and a.num_steps == 1000 and a.meta["stats_steps"] == 750
    k_last = round(20.0 * 25) + 750 - 1  # the last training step on the recording's 25 Hz grid
    first_test_raw = 40 * k_last + 1  # output step k depends on raw samples <= 40 k only

    def wreck_test_part(raw):
        rng = np.random.default_rng(0)
        raw[first_test_raw:] = 1e4 * rng.standard_normal(raw.size - first_test_raw)
        return raw

    _corrupting(monkeypatch, wreck_test_part)
    b = load("respiration", **kw)
    (tr_a, te_a), (tr_b, te_b) = a.split(), b.split()
    assert torch.equal(tr_a.values, tr_b.values)
    assert torch.equal(a.offset, b.offset) and torch.equal(a.scale, b.scale)
    assert not torch.allclose(te_a.values, te_b.values)  # the test part did change
    # ... while a change inside the training part does reach it (the check above can fail)
    monkeypatch.undo()

    def nudge_train_part(raw):
        raw[40 * (k_last - 100):first_test_raw] += 50.0
        return raw

    _corrupting(monkeypatch, nudge_train_part)
    c = load("respiration", **kw)
    assert not torch.equal(c.split()[0].values, tr_a.values)


def test_respiration_drops_the_filter_edge(monkeypatch):
    """The first returned sample (t = 1 s) does not depend on the raw samples before the filters settled."""
    pytest.importorskip("biopeaks")
    a = load("respiration", max_steps=100, scale="none")

    def wreck_start(raw):
        raw[:40] = -1e4
        return raw

    _corrupting(monkeypatch, wreck_start)
    b = load("respiration", max_steps=100, scale="none")
    assert torch.equal(a.values, b.values)
    # and no edge outlier: the first sample lies within the range of the next two seconds
    v = a.values[0, :, 0]
    assert float(v[1:50].min()) - 1.0 <= float(v[0]) <= float(v[1:50].max()) + 1.0


def test_respiration_regular_window():
    pytest.importorskip("biopeaks")
    d = load("respiration", window=datasets.REGULAR_BREATHING_WINDOW, train_s=datasets.REGULAR_BREATHING_TRAIN_S)
    start, length = datasets.REGULAR_BREATHING_WINDOW
    assert d.num_steps == round(length * 25) and d.train_steps == round(datasets.REGULAR_BREATHING_TRAIN_S * 25)
    assert datasets.REGULAR_BREATHING_TRAIN_S >= 60  # minutes, not seconds, of training data
    tr, te = d.split()
    assert tr.num_steps == d.train_steps
    # regular breathing: in every 20 s block of the window the dominant period is 2.2-5 s and the amplitude
    # (std) varies by less than a factor 2 between blocks; the first three minutes of the recording fail this
    assert _regular(d.values[0, :, 0]), _blocks(d.values[0, :, 0])
    early = load("respiration", window=(1.0, length))
    assert not _regular(early.values[0, :, 0]), _blocks(early.values[0, :, 0])


def _blocks(x):
    x = x.double()
    periods, stds = [], []
    for b in range(0, x.numel() - 499, 500):
        seg = x[b:b + 500] - x[b:b + 500].mean()
        spec = torch.fft.rfft(seg).abs()
        f = torch.fft.rfftfreq(500, d=0.04)
        periods.append(1 / float(f[1:][spec[1:].argmax()]))
        stds.append(float(seg.std()))
    return periods, stds


def _regular(x) -> bool:
    periods, stds = _blocks(x)
    return all(2.2 <= p <= 5.0 for p in periods) and max(stds) / min(stds) < 2.0


def test_split_before_the_statistics_end_warns():
    d = load("sunspots", scale="standard", train_steps=200)
    assert d.train_steps == 200 and d.split()[0].num_steps == 200
    train = d.split()[0].values
    assert abs(float(train.mean())) < 1e-5  # statistics of exactly the training part
    with pytest.warns(UserWarning, match="train_steps=150"):
        d.split(train_steps=150)
    load("sunspots", scale="standard", train_steps=200).split(train_steps=250)  # later cut: no leakage, no warning
    with pytest.raises(ConfigurationError, match="train_steps"):
        load("sunspots", train_steps=309)


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
