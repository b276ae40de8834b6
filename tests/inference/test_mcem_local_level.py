r"""Monte Carlo EM's gradient M-step on a user model that declares nothing: the 1-D local-level model.

.. math:: h_0\sim N(0, 10^2),\quad h_t = h_{t-1} + N(0, q^2),\quad y_t = h_t + N(0, r^2),

``q`` and ``r`` positive ``PyroParam`` s, no capability (so ``MonteCarloEM()`` takes the ``GradientMStep``).
Oracles, float64:

* the M-step alone: on fixed weighted paths :math:`\hat Q` has the closed-form maximiser
  :math:`q^2=\sum_s w_s\sum_{t\ge1}(h^s_t-h^s_{t-1})^2/(T-1)`, :math:`r^2=\sum_s w_s\sum_t(y_t-h^s_t)^2/T`;
  L-BFGS run to convergence must reach it (1e-6 relative), and the default step (10 iterations at most,
  ``tol`` 1e-3 nats) must end within 1e-3 nats of that maximum;
* the whole fit: the exact log-likelihood (a scalar Kalman filter written here, maximised by scipy) at the
  fitted ``(q, r)`` must be within 0.01 nats of its maximum (issue 26's acceptance, here with a particle schedule
  that grows to 4000 particles; the wall time is measured in ``benchmarks/bench_mcem.py --local-level``);
* resuming: 2 + 2 iterations equal 4 with either optimiser (the L-BFGS curvature pairs and Adam's moments are
  part of the fit's state).
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference import ParticleSmoother
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.mcem import MonteCarloEM
from ppl_rnn.inference.msteps import GradientMStep, q_hat
from pyro.distributions import constraints
from pyro.nn import PyroParam

import ppl_rnn as pr
from ppl_rnn import StateSpaceModel
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError


class LocalLevel(StateSpaceModel):
    """What a user writes: three conditionals, two positive parameters, no capability."""

    def __init__(self, q: float = 1.0, r: float = 1.0):
        super().__init__(1, 1)
        self.q = PyroParam(torch.tensor([q]), constraint=constraints.positive)
        self.r = PyroParam(torch.tensor([r]), constraint=constraints.positive)

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), 10.0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(h_prev, self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h, self.r).to_event(1)


def exact_log_lik(y: np.ndarray, q: float, r: float) -> float:
    """The local-level model's exact log-likelihood (scalar Kalman filter, prior N(0, 10^2))."""
    m, P, ll = 0.0, 100.0, 0.0
    for t, yt in enumerate(y):
        if t > 0:
            P += q * q
        S = P + r * r
        e = yt - m
        ll -= 0.5 * (math.log(2 * math.pi * S) + e * e / S)
        m, P = m + P / S * e, P * (r * r) / S
    return ll


