"""RTRL: forward-mode sensitivities of the noise-free network, float64.

* oracle: the RTRL gradient accumulated over a sequence equals BPTT's reverse-mode gradient of
  ``deterministic_log_likelihood`` (autograd through the model's own parameters, mapped to the weight vector by
  probing ``set_weights`` here, independently of the library's adapter) to 1e-6, and a central finite difference
  of the objective along a random direction of the weight vector; with inputs and missing entries, for the tanh
  Elman network and the linear-Gaussian model (full observation covariance);
* online RTRL reduces the one-step error of an input-driven network well below the initial one;
* the cost guard, capability errors and option validation.
"""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference.bptt import deterministic_log_likelihood
from ppl_rnn.inference.rtrl import RTRL, FlatWeights, rtrl_gradient
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError

from .toy_models import NoWeights


def _problem(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "elman":
        m = ElmanSSM(3, 2, input_dim=1, seed=1)
    else:
        m = LinearGaussianSSM(3, 2, 1, seed=2)
    u = torch.randn(2, 25, 1, generator=g, dtype=torch.float64)
    y = m.simulate(25, 2, inputs=u, seed=0).observations.clone()
    y[0, 5, 1] = float("nan")
    y[1, 7] = float("nan")
    m.set_weights(m.weights() + 0.3 * torch.randn(m.weights().shape, generator=g, dtype=torch.float64))
    return m, prepare(m, y, u)


def _bptt_gradient(m, data):
    """Reverse-mode gradient of BPTT's objective with respect to the weight vector: autograd on the model's
    parameters, times d(parameters)/d(weights) found by setting unit weight vectors."""
    m = m.copy()
    w0 = m.weights()
    for p in m.parameters():
        p.grad = None
    ll = deterministic_log_likelihood(m, data).sum()
    ll.backward()
    grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in m.parameters()])

    def flat():
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()

    m.set_weights(torch.zeros_like(w0))
    base = flat()
    cols = []
    for k in range(w0.numel()):
        m.set_weights(torch.nn.functional.one_hot(torch.tensor(k), w0.numel()).double())
        cols.append(flat() - base)
    return torch.stack(cols, 1).T @ grads, float(ll.detach())


