"""Each suite model reads like its equations: model-specific checks (structure, linear special cases against exact
Kalman, the echo state network's closed-form M-step, the LSTM's noise placement, the defining-class rule)."""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference import BPTT, ExtendedKalmanSmoother, KalmanSmoother
from ppl_rnn.inference.complete_data import complete_data_log_likelihood
from ppl_rnn.models import (
    CTRNNSSM,
    LSTMSSM,
    MODELS,
    DeepMarkovSSM,
    EchoStateSSM,
    JordanSSM,
    MultipleTimescalesSSM,
    SecondOrderSSM,
    StackedSSM,
)

import ppl_rnn as pr
from ppl_rnn.capabilities import capability, declared_capabilities
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError


@pytest.mark.parametrize("build", [
    lambda: JordanSSM(3, 2, 1, activation="identity", context_decay=0.7, seed=2),
    lambda: StackedSSM((2, 3), 2, 1, activation="identity", seed=2),
])
def test_linear_special_cases_equal_exact_kalman(build, float64):
    """The declared linear-Gaussian form is the model: the EKF on the conditionals equals Kalman on the form."""
    m = build()
    assert "linear_gaussian" in declared_capabilities(m)
    u = torch.randn(2, 15, 1, generator=torch.Generator().manual_seed(0))
    y = m.simulate(15, 2, inputs=u, seed=1).observations
    y[0, 3, 1] = float("nan")
    ks = pr.infer(m, y, inputs=u, method=KalmanSmoother())
    ek = pr.infer(m, y, inputs=u, method=ExtendedKalmanSmoother())
    torch.testing.assert_close(ks.log_evidence, ek.log_evidence)
    torch.testing.assert_close(ks.mean, ek.mean)


def test_jordan_context_integrates_the_output(float64):
    """c_t = mu c_{t-1} + (C a_t + d) + N(0, q_c^2): the context is fed from the output layer."""
    m = JordanSSM(2, 2, process_noise=[0.1, 0.2, 0.3, 0.05], seed=3)
    h_prev = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).expand(20000, 2, 4)
    torch.manual_seed(0)
    h = m.transition(1, h_prev, None).sample()
    a, c, c_prev = h[..., :2], h[..., 2:], h_prev[..., 2:]
    resid = c - (m.mu * c_prev + a @ m.C.T + m.d)
    se = 0.3 / 20000**0.5 * 6
    torch.testing.assert_close(resid.mean((0, 1)), torch.zeros(2), atol=se, rtol=0)
    torch.testing.assert_close(resid.std((0, 1)), torch.tensor([0.3, 0.05]), atol=0.01, rtol=0)
    # the hidden layer sees the context only (not its own past)
    h_alt = h_prev.clone()
    h_alt[..., :2] += 1.0
    torch.testing.assert_close(m.transition_mean(1, h_alt, None)[..., :2], m.transition_mean(1, h_prev, None)[..., :2])


def test_ctrnn_is_the_euler_step_of_the_ode(float64):
    m = CTRNNSSM(3, 1, 2, dt=0.25, tau=[0.5, 1.0, 3.0], seed=4)
    with torch.no_grad():
        m.theta = torch.tensor([0.1, -0.2, 0.3])
        m.b = torch.tensor([0.5, 0.0, -0.5])
    y, u = torch.randn(5, 3), torch.randn(5, 2)
    dydt = (-y + torch.sigmoid(y + m.theta) @ m.W.T + u @ m.U.T + m.b) / m.tau
    torch.testing.assert_close(m.transition_mean(1, y, u), y + 0.25 * dydt)
    assert "tau_unconstrained" in dict(m.named_parameters())
    assert "tau" not in dict(CTRNNSSM(3, learn_tau=False).named_parameters())