def exact_mle(y: np.ndarray) -> tuple[float, float, float]:
    from scipy.optimize import minimize

    f = lambda x: -exact_log_lik(y, math.exp(x[0]), math.exp(x[1]))  # noqa: E731
    best = min((minimize(f, x0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
                for x0 in ([0.0, 0.0], [-2.0, 0.0], [0.0, -2.0])), key=lambda r: r.fun)
    return math.exp(best.x[0]), math.exp(best.x[1]), -best.fun


def _data(seed: int = 0, T: int = 100) -> torch.Tensor:
    return LocalLevel(q=0.5, r=1.0).simulate(T, 1, seed=seed).observations


def _paths(y: torch.Tensor, S: int = 40):
    """Weighted paths near the data (not from any smoother: the M-step oracle needs only fixed paths)."""
    g = torch.Generator().manual_seed(7)
    T = y.shape[1]
    h = y[:, :, 0].unsqueeze(0) + 0.6 * torch.randn(S, 1, T, generator=g).cumsum(-1) / math.sqrt(T)
    h = h + 0.3 * torch.randn(S, 1, T, generator=g)
    w = torch.rand(S, generator=g) + 0.5
    return h.unsqueeze(-1), w / w.sum()


def _closed_form(h, w, y):
    q2 = (w * (h[:, 0, 1:, 0] - h[:, 0, :-1, 0]).pow(2).sum(-1)).sum() / (h.shape[2] - 1)
    r2 = (w * (y[0, :, 0] - h[:, 0, :, 0]).pow(2).sum(-1)).sum() / h.shape[2]
    return q2.sqrt(), r2.sqrt()


def test_lbfgs_mstep_reaches_the_closed_form_maximiser(float64):
    y = _data()
    h, w = _paths(y)
    q_star, r_star = _closed_form(h, w, y)
    model = LocalLevel()
    data = prepare(model, y)
    step = GradientMStep(steps=200, tol=1e-12)
    obj = step(model, h, w, data, step.start())
    torch.testing.assert_close(model.q.detach()[0], q_star, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(model.r.detach()[0], r_star, rtol=1e-6, atol=0.0)
    with torch.no_grad():
        assert obj == pytest.approx(float(q_hat(model, h, w, data)), rel=1e-12)
    q_max = obj
    # the default step, from the user's start (q = r = 1, far from the maximiser), ends within 1e-3 nats
    model = LocalLevel()
    step = GradientMStep()
    state = step.start()
    obj = step(model, h, w, data, state)
    assert q_max - 1e-3 <= obj <= q_max + 1e-9, (obj, q_max)
    assert 0 < len(state.s) <= 10  # curvature pairs kept for the next M-step


def test_lbfgs_mstep_never_lowers_q_hat_and_adam_still_available(float64):
    y = _data()
    h, w = _paths(y)
    for opt in ("lbfgs", "adam"):
        model = LocalLevel(q=0.3, r=2.0)
        data = prepare(model, y)
        with torch.no_grad():
            before = float(q_hat(model, h, w, data))
        step = GradientMStep(optimizer=opt, steps=3, lr=0.05)
        after = step(model, h, w, data, step.start())
        assert after > before


def test_lbfgs_mstep_is_monotone_from_a_far_start(float64):
    """One L-BFGS iteration per call from far away (q = 5, r = 0.05): every call raises Q-hat (the line search
    refuses overshooting quasi-Newton steps)."""
    y = _data()
    h, w = _paths(y)
    model = LocalLevel(q=5.0, r=0.05)
    data = prepare(model, y)
    with torch.no_grad():
        prev = float(q_hat(model, h, w, data))
    step = GradientMStep(steps=1, tol=1e-12)
    state = step.start()
    for _ in range(25):
        obj = step(model, h, w, data, state)
        assert obj >= prev
        prev = obj
    q_star, r_star = _closed_form(h, w, y)
    assert abs(float(model.q.detach()) / float(q_star) - 1) < 0.05  # and it gets there
    # stale curvature carried from an earlier M-step (a far too flat Hessian: a huge first step) is refused too
    model = LocalLevel(q=0.3, r=2.0)
    with torch.no_grad():
        before = float(q_hat(model, h, w, data))
    state = step.start({"s": (torch.tensor([10.0, 10.0]),), "y": (torch.tensor([1e-2, 1e-2]),)})
    assert step(model, h, w, data, state) >= before


def test_two_loop_direction_is_the_bfgs_inverse_hessian_times_gradient(float64):
    """The two-loop recursion against the dense BFGS update of the inverse Hessian from the same pairs
    (H_0 = s'y / y'y I of the newest pair; H <- (I - rho s y') H (I - rho y s') + rho s s')."""
    from ppl_rnn.inference.msteps import _two_loop

    g_ = torch.Generator().manual_seed(0)
    n = 5
    A = torch.randn(n, n, generator=g_)
    A = A @ A.T + n * torch.eye(n)  # SPD: y = A s gives s'y > 0
    S = [torch.randn(n, generator=g_) for _ in range(4)]
    Y = [A @ s + 0.1 * torch.randn(n, generator=g_) for s in S]
    g = torch.randn(n, generator=g_)
    H = float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]) * torch.eye(n)
    for s, y in zip(S, Y, strict=True):
        rho = 1.0 / float(s @ y)
        V = torch.eye(n) - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    torch.testing.assert_close(_two_loop(g, S, Y), -H @ g, rtol=1e-10, atol=1e-12)


def test_bad_optimizer_is_refused():
    with pytest.raises(ConfigurationError, match="optimizer"):
        GradientMStep(optimizer="sgd")
    with pytest.raises(ConfigurationError, match="tol"):
        GradientMStep(tol=0.0)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_resume_two_plus_two_equals_four(float64, optimizer):
    y = _data(T=40)
    mc = lambda n: MonteCarloEM(smoother=ParticleSmoother(64, 8, backward="mcmc"), num_iterations=n,  # noqa: E731
                                stopping=ConvergenceRule(tol=0), mstep=GradientMStep(optimizer=optimizer))
    full = pr.fit(LocalLevel(), y, method=mc(4), seed=3)
    half = pr.fit(LocalLevel(), y, method=mc(2), seed=3)
    assert half.state.trainer.mstep is not None
    resumed = pr.fit(LocalLevel(), y, method=mc(4), seed=3, resume=half)
    for name in ("q", "r"):
        np.testing.assert_allclose(getattr(resumed.model, name).detach().numpy(),
                                   getattr(full.model, name).detach().numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(resumed.trace.objective.values[1:], full.trace.objective.values[1:], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_mcem_with_growing_particles_reaches_the_exact_maximum_likelihood(float64):
    """Issue 26: ``MonteCarloEM()`` (defaults: the L-BFGS gradient M-step and its particle growth) ends within
    0.01 nats of the exact maximum. With a constant 500 particles / 100 paths the end point's Monte Carlo noise
    alone costs 0.000-0.018 nats (mean 0.009 over six seeds, ``benchmarks/README.md``); the default growth for
    this M-step (``GradientMStep.particle_growth``: to 4000 particles and 200 paths over the 50 iterations) ends
    at 0.000-0.003 (six runs)."""
    y = _data()
    yn = y[0, :, 0].numpy()
    q_hat_, r_hat_, ll_max = exact_mle(yn)
    method = MonteCarloEM()
    assert method._sizes(49, GradientMStep()) == (4000, 200)  # the default schedule of this M-step
    fit = pr.fit(LocalLevel(), y, seed=0, method=method)
    q, r = float(fit.model.q.detach()), float(fit.model.r.detach())
    gap = ll_max - exact_log_lik(yn, q, r)
    assert -1e-9 <= gap <= 0.01, (gap, (q, r), (q_hat_, r_hat_))