@pytest.mark.parametrize("kind", ["elman", "lg"])
def test_rtrl_gradient_equals_bptt_gradient(float64, kind):
    m, data = _problem(kind)
    ll, g = rtrl_gradient(m, data)
    expected, ll_bptt = _bptt_gradient(m, data)
    assert float(ll) == pytest.approx(ll_bptt, rel=1e-12)
    assert g.abs().max() > 1.0  # a real gradient, not a zero vector
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)
    # central finite difference of the objective along a random direction, through set_weights only
    v = torch.randn(g.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w0, eps, vals = m.weights(), 1e-5, []
    for s in (1, -1):
        mm = m.copy()
        mm.set_weights(w0 + s * eps * v)
        vals.append(float(deterministic_log_likelihood(mm, data).sum().detach()))
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert float(g @ v) == pytest.approx(fd, rel=1e-6, abs=1e-5)


def test_flat_weights_reproduce_set_weights(float64):
    m, data = _problem("elman")
    fw = FlatWeights(m, needed_by="test")
    w = m.weights() + 0.5
    direct = m.copy()
    direct.set_weights(w)
    got = fw.params(w)
    for (name, p) in direct.named_parameters():
        torch.testing.assert_close(got["m." + name], p.detach(), rtol=0, atol=0)
    torch.testing.assert_close(m.weights(), fw.vector())  # probing left the model as it was


def _driven_problem(T=40):
    teacher = ElmanSSM(3, 1, input_dim=1, seed=5, process_noise=1e-3, obs_noise=1e-3, init_scale=1e-3)
    u = torch.randn(1, T, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher.simulate(T, 1, inputs=u, seed=0).observations, u


def test_online_rtrl_reduces_error_and_returns_a_valid_copy(float64):
    y, u = _driven_problem()
    init = ElmanSSM(3, 1, input_dim=1, seed=1)
    before = init.weights().clone()
    fit = pr.fit(init, y, inputs=u, method=RTRL(num_epochs=4, lr=0.01), seed=0)
    mse = fit.trace.mse.values
    assert mse.shape == (5,)
    assert mse[-1] < 0.3 * mse[0], mse
    torch.testing.assert_close(init.weights(), before)  # the input model is untouched
    scales = fit.model.noise_scales()
    assert torch.allclose(scales["process"], torch.tensor(1e-4, dtype=torch.float64))
    # observation noise = the maximum-likelihood value given the noise-free rollout
    assert float(scales["obs"][0].detach()) ** 2 == pytest.approx(mse[-1], rel=1e-6)
    assert fit.evidence_kind == "approximation" and fit.method == "rtrl"
    assert fit.trace.objective.values[-1] > fit.trace.objective.values[0]


def test_epochwise_update_is_one_exact_gradient_step(float64):
    """update_every=T: one Adam step per pass along the exact (BPTT) gradient, whose first step moves every
    weight by lr against the sign of the gradient."""
    y, u = _driven_problem(T=15)
    init = ElmanSSM(3, 1, input_dim=1, seed=1)
    data = prepare(init, y, u)
    fit = pr.fit(init, y, inputs=u, method=RTRL(num_epochs=1, lr=1e-3, update_every=15, fit_obs_noise=False),
                 seed=0)
    m0 = init.copy()
    from ppl_rnn.inference.bptt import set_noise_floor

    set_noise_floor(m0, 1e-4)
    _, g = rtrl_gradient(m0, data)
    step = fit.model.weights() - init.weights()
    moved = g.abs() > 1e-2
    torch.testing.assert_close(step[moved], 1e-3 * torch.sign(g[moved]), rtol=1e-4, atol=1e-9)


def test_cost_guard_names_the_cost(float64):
    m = ElmanSSM(60, 1)
    y = torch.zeros(5, 1, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match=r"60\^2.*multiply-adds per time step.*max_step_cost"):
        pr.fit(m, y, method=RTRL(num_epochs=1))
    assert RTRL(max_step_cost=1e9).check_cost(1, 60, m.weights().numel(), 5) == 60 * 60 * m.weights().numel()




class _NewTransition(ElmanSSM):
    """Overrides the transition: the inherited weight vector may no longer describe it."""

    def transition(self, t, h_prev, u_t):
        return super().transition(t, 0.5 * h_prev, u_t)


@pytest.mark.parametrize("model", [NoWeights, lambda: _NewTransition(2, 1)])
def test_models_without_weight_vector_get_a_capability_error(float64, model):
    y = torch.zeros(5, 1, dtype=torch.float64)
    with pytest.raises(ModelCapabilityError, match=r"RTRL needs the model capability weights.*use BPTT"):
        pr.fit(model(), y, method=RTRL(num_epochs=1))


def test_options_are_validated():
    for bad in ({"num_epochs": 0}, {"lr": -1.0}, {"optimizer": "lbfgs"}, {"update_every": 0},
                {"max_step_cost": 0}):
        with pytest.raises(ConfigurationError):
            RTRL(**bad)


def _suite():
    from ppl_rnn.models import (
        CTRNNSSM,
        GRUSSM,
        LSTMSSM,
        EchoStateSSM,
        JordanSSM,
        MultipleTimescalesSSM,
        SecondOrderSSM,
        StackedSSM,
    )

    return {"jordan": lambda: JordanSSM(3, 2, 1, seed=1), "echo_state": lambda: EchoStateSSM(6, 2, 1, seed=1),
            "gru": lambda: GRUSSM(3, 2, 1, seed=1), "lstm": lambda: LSTMSSM(2, 2, 1, seed=1),
            "ctrnn": lambda: CTRNNSSM(3, 2, 1, dt=0.5, tau=[1.0, 2.0, 4.0], seed=1),
            "mtrnn": lambda: MultipleTimescalesSSM(2, 2, 2, 1, seed=1),
            "second_order": lambda: SecondOrderSSM(3, 2, 1, seed=1), "stacked": lambda: StackedSSM((3, 2), 2, 1, seed=1)}


@pytest.mark.parametrize("name", ["jordan", "echo_state", "gru", "lstm", "ctrnn", "mtrnn", "second_order", "stacked"])
def test_rtrl_gradient_equals_bptt_gradient_on_the_model_suite(float64, name):
    """Nothing model-specific: every suite model that declares weights/set_weights gets BPTT's gradient."""
    m = _suite()[name]()
    u = torch.randn(2, 10, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = m.simulate(10, 2, inputs=u, seed=0).observations.clone()
    y[1, 3, 0] = float("nan")
    data = prepare(m, y, u)
    _, g = rtrl_gradient(m, data)
    expected, _ = _bptt_gradient(m, data)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-6)


def test_a_suite_model_without_weights_gets_a_capability_error(float64):
    from ppl_rnn.models import DeepMarkovSSM

    with pytest.raises(ModelCapabilityError, match="weights"):
        pr.fit(DeepMarkovSSM(2, 2, seed=1), torch.zeros(5, 2), method=RTRL(num_epochs=1))