def test_mtrnn_groups(float64):
    """Inputs drive and the readout sees the fast group only; time constants are fixed buffers."""
    m = MultipleTimescalesSSM(3, 2, 1, 2, tau_fast=2.0, tau_slow=30.0, dt=1.0, seed=0)
    assert m.hidden_dim == 5 and not any(n.startswith("tau") for n, _ in m.named_parameters())
    torch.testing.assert_close(m.tau, torch.tensor([2.0, 2, 2, 30, 30]))
    h = torch.randn(4, 5)
    u1, u2 = torch.zeros(4, 2), torch.randn(4, 2)
    d = m.transition_mean(1, h, u2) - m.transition_mean(1, h, u1)
    assert d[:, 3:].abs().max() == 0 and d[:, :3].abs().max() > 0
    J = m.emission_jacobian(1, h, None)
    assert J[..., 3:].abs().max() == 0 and J[..., :3].abs().max() > 0
    # the slow units move more slowly: their leak step is dt / tau_slow
    Jt = m.transition_jacobian(1, torch.zeros(1, 5), None)[0]
    torch.testing.assert_close(torch.diagonal(Jt)[3:] - torch.diagonal(m.W.detach())[3:] * 0.25 / 30,
                               torch.full((2,), 1 - 1 / 30))


def test_second_order_mixes_recurrent_matrices_by_input(float64):
    m = SecondOrderSSM(3, 1, 2, seed=1)
    h = torch.randn(4, 3)
    u = torch.randn(4, 2)
    M = m.W3[..., 0] + m.W3[..., 1] * u[:, 0, None, None] + m.W3[..., 2] * u[:, 1, None, None]
    torch.testing.assert_close(m.transition_mean(1, h, u), torch.tanh((M @ h[..., None])[..., 0] + m.b))
    torch.testing.assert_close(m.transition_mean(1, h, None), torch.tanh(h @ m.W3[..., 0].T + m.b))


def test_echo_state_reservoir_is_fixed_and_scaled(float64):
    m = EchoStateSSM(20, 2, 1, spectral_radius=0.8, leak_rate=0.3, connectivity=0.1, seed=5)
    params = {n for n, _ in m.named_parameters()}
    assert params == {"C_unconstrained", "d_unconstrained", "q_unconstrained", "r_unconstrained", "s0_unconstrained"}
    assert {"W_res", "W_in", "b_res"} <= {n for n, _ in m.named_buffers()}
    assert abs(float(torch.linalg.eigvals(m.W_res).abs().max()) - 0.8) < 1e-10
    assert 0.05 < float((m.W_res != 0).double().mean()) < 0.25
    assert m.weights().numel() == 2 * 20 + 2  # the readout only
    assert capability(m, "perturb") is None


def test_echo_state_closed_form_mstep_is_the_maximiser(float64):
    m = EchoStateSSM(6, 2, 1, seed=1)
    u = torch.randn(3, 25, 1, generator=torch.Generator().manual_seed(2))
    sim = EchoStateSSM(6, 2, 1, seed=1, process_noise=0.2, obs_noise=0.3).simulate(25, 3, inputs=u, seed=3)
    y = sim.observations.clone()
    y[1, 4, 0] = float("nan")
    data = prepare(m, y, inputs=u)
    paths = (sim.states + 0.05 * torch.randn(4, *sim.states.shape, generator=torch.Generator().manual_seed(4)))
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def q(model):
        return float((w * complete_data_log_likelihood(model, paths, data).sum(-1)).sum().detach())

    before = q(m)
    obj = m.closed_form_mstep(paths, data.observations, data.mask, data.inputs, weights=w)
    assert obj == pytest.approx(q(m), rel=1e-9, abs=1e-8)  # the returned value is the objective at the new fit
    assert obj > before + 10
    for name in ("C", "d", "q", "r", "s0"):  # a local maximum in every block
        for sgn in (1.0, -1.0):
            mm = m.copy()
            v = getattr(mm, name).detach()
            setattr(mm, name, v * (1 + sgn * 0.02) + sgn * 0.001)
            assert q(mm) < obj


