"""The recurrent model suite: every model simulates, its declared capabilities agree with the conditionals they
speak for, generic methods run on it, inapplicable methods raise ModelCapabilityError, and its ``forward`` is an
ordinary Pyro program (Predictive, poutine.trace, SVI with Pyro's AutoNormal)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from ppl_rnn.inference import (
    BPTT,
    ClosedFormMStep,
    ExtendedKalmanSmoother,
    KalmanEM,
    KalmanSmoother,
    MonteCarloEM,
    ParticleFilter,
    ParticleSmoother,
)
from ppl_rnn.models import (
    CTRNNSSM,
    GRUSSM,
    LSTMSSM,
    MODELS,
    DeepMarkovSSM,
    EchoStateSSM,
    JordanSSM,
    MultipleTimescalesSSM,
    SecondOrderSSM,
    StackedSSM,
)
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import ppl_rnn as pr
from ppl_rnn.capabilities import capability, declared_capabilities
from ppl_rnn.errors import ModelCapabilityError

FRAME = {"emission_loc_scale", "linear_gaussian_emission", "emission_jacobian", "noise_scales", "set_noise_scales",
         "weights", "set_weights"}
# the Levenberg-Marquardt M-step and the rotation restart (models/_lm_mstep.py; issue 27 point 3)
DIAG = FRAME | {"transition_loc_scale", "transition_jacobian", "perturb", "closed_form_mstep", "rotation_restart"}

# name -> (builder(input_dim), expected capabilities, gaussian emission)
SPECS = {
    "ctrnn": (lambda I: CTRNNSSM(3, 2, I, dt=0.5, tau=[1.0, 2.0, 4.0], seed=1), DIAG, True),
    "mtrnn": (lambda I: MultipleTimescalesSSM(2, 2, 2, I, seed=1), DIAG, True),
    "jordan": (lambda I: JordanSSM(3, 2, I, seed=1), FRAME | {"transition_jacobian", "perturb", "closed_form_mstep"},
               True),
    "second_order": (lambda I: SecondOrderSSM(3, 2, I, seed=1), DIAG, True),
    "echo_state": (lambda I: EchoStateSSM(8, 2, I, seed=1), FRAME | {"transition_loc_scale", "transition_jacobian",
                                                                   "closed_form_mstep"}, True),
    "gru": (lambda I: GRUSSM(3, 2, I, seed=1), DIAG, True),
    "lstm": (lambda I: LSTMSSM(2, 2, I, seed=1), DIAG, True),
    "lstm_h": (lambda I: LSTMSSM(2, 2, I, noise_on="hidden", seed=1), DIAG, True),
    "stacked": (lambda I: StackedSSM((3, 2), 2, I, seed=1), DIAG, True),
    "dmm_gauss": (lambda I: DeepMarkovSSM(2, 2, I, emission="gaussian", seed=1),
                  {"transition_loc_scale", "emission_loc_scale"}, True),
    "dmm_bern": (lambda I: DeepMarkovSSM(2, 3, I, emission="bernoulli", seed=1), {"transition_loc_scale"}, False),
    "dmm_t": (lambda I: DeepMarkovSSM(2, 2, I, emission="student_t", seed=1), {"transition_loc_scale"}, False),
}
NAMES = list(SPECS)
T, B = 12, 2


def build(name, I=1):
    return SPECS[name][0](I)


def data(model, I=1, seed=0):
    u = torch.randn(B, T, I, generator=torch.Generator().manual_seed(seed)) if I else None
    return model.simulate(T, B, inputs=u, seed=seed), u


@pytest.mark.parametrize("name", NAMES)
def test_simulate_shapes_and_declared_capabilities(name):
    m = build(name)
    sim, u = data(m)
    H, D = m.hidden_dim, m.obs_dim
    assert sim.states.shape == (B, T, H) and sim.observations.shape == (B, T, D)
    assert torch.isfinite(sim.states).all() and torch.isfinite(sim.observations).all()
    assert set(declared_capabilities(m)) == SPECS[name][1]
    m0 = build(name, I=0)  # every model also runs without inputs
    assert torch.isfinite(m0.simulate(5, 1, seed=0).observations).all()


def _points(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, B, m.hidden_dim, generator=g, dtype=torch.float64),
            torch.randn(B, m.input_dim, generator=g, dtype=torch.float64) if m.input_dim else None)


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_agree_with_the_conditionals(name, float64):
    m = build(name)
    h, u = _points(m)
    caps = set(declared_capabilities(m))
    tr, em = m.transition(3, h, u), m.emission(3, h, u)
    if "transition_loc_scale" in caps:
        loc, scale = m.transition_loc_scale(3, h, u)
        torch.testing.assert_close(loc.expand_as(tr.mean), tr.mean)
        torch.testing.assert_close(scale.expand_as(tr.stddev), tr.stddev)
    if "emission_loc_scale" in caps:
        loc, scale = m.emission_loc_scale(3, h, u)
        torch.testing.assert_close(loc.expand_as(em.mean), em.mean)
        torch.testing.assert_close(scale.expand_as(em.stddev), em.stddev)
    if "transition_jacobian" in caps:
        J = m.transition_jacobian(3, h[0], u)
        for b in range(B):
            ub = None if u is None else u[b]
            Jb = torch.func.jacrev(lambda x, ub=ub: m.transition(3, x, ub).mean)(h[0, b])
            torch.testing.assert_close(J[b], Jb)
        torch.testing.assert_close(m.transition_jacobian(3, h[0], u, mean=tr.mean[0]), J)
    if "emission_jacobian" in caps:
        J = m.emission_jacobian(3, h[0], u)
        Jb = torch.func.jacrev(lambda x: m.emission(3, x, None if u is None else u[0]).mean)(h[0, 0])
        torch.testing.assert_close(J[0], Jb)
    if "linear_gaussian_emission" in caps:
        C, off, R = m.linear_gaussian_emission(3, u)
        torch.testing.assert_close((h @ C.transpose(-1, -2) + off).expand_as(em.mean), em.mean)
        torch.testing.assert_close(torch.diag_embed(em.variance), R.expand(em.mean.shape + R.shape[-1:]))
    if "noise_scales" in caps:
        sc = m.noise_scales()
        assert set(sc) == {"initial", "process", "obs"}
        m.set_noise_scales(process=0.3 * torch.ones_like(sc["process"]), obs=0.2)
        torch.testing.assert_close(m.noise_scales()["obs"], torch.full((m.obs_dim,), 0.2))
        torch.testing.assert_close(m.noise_scales()["process"], torch.full_like(sc["process"], 0.3))
        torch.testing.assert_close(m.emission(3, h, u).stddev, torch.full_like(em.stddev, 0.2))
    if "weights" in caps:
        w = m.weights()
        m.set_weights(w + 0.1)
        torch.testing.assert_close(m.weights(), w + 0.1)
        assert not torch.allclose(m.transition(3, h, u).mean, tr.mean) or not torch.allclose(
            m.emission(3, h, u).mean, em.mean)
        m.set_weights(3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype))
        assert torch.isfinite(m.transition(3, h, u).mean).all()  # any real vector is a valid network
        m.set_weights(w)
        torch.testing.assert_close(m.transition(3, h, u).mean, tr.mean)
    if "perturb" in caps:
        before = m.transition(3, h, u).mean
        m.perturb(0.5, torch.Generator().manual_seed(0))
        assert not torch.allclose(m.transition(3, h, u).mean, before)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_an_ordinary_pyro_program(name):
    m = build(name)
    (sim, u) = data(m)
    y = sim.observations
    pred = Predictive(m, num_samples=3)(inputs=u, num_steps=T, num_sequences=B)
    assert pred["h_0"].shape == (3, B, m.hidden_dim) and pred[f"y_{T - 1}"].shape == (3, B, m.obs_dim)
    tr = pyro.poutine.trace(m).get_trace(y, u)
    assert math.isfinite(float(tr.log_prob_sum().detach()))
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(0)
        guide = AutoNormal(m)
        svi = SVI(m, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        losses = [svi.step(y, u) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], v) for k, v in m.named_parameters())  # SVI trains the model too


@pytest.mark.parametrize("name", NAMES)
def test_particle_filter_and_mcem_run(name):
    m = build(name)
    sim, u = data(m)
    post = pr.infer(m, sim.observations, inputs=u, method=ParticleFilter(200), seed=0)
    assert post.mean.shape == (B, T, m.hidden_dim)
    assert torch.isfinite(post.log_evidence).all() and torch.isfinite(post.mean).all()
    fit = pr.fit(m, sim.observations, inputs=u, seed=0,
                 method=MonteCarloEM(num_iterations=2, smoother=ParticleSmoother(64, 8, backward="mcmc")))
    assert torch.isfinite(torch.as_tensor(fit.trace.log_evidence.values)).all()
    assert all(torch.isfinite(p).all() for p in fit.model.parameters())
    assert fit.model is not m


@pytest.mark.parametrize("name", NAMES)
def test_ekf_where_the_emission_is_gaussian_else_a_clear_error(name):
    m = build(name)
    sim, u = data(m)
    if SPECS[name][2]:
        post = pr.infer(m, sim.observations, inputs=u, method=ExtendedKalmanSmoother())
        assert torch.isfinite(post.log_evidence).all() and torch.isfinite(post.mean).all()
    else:
        with pytest.raises(ModelCapabilityError, match="Gaussian"):
            pr.infer(m, sim.observations, inputs=u, method=ExtendedKalmanSmoother())


@pytest.mark.parametrize("name", NAMES)
def test_inapplicable_methods_raise_model_capability_error(name):
    m = build(name)
    sim, u = data(m)
    with pytest.raises(ModelCapabilityError, match="linear_gaussian"):
        pr.fit(m, sim.observations, inputs=u, method=KalmanEM(num_iterations=2))
    with pytest.raises(ModelCapabilityError, match="linear_gaussian"):
        pr.infer(m, sim.observations, inputs=u, method=KalmanSmoother())
    if capability(m, "closed_form_mstep") is None:
        with pytest.raises(ModelCapabilityError, match="closed_form_mstep"):
            pr.fit(m, sim.observations, inputs=u, method=MonteCarloEM(num_iterations=1, mstep=ClosedFormMStep()))
    if capability(m, "noise_scales") is None:
        with pytest.raises(ModelCapabilityError, match="noise_scales"):
            pr.fit(m, sim.observations, inputs=u, method=BPTT(num_steps=2))


def test_models_registry_lists_every_model():
    assert set(MODELS) >= {"elman", "jordan", "echo_state", "gru", "lstm", "ctrnn", "mtrnn", "second_order",
                           "stacked", "deep_markov"}
    for cls in MODELS.values():
        assert issubclass(cls, pr.StateSpaceModel)
