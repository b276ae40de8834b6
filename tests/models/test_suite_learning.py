"""Learning acceptance for Elman-family suite models (echo state, CTRNN, MTRNN, Jordan; slow): simulate from a known network, fit by Monte Carlo EM from
a different random start, and score both on held-out sequences with the common yardstick (particle-filter
log-evidence per step, many particles)."""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference import MonteCarloEM, ParticleFilter, ParticleSmoother
from ppl_rnn.models import CTRNNSSM, EchoStateSSM, JordanSSM, MultipleTimescalesSSM

import ppl_rnn as pr

pytestmark = pytest.mark.slow


def _per_step(model, y, u=None):
    post = pr.infer(model, y, inputs=u, method=ParticleFilter(2000), seed=11)
    return float(post.log_evidence.sum()) / (y.shape[0] * y.shape[1])


def _gradient_em_scores(true, start):
    """Simulate 6 sequences of 100 steps from ``true``, fit ``start`` on 4 by MCEM (8 iterations, gradient
    M-step), and score the truth, the start and the fit on the other 2 (nats/step)."""
    y = true.simulate(100, 6, seed=3).observations
    fit = pr.fit(start, y[:4], seed=0, method=MonteCarloEM(
        num_iterations=8, gradient_steps=25, lr=0.02, smoother=ParticleSmoother(300, 30, backward="mcmc")))
    return tuple(_per_step(m, y[4:]) for m in (true, start, fit.model))


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
    T = 100
    g = torch.Generator().manual_seed(0)
    u = torch.sin(torch.arange(6 * T, dtype=torch.float32) / 5).reshape(6, T, 1) + 0.3 * torch.randn(6, T, 1, generator=g)
    y = true.simulate(T, 6, inputs=u, seed=3).observations
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