def test_lstm_noise_placement(float64):
    both, hid = LSTMSSM(2, 1, seed=0, process_noise=0.2), LSTMSSM(2, 1, noise_on="hidden", cell_noise=1e-3, seed=0,
                                                                  process_noise=0.2)
    h = torch.randn(3, 4)
    torch.testing.assert_close(both.transition(1, h, None).stddev, torch.full((3, 4), 0.2))
    torch.testing.assert_close(hid.transition(1, h, None).stddev[0], torch.tensor([0.2, 0.2, 1e-3, 1e-3]))
    torch.testing.assert_close(both.transition_mean(1, h, None), hid.transition_mean(1, h, None))
    assert "q_h_unconstrained" in dict(hid.named_parameters()) and "q_c" in dict(hid.named_buffers())
    # the h-part of the mean is o * tanh(new cell)
    mean = both.transition_mean(1, h, None)
    torch.testing.assert_close(mean[:, :2].abs() <= mean[:, 2:].tanh().abs() + 1e-12, torch.ones(3, 2, dtype=torch.bool))
    # BPTT's noise floor reaches both halves
    y = hid.simulate(8, 1, seed=0).observations
    fit = pr.fit(hid, y, method=BPTT(num_steps=2), seed=0)
    torch.testing.assert_close(fit.model.noise_scales()["process"], torch.full((4,), 1e-4))


def test_deep_markov_emissions(float64):
    b = DeepMarkovSSM(2, 4, emission="bernoulli", seed=0)
    y = b.simulate(10, 3, seed=0).observations
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    t = DeepMarkovSSM(2, 2, emission="student_t", df=3.0, seed=0)
    em = t.emission(1, torch.zeros(2), None)
    torch.testing.assert_close(em.base_dist.df.detach(), torch.full((2,), 3.0))
    assert "df_unconstrained" in dict(t.named_parameters())
    g = DeepMarkovSSM(2, 2, seed=0)
    z = torch.zeros(2)
    torch.testing.assert_close(g.transition(1, z, None).mean, g.transition_loc_scale(1, z, None)[0])
    assert capability(g, "noise_scales") is None  # state-dependent process noise


class _NewCTRNN(CTRNNSSM):
    def transition_mean(self, t, h_prev, u_t):
        return super().transition_mean(t, h_prev, u_t) * 0.5


class _NewESN(EchoStateSSM):
    def transition_mean(self, t, h_prev, u_t):
        return 0.5 * h_prev


def test_a_subclass_that_overrides_the_transition_loses_its_shortcuts():
    caps = set(declared_capabilities(_NewCTRNN(3)))
    assert not caps & {"transition_loc_scale", "transition_jacobian"}
    assert "emission_jacobian" in caps  # the emission is unchanged
    assert capability(_NewESN(4), "closed_form_mstep") is None


@pytest.mark.parametrize("build,match", [
    (lambda: CTRNNSSM(3, dt=1.0, tau=0.5), "tau"),
    (lambda: CTRNNSSM(3, dt=0.0), "dt"),
    (lambda: MultipleTimescalesSSM(2, 2, tau_fast=5.0, tau_slow=2.0), "tau_fast"),
    (lambda: MultipleTimescalesSSM(0, 2), "fast_dim"),
    (lambda: JordanSSM(2, context_decay=1.0), "context_decay"),
    (lambda: JordanSSM(0), "hidden_units"),
    (lambda: JordanSSM(2, activation="relu"), "activation"),
    (lambda: EchoStateSSM(5, spectral_radius=0.0), "spectral_radius"),
    (lambda: EchoStateSSM(5, leak_rate=1.5), "leak_rate"),
    (lambda: EchoStateSSM(5, connectivity=0.0), "connectivity"),
    (lambda: LSTMSSM(2, noise_on="cell"), "noise_on"),
    (lambda: LSTMSSM(0), "units"),
    (lambda: StackedSSM(()), "layer_sizes"),
    (lambda: StackedSSM((2, 0)), "layer_sizes"),
    (lambda: SecondOrderSSM(2, process_noise=-1.0), "process_noise"),
    (lambda: DeepMarkovSSM(2, emission="poisson"), "emission"),
    (lambda: DeepMarkovSSM(2, transition_hidden=0), "transition_hidden"),
])
def test_bad_configurations(build, match):
    with pytest.raises(ConfigurationError, match=match):
        build()


