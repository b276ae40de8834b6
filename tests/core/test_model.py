"""The model contract: the Pyro program is exactly the three conditionals, simulation, copies, verbs."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
from ppl_rnn.inference import KalmanSmoother
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, DataError


def _models():
    return {
        "elman": lambda I: ElmanSSM(3, 2, I, process_noise=0.3, obs_noise=0.4, weight_scale=1.5, seed=1),
        "elman_identity": lambda I: ElmanSSM(3, 2, I, activation="identity", seed=2),
        "linear_gaussian": lambda I: LinearGaussianSSM(3, 2, I, seed=3),
    }


def _conditionals_log_prob(model, h, y, u):
    """log p(h_0) + sum_t log p(h_t|h_{t-1}) + sum_t log p(y_{t,o}|h_t), from the three conditionals."""
    B, T, _ = y.shape
    mask = ~torch.isnan(y)
    y0 = torch.nan_to_num(y)
    ua = lambda t: None if u is None else u[:, t]  # noqa: E731
    total = model.initial_batched(ua(0), (B,)).log_prob(h[:, 0]).sum()
    for t in range(T):
        if t > 0:
            total = total + model.transition(t, h[:, t - 1], ua(t)).log_prob(h[:, t]).sum()
        total = total + model.observation_log_prob(t, h[:, t], y0[:, t], mask[:, t], ua(t)).sum()
    return total


@pytest.mark.parametrize("name", ["elman", "elman_identity", "linear_gaussian"])
@pytest.mark.parametrize("I", [0, 2])
@pytest.mark.parametrize("missing", [False, True])
def test_trace_log_prob_is_sum_of_conditionals(float64, name, I, missing):
    torch.manual_seed(0)
    model = _models()[name](I)
    B, T = 3, 6
    u = torch.randn(B, T, I) if I else None
    y = model.simulate(T, B, inputs=u, seed=0).observations
    if missing:
        y = y.clone()
        y[0, 1, 0] = float("nan")  # partial
        y[:, 3] = float("nan")  # a step missing in every sequence: no y_3 site
        y[2, 5] = float("nan")  # a step missing in one sequence
    tr = poutine.trace(model).get_trace(y, u)
    h = torch.stack([tr.nodes[f"h_{t}"]["value"] for t in range(T)], 1)
    lp = tr.log_prob_sum()
    ref = _conditionals_log_prob(model, h, y, u)
    assert torch.allclose(lp, ref, atol=1e-9, rtol=1e-12)
    sites = {k for k, v in tr.nodes.items() if v["type"] == "sample"}
    assert {f"h_{t}" for t in range(T)} <= sites
    assert ("y_3" in sites) == (not missing)
    assert all(tr.nodes[f"y_{t}"]["is_observed"] for t in range(T) if f"y_{t}" in sites)
    # the returned trajectory is the traced h
    assert torch.equal(poutine.replay(model, trace=tr)(y, u), h)


def test_trace_log_prob_with_explicit_mask(float64):
    model = ElmanSSM(2, 2, seed=0)
    y = model.simulate(5, 2, seed=1).observations
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 2, 0] = False
    y_nan = y.clone()
    y_nan[1, 2, 0] = float("nan")
    tr_mask = poutine.trace(model).get_trace(y, mask=mask)
    tr_nan = poutine.trace(poutine.replay(model, trace=tr_mask)).get_trace(y_nan)
    assert torch.allclose(tr_mask.log_prob_sum(), tr_nan.log_prob_sum(), atol=1e-12)
    with pytest.raises(DataError, match="mask"):
        model(y, mask=torch.ones(5, 3, dtype=torch.bool))


def test_prior_program_and_simulate(float64):
    torch.manual_seed(0)
    model = ElmanSSM(3, 2, 1, seed=0)
    u = torch.randn(4, 7, 1)
    tr = poutine.trace(model).get_trace(inputs=u, num_steps=7, num_sequences=4)
    assert tr.nodes["y_6"]["value"].shape == (4, 2) and not tr.nodes["y_6"]["is_observed"]
    assert tr.nodes["h_0"]["value"].shape == (4, 3)
    sim = model.simulate(7, 4, inputs=u, seed=3)
    assert sim.states.shape == (4, 7, 3) and sim.observations.shape == (4, 7, 2) and sim.inputs.shape == (4, 7, 1)
    assert torch.equal(sim.observations, model.simulate(7, 4, inputs=u, seed=3).observations)
    assert not torch.equal(sim.observations, model.simulate(7, 4, inputs=u, seed=4).observations)
    # the global RNG is untouched by a seeded simulation
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    model.simulate(3, inputs=torch.zeros(3, 1), seed=9)
    assert torch.equal(torch.rand(1), a)
    with pytest.raises(DataError, match="num_steps"):
        model(inputs=u)
    with pytest.raises(ConfigurationError):
        model.simulate(0)
    with pytest.raises(ConfigurationError):
        model.simulate(3, num_sequences=0)


def test_prior_predictive_statistics(float64):
    """Simulated observations have the law of the model (linear-Gaussian: stationary moments known)."""
    A = torch.tensor([[0.5]])
    model = LinearGaussianSSM(1, 1, A=A, Q=torch.tensor([[0.75]]), R=torch.tensor([[0.25]]),
                              P0=torch.tensor([[1.0]]), d=torch.tensor([2.0]), C=torch.tensor([[1.0]]))
    sim = model.simulate(3, 4000, seed=0)
    y = sim.observations[:, -1, 0]
    # h is stationary with var 1 -> y_t ~ N(2, 1.25)
    assert abs(float(y.mean()) - 2.0) < 5 * (1.25 / 4000) ** 0.5
    assert abs(float(y.var()) - 1.25) < 5 * 1.25 * (2 / 4000) ** 0.5
    # lag-one covariance of h is 0.5
    h = sim.states[:, :, 0]
    c = float(((h[:, 1] - h[:, 1].mean()) * (h[:, 2] - h[:, 2].mean())).mean())
    assert abs(c - 0.5) < 5 * (1.25 / 4000) ** 0.5


def test_copy_is_independent():
    model = ElmanSSM(2, 1, seed=0)
    c = model.copy()
    with torch.no_grad():
        c.W = c.W * 2.0
    assert not torch.allclose(c.W, model.W)
    assert c is not model and type(c) is ElmanSSM


def test_param_store_untouched(float64):
    """Under module-local parameters (what the library's own calls switch on) tracing a model leaves Pyro's
    global param store empty; the caller's setting is restored."""
    pyro.clear_param_store()
    model = ElmanSSM(2, 1, seed=0)
    y = model.simulate(5, seed=0).observations
    before = pyro.settings.get("module_local_params")
    with pyro.settings.context(module_local_params=True):
        poutine.trace(model).get_trace(y)
    assert len(pyro.get_param_store()) == 0
    assert pyro.settings.get("module_local_params") == before


def test_verbs_check_model_and_method():
    model = ElmanSSM(2, 1, activation="identity")
    y = torch.randn(5, 1)
    with pytest.raises(ConfigurationError, match="model"):
        pr.infer(object(), y, method=KalmanSmoother())
    with pytest.raises(ConfigurationError, match="method"):
        pr.infer(model, y, method="kalman")
    with pytest.raises(ConfigurationError, match="method"):
        pr.infer(model, y, method=KalmanSmoother)  # the class, not an instance
    with pytest.raises(ConfigurationError, match="model"):
        pr.fit(torch.nn.Linear(2, 2), y, method=KalmanSmoother())
    with pytest.raises(ConfigurationError, match="method"):
        pr.fit(model, y, method=None)
    with pytest.raises(ConfigurationError, match="seed"):
        pr.infer(model, y, method=KalmanSmoother(), seed=-1)
    with pytest.raises(NotImplementedError, match="does not train"):
        pr.fit(model, y, method=KalmanSmoother())


def test_posterior_record_validates_kinds():
    z = torch.zeros(1, 2, 1)
    with pytest.raises(ValueError, match="kind"):
        pr.Posterior(kind="bogus", mean=z, var=z, log_evidence=torch.zeros(1), evidence_kind="exact")
    with pytest.raises(ValueError, match="evidence_kind"):
        pr.Posterior(kind="smoothing", mean=z, var=z, log_evidence=torch.zeros(1), evidence_kind="bogus")


def test_one_version_number_and_an_spdx_license():
    """``ppl_rnn.__version__`` is the only version number: the package metadata is built from it (pyproject's
    ``dynamic`` version), and the license is an SPDX expression (setuptools >= 77), not a deprecated table."""
    import importlib.metadata
    import pathlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    assert pr.__version__ == importlib.metadata.version("ppl_rnn")
    py = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not py.exists():  # an installed copy of the tests: the metadata check above is the whole test
        return
    meta = tomllib.loads(py.read_text())
    project = meta["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ppl_rnn.__version__"}
    assert project["license"] == "MIT"
    assert any(r.replace(" ", "").startswith("setuptools>=") and
               tuple(int(x) for x in r.replace(" ", "").split(">=")[1].split(".")[:1]) >= (77,)
               for r in meta["build-system"]["requires"])
