"""Monte Carlo EM's linear warm start (``MonteCarloEM(start=LinearStart())``), rejection and convergence default.

* the warm start is exact KalmanEM on the model's ``linear_special_case`` embedded through ``embed_linear``
  (gain 0.1): the run's row 0 is that embedding, and in the tanh network's linear regime it has (nearly) the
  linear fit's exact log-evidence;
* a model without the capabilities gets a ModelCapabilityError naming them (no Elman-specific code);
* acceptance (issue 10): from the linear warm start MCEM never ends below its start's held-out
  log-evidence (within 2 SE), on a short sharp simulated series and on the real breathing series.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanEM, KalmanFilter, ParticleFilter, ParticleSmoother
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.mcem import MonteCarloEM
from ppl_rnn.inference.starts import LinearStart
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ModelCapabilityError


def _heldout(model, ytr, yall, N=1000, seeds=(0, 1, 2)):
    """Held-out log-evidence per test entry, log p(y_all) - log p(y_train), by the particle filter (mean and
    standard error over independent seeds)."""
    n_te = yall.shape[-2] - ytr.shape[-2]
    m = model.copy().double()
    vals = []
    for s in seeds:
        a = float(pr.infer(m, yall, method=ParticleFilter(N), seed=s).log_evidence.sum())
        b = float(pr.infer(m, ytr, method=ParticleFilter(N), seed=1000 + s).log_evidence.sum())
        vals.append((a - b) / n_te)
    return float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals)))


def _sharp_series(T=300, seed=0):
    """A sharp, linear-ish oscillation: a damped rotation with small process noise, r = 0.01."""
    true = ElmanSSM(2, 1, activation="identity", process_noise=0.03, obs_noise=0.01, init_scale=0.5, seed=1)
    th = 2 * math.pi / 25
    true.W = 0.995 * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    true.C = torch.tensor([[1.0, 0.0]])
    return true.simulate(T, 1, seed=seed).observations[0]


@pytest.mark.slow
@pytest.mark.parametrize("init_linear", ["ar", "model"])
def test_linear_start_is_the_embedded_kalman_em_fit(float64, init_linear):
    """The start is KalmanEM's fit (begun at AR fits in companion form by default, or at the model) embedded
    at the default gain 0.01."""
    y = _sharp_series(200)
    m = ElmanSSM(2, 1, seed=3)
    r = pr.fit(m, y, method=MonteCarloEM(start=LinearStart(iterations=30, begin=init_linear), num_iterations=1,
                                         smoother=ParticleSmoother(100, 20)), seed=0)
    lin = pr.fit(m.linear_special_case(), y, method=KalmanEM(num_iterations=30, tol=1e-9, init=init_linear),
                 seed=0).model
    assert r.diagnostics["init_linear"] == init_linear
    start = r.diagnostics["initial_model"]
    np.testing.assert_allclose(r.trace.W.values[0], lin.W.detach().numpy(), rtol=1e-8)
    np.testing.assert_allclose(start.C.detach().numpy(), lin.C.detach().numpy() / 0.01, rtol=1e-8)
    np.testing.assert_allclose(start.q.detach().numpy(), 0.01 * lin.q.detach().numpy(), rtol=1e-8)
    assert r.diagnostics["init"] == "linear" and r.diagnostics["init_gain"] == 0.01
    exact = float(pr.infer(lin, y, method=KalmanFilter()).log_evidence.sum())
    assert r.diagnostics["init_exact_log_evidence"] == pytest.approx(exact, rel=1e-9)
    # the tanh network in its linear regime has nearly the linear fit's evidence (the filter's estimate)
    est = float(pr.infer(start, y, method=ParticleFilter(2000), seed=0).log_evidence.sum())
    assert abs(est - exact) / y.shape[0] < 0.02


def test_linear_start_needs_declared_capabilities(float64):
    class Other(ElmanSSM):  # overrides transition: inherits neither linear_special_case nor embed_linear
        def transition(self, t, h_prev, u_t):
            return super().transition(t, h_prev, u_t)

    with pytest.raises(ModelCapabilityError, match="linear_special_case"):
        pr.fit(Other(2, 1), _sharp_series(50), method=MonteCarloEM(start=LinearStart(), num_iterations=1))


def _never_below_start(y_train, y_all, H, iters, N):
    m = ElmanSSM(H, 1, seed=0)
    r = pr.fit(m, y_train, method=MonteCarloEM(start=LinearStart(iterations=100), num_iterations=iters,
                                               smoother=ParticleSmoother(N, 50, backward="mcmc")), seed=0)
    start = _heldout(r.diagnostics["initial_model"], y_train, y_all)
    end = _heldout(r.model, y_train, y_all)
    se = math.hypot(start[1], end[1])
    assert end[0] >= start[0] - 2 * se - 1e-3, (start, end, r.trace.log_evidence.values)
    return start, end, r


@pytest.mark.slow
def test_mcem_from_linear_start_never_ends_below_it_sharp_series(float64):
    y = _sharp_series(300)
    _never_below_start(y[:200], y, H=2, iters=6, N=200)


@pytest.mark.slow
def test_mcem_from_linear_start_never_ends_below_it_breathing(float64):
    datasets = pytest.importorskip("ppl_rnn.workbench.datasets")
    try:
        d = datasets.load("respiration", window=(730.0, 16.0), train_s=12.0, dtype=torch.float64)
    except ImportError:
        pytest.skip("the respiration data needs the 'data' extra")
    tr, te = d.split()
    _never_below_start(tr.values[0], torch.cat([tr.values, te.values], 1)[0], H=3, iters=5, N=200)


class _Sabotaged(ElmanSSM):
    """Its second M-step multiplies the observation noise by 30: the evidence falls by far more than 3 SE."""

    calls = 0

    def closed_form_mstep(self, *args, **kwargs):
        out = super().closed_form_mstep(*args, **kwargs)
        type(self).calls += 1
        if type(self).calls == 2:
            self.r = 30.0 * self.r.detach()
        return out


def test_mcem_rejects_a_falling_iteration_and_raises_particles(float64):
    y = _sharp_series(60)
    _Sabotaged.calls = 0
    m = _Sabotaged(2, 1, activation="identity", seed=5)
    r = pr.fit(m, y, method=MonteCarloEM(smoother=ParticleSmoother(100, 20), num_iterations=3,
                                         stopping=ConvergenceRule(tol=0)), seed=0)
    tr = r.trace
    rej = tr.rejected.values
    assert rej.sum() == 1
    i = int(np.argmax(rej))
    np.testing.assert_allclose(tr.r.values[i], 30.0 * tr.r.values[i - 1], rtol=0.5)  # the sabotaged step...
    np.testing.assert_allclose(tr.r.values[i + 1], tr.r.values[i - 1])  # ...undone: theta_k evaluated again
    np.testing.assert_array_equal(tr.num_particles.values[i + 1:], 200)  # with twice the particles
    assert (tr.log_evidence_se.values[rej == 0] > 0).all()
    assert float(r.model.r.detach()) < 5 * tr.r.values[i - 1]
    assert r.diagnostics["num_iterations"] == 3