def test_everything_is_deterministic_in_seed():
    for cls in (CTRNNSSM, SecondOrderSSM, EchoStateSSM, DeepMarkovSSM, JordanSSM, StackedSSM):
        arg = (3,) if cls is not StackedSSM else ((2, 2),)
        a, b, c = cls(*arg, seed=7), cls(*arg, seed=7), cls(*arg, seed=8)
        sd_a, sd_b = a.state_dict(), b.state_dict()
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        sa = a.simulate(5, seed=0).observations
        assert torch.equal(sa, b.simulate(5, seed=0).observations)
        assert not torch.equal(sa, c.simulate(5, seed=0).observations)


def test_weights_survive_a_copy():
    """model.copy() (a deepcopy, as every fit makes) keeps the same weight vector (constraint objects are copied)."""
    for m in (CTRNNSSM(3, seed=1), JordanSSM(2, seed=1), EchoStateSSM(4, seed=1), LSTMSSM(2, seed=1)):
        w = m.weights()
        assert w.numel() > 0
        torch.testing.assert_close(m.copy().weights(), w)


# ---- one constructor convention: hidden_dim first, architecture names as keyword aliases, obs_dim=1 ----------
#: every single-size model of the suite (``MODELS`` less the two-size MTRNN) and its size's own name, if any
SINGLE_SIZE = {name: cls for name, cls in MODELS.items() if name != "mtrnn"}
ALIASES = {"jordan": "hidden_units", "echo_state": "reservoir_dim", "lstm": "units", "deep_markov": "latent_dim",
           "stacked": "layer_sizes"}


def _same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (type(a) is type(b) and (a.hidden_dim, a.obs_dim, a.input_dim) == (b.hidden_dim, b.obs_dim, b.input_dim)
            and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa))


@pytest.mark.parametrize("name", list(SINGLE_SIZE))
def test_every_single_size_model_takes_hidden_dim_first_and_obs_dim_defaults_to_one(name):
    cls = SINGLE_SIZE[name]
    by_position, by_keyword = cls(4, seed=3), cls(hidden_dim=4, seed=3)
    assert _same_model(by_position, by_keyword)
    assert by_keyword.obs_dim == 1 and by_keyword.input_dim == 0
    assert cls(hidden_dim=4, obs_dim=2, seed=3).obs_dim == 2
    assert by_keyword.simulate(3, seed=0).observations.shape == (1, 3, 1)


@pytest.mark.parametrize("name", list(ALIASES))
def test_architecture_names_are_keyword_aliases_of_hidden_dim(name):
    cls, alias = SINGLE_SIZE[name], ALIASES[name]
    size = (3, 2) if name == "stacked" else 3
    assert _same_model(cls(**{alias: size}, obs_dim=2, seed=5), cls(hidden_dim=size, obs_dim=2, seed=5))
    assert _same_model(cls(**{alias: size}, seed=5), cls(size, seed=5))
    with pytest.raises(ConfigurationError, match=f"hidden_dim.*{alias}.*Pass only one"):
        cls(size, **{alias: size})
    with pytest.raises(ConfigurationError, match=f"hidden_dim=.*{alias}="):
        cls(hidden_dim=size, **{alias: size})
    with pytest.raises(ConfigurationError, match="needs its size"):
        cls()


def test_size_conventions_of_the_models_whose_state_is_larger_than_their_size():
    """``hidden_dim`` is the size as the architecture counts it; the state (``model.hidden_dim``) may be larger."""
    assert JordanSSM(4, 2).hidden_dim == 6  # hidden units + one context unit per output
    assert LSTMSSM(4).hidden_dim == 8 and LSTMSSM(4).units == 4  # (h, c)
    assert StackedSSM(4).layer_sizes == (4, 2) and StackedSSM((3, 2, 1)).hidden_dim == 6
    mt = MultipleTimescalesSSM(hidden_dim=6)
    assert (mt.fast_dim, mt.slow_dim, mt.hidden_dim, mt.obs_dim) == (4, 2, 6, 1)
    assert _same_model(mt, MultipleTimescalesSSM(4, 2))
    with pytest.raises(ConfigurationError, match="either as hidden_dim"):
        MultipleTimescalesSSM(4, 2, hidden_dim=6)
    with pytest.raises(ConfigurationError, match="needs fast_dim and slow_dim"):
        MultipleTimescalesSSM(4)
    with pytest.raises(ConfigurationError, match="hidden_dim"):
        MultipleTimescalesSSM(hidden_dim=1)
