"""Figures: each function draws what it says (checked on the artists) and writes a PNG."""

import matplotlib
import numpy as np
import pytest
import torch
import xarray as xr
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.workbench import plots

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def setup():
    m = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    sim = m.simulate(50, 1, seed=0)
    return m, sim


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_states_bands_and_truth(setup, tmp_path):
    m, sim = setup
    post = pr.infer(m, sim.observations, method=pr.inference.KalmanSmoother())
    fig = plots.plot_states(post, sim.states, path=tmp_path / "s.png")
    _png(tmp_path / "s.png")
    axes = fig.axes
    assert len(axes) == 2
    lines = {ln.get_label(): ln for ln in axes[0].lines}
    np.testing.assert_allclose(lines["smoothing mean"].get_ydata(), post.mean[0, :, 0].numpy())
    np.testing.assert_allclose(lines["true state"].get_ydata(), sim.states[0, :, 0].numpy())
    assert len(axes[0].collections) == 2  # 50% and 95% bands


def test_forecast_intervals(setup, tmp_path):
    m, sim = setup
    fc = pr.forecast(m, sim.observations[:, :40], horizon=10, num_samples=400, seed=0)
    fig = plots.plot_forecast(sim.observations[:, :40], fc, truth=sim.observations[:, 40:], path=tmp_path / "f.png")
    _png(tmp_path / "f.png")
    ax = fig.axes[0]
    med = [ln for ln in ax.lines if "median" in ln.get_label()][0]
    np.testing.assert_allclose(med.get_ydata(), fc.samples[:, 0, :, 0].median(0).values.numpy(), atol=1e-2)
    np.testing.assert_allclose(med.get_xdata(), np.arange(40, 50))
    assert len(ax.collections) == 2


def test_traces_ess_and_comparison(setup, tmp_path):
    m, sim = setup
    tr = {"A": xr.Dataset({"objective": ("iteration", [-5.0, -3.0, -2.5])}),
          "B": xr.Dataset({"objective": ("iteration", [1.0, 2.0])}), "C": None}
    fig = plots.plot_traces(tr, kinds={"A": "lower_bound"}, path=tmp_path / "t.png")
    _png(tmp_path / "t.png")
    vis = [a for a in fig.axes if a.get_visible()]
    assert len(vis) == 2 and "lower_bound" in vis[0].get_title()
    np.testing.assert_allclose(vis[0].lines[0].get_ydata(), [-5.0, -3.0, -2.5])

    post = pr.infer(m, sim.observations, method=pr.inference.ParticleFilter(200), seed=0)
    fig = plots.plot_ess(post, path=tmp_path / "e.png")
    _png(tmp_path / "e.png")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), post.diagnostics["ess"][0].numpy() / 200)

    ds = xr.Dataset(
        {"heldout_logev_per_step": (("method", "seed"), [[-0.5, -0.6], [-0.9, np.nan]]),
         "crps": (("method", "seed", "horizon"), np.array([[[0.2, 0.3], [0.21, 0.31]], [[0.4, 0.5], [np.nan] * 2]]))},
        coords={"method": ["good", "bad"], "seed": [0, 1], "horizon": [1, 10]})
    fig = plots.plot_comparison(ds, reference=("bad",), path=tmp_path / "c.png")
    _png(tmp_path / "c.png")
    ax1 = fig.axes[0]
    assert [t.get_text() for t in ax1.get_yticklabels()] == ["good", "bad"]
    dots = ax1.lines[0]
    np.testing.assert_allclose(sorted(dots.get_xdata()), [-0.6, -0.5])
    assert torch.is_tensor(sim.states)


def test_comparison_draws_se_bars_and_several_models(tmp_path):
    from matplotlib.container import ErrorbarContainer

    v = np.array([[[-0.5, -0.6], [-0.9, -0.8]], [[-0.4, -0.45], [-1.0, -1.1]]])  # (model, method, seed)
    ds = xr.Dataset(
        {"heldout_logev_per_step": (("model", "method", "seed"), v),
         "heldout_logev_per_step_se": (("model", "method", "seed"), np.full_like(v, 0.01)),
         "crps": (("model", "method", "seed", "horizon"), np.full(v.shape + (1,), 0.3)),
         "error": (("model", "method", "seed"), np.full(v.shape, "", dtype=object).astype(str))},
        coords={"model": ["elman", "gru"], "method": ["MCEM", "AR"], "seed": [0, 1], "horizon": [1]})
    fig = plots.plot_comparison(ds, reference=("AR",), path=tmp_path / "c.png")
    _png(tmp_path / "c.png")
    ax1 = fig.axes[0]
    assert [t.get_text() for t in ax1.get_yticklabels()] == ["elman / MCEM", "elman / AR", "gru / MCEM", "gru / AR"]
    bars = [c for c in ax1.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4
    seg = bars[0].lines[2][0].get_segments()  # horizontal bars: x from value - 2 SE to value + 2 SE
    np.testing.assert_allclose(sorted(s[1, 0] - s[0, 0] for s in seg), [0.04, 0.04])


def test_forecast_difference_points_and_intervals(setup, tmp_path):
    m, sim = setup
    other = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=4)
    y = sim.observations
    a = pr.evaluate(m, y[:, :30], y[:, 30:], horizons=(1, 3), num_samples=50, seed=0)
    b = pr.evaluate(other, y[:, :30], y[:, 30:], horizons=(1, 3), num_samples=50, seed=0)
    d = pr.forecast_difference(a, b)
    fig = plots.plot_forecast_difference({"truth - other": d}, steps_label=lambda h: f"{h} st",
                                         path=tmp_path / "d.png")
    _png(tmp_path / "d.png")
    ax = fig.axes[0]
    bars = ax.containers[0]  # the errorbar container: points and their 95% intervals
    np.testing.assert_allclose(bars.lines[0].get_ydata(), d.difference.values)
    seg = bars.lines[2][0].get_segments()
    # the bars are the comparison's own (fixed-b) 95% interval, not +- 1.96 SE
    np.testing.assert_allclose([s[0, 1] for s in seg], d.ci95_low.values)
    np.testing.assert_allclose([s[1, 1] for s in seg], d.ci95_high.values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 st", "3 st"]
    rel = plots.plot_forecast_difference(d, relative=True)
    np.testing.assert_allclose(rel.axes[0].containers[0].lines[0].get_ydata(),
                               100 * d.difference.values / d.mean_b.values)
    with pytest.raises(pr.ConfigurationError, match="empty"):
        plots.plot_forecast_difference({})
