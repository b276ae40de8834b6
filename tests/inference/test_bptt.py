"""BPTT: deterministic (zero process noise) training, float64.

* oracle: the BPTT objective is the exact Kalman log-evidence of the identity network with (near-)zero
  process noise and initial spread;
* fitting raises the objective, fits r, and returns a copy whose process noise / initial spread sit at the
  floor (the input model untouched); truncation; divergence and error cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanFilter
from ppl_rnn.inference.bptt import BPTT, deterministic_log_likelihood, set_noise_floor
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DivergenceError, ModelCapabilityError
from ppl_rnn.model import StateSpaceModel


@pytest.mark.parametrize("kind", ["elman", "lg"])
def test_objective_is_zero_noise_kalman_evidence(float64, kind):
    if kind == "elman":
        m = ElmanSSM(2, 2, activation="identity", obs_noise=0.3, seed=2)
        m.m0 = torch.tensor([0.5, -1.0])
    else:
        m = LinearGaussianSSM(2, 2, m0=torch.tensor([0.5, -1.0]), seed=2)
    y = torch.randn(2, 25, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y[0, 4, 0] = float("nan")
    set_noise_floor(m, 1e-7)
    for role in ("process", "initial"):
        sc = m.noise_scales()[role].detach()
        want = torch.full((2,), 1e-7) if sc.dim() == 1 else 1e-7 * torch.eye(2)
        torch.testing.assert_close(sc, want, rtol=1e-6, atol=1e-12)
    det = deterministic_log_likelihood(m, prepare(m, y))
    exact = pr.infer(m, y, method=KalmanFilter()).log_evidence
    torch.testing.assert_close(det.detach(), exact, rtol=1e-6, atol=1e-6)


def test_fit_raises_objective_and_floors_noise(float64):
    true = ElmanSSM(2, 1, process_noise=1e-3, obs_noise=0.2, weight_scale=1.5, seed=1)
    true.m0 = torch.tensor([0.8, -0.5])
    y = true.simulate(50, 1, seed=0).observations
    m = ElmanSSM(2, 1, seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = pr.fit(m, y, method=BPTT(num_steps=100, lr=0.05), seed=0)
    obj = r.trace.objective.values
    assert r.evidence_kind == "approximation" and np.isfinite(obj).all()
    assert obj[-1] > obj[0] + 30
    torch.testing.assert_close(r.model.q.detach(), torch.full((2,), 1e-4))
    torch.testing.assert_close(r.model.s0.detach(), torch.full((2,), 1e-4))
    assert 0.1 < float(r.model.r.detach()) < 0.4  # the observation noise is fitted (true 0.2)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    # the trace's last objective is the deterministic log-likelihood of the returned model
    assert obj[-1] == pytest.approx(float(deterministic_log_likelihood(r.model, prepare(m, y)).sum().detach()), rel=1e-9)
    # truncated BPTT also trains
    r2 = pr.fit(m, y, method=BPTT(num_steps=40, lr=0.05, truncation=10), seed=0)
    assert r2.trace.objective.values[-1] > r2.trace.objective.values[0]


class _NaNAfter(ElmanSSM):
    """Its dynamics blow up (NaN) once the output offset has moved away from 0."""

    def transition_mean(self, t, h_prev, u_t):
        out = super().transition_mean(t, h_prev, u_t)
        return out * float("nan") if float(self.d.detach()[0]) > 0.05 else out


def test_divergence_and_errors(float64):
    y = 1.0 + 0.1 * torch.randn(30, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(DivergenceError) as ei:
        pr.fit(_NaNAfter(2, 1, seed=0), y, method=BPTT(num_steps=50, lr=0.05), seed=0)
    assert ei.value.iteration >= 1 and ei.value.last_good is not None
    assert all(bool(torch.isfinite(p).all()) for p in ei.value.last_good.model.parameters())
    with pytest.raises(ConfigurationError):
        BPTT(num_steps=0)
    with pytest.raises(ConfigurationError):
        BPTT(truncation=0)

    class NoNoise(StateSpaceModel):
        def __init__(self):
            super().__init__(1, 1)
            self.a = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ModelCapabilityError):
        pr.fit(NoNoise(), y, method=BPTT(num_steps=2))


def _long_oscillation(T=800):
    """A breathing-like float32 series (period ~80 steps, small noise) of T steps."""
    g = torch.Generator().manual_seed(3)
    t = torch.arange(T, dtype=torch.float32)
    return (torch.sin(2 * torch.pi * t / 80) + 0.05 * torch.randn(T, generator=g)).unsqueeze(-1)


def test_default_bptt_first_gradient_is_finite_on_a_long_series():
    """Bug 8: with m0 = b = 0 the default network starts at h = 0 and the full-BPTT gradient grows like
    rho(W)^T (rho = 1.14 for ElmanSSM(8, seed=0)): at T = 800 it overflowed float32 (NaN at the first
    step). The default (truncation + gradient clipping) trains."""
    m = ElmanSSM(8)
    assert m.W.dtype == torch.float32
    assert float(torch.linalg.eigvals(m.W.detach()).abs().max()) > 1.1
    y = _long_oscillation()
    r = pr.fit(m, y, method=BPTT(num_steps=6, lr=0.02), seed=0)
    obj = r.trace.objective.values
    assert np.isfinite(obj).all() and obj[-1] > obj[0] + 500


def test_bptt_first_gradient_real_breathing_series():
    """Bug 8 on the real series of the report: 800 steps of the breathing trace, default ElmanSSM(8)."""
    datasets = pytest.importorskip("ppl_rnn.workbench.datasets")
    try:
        d = datasets.load("respiration")
    except ImportError:
        pytest.skip("the respiration data needs the 'data' extra")
    y = d.values[0, 20000:20800].float()
    r = pr.fit(ElmanSSM(8), y, method=BPTT(num_steps=5, lr=0.02), seed=0)
    obj = r.trace.objective.values
    assert np.isfinite(obj).all() and obj[-1] > obj[0]


def test_full_bptt_overflow_error_says_what_applies():
    """Full BPTT (truncation=None, no clipping) still overflows float32 here; the error names the cause and
    fixes that apply (truncation, float64), not particles."""
    with pytest.raises(DivergenceError) as ei:
        pr.fit(ElmanSSM(8), _long_oscillation(), method=BPTT(num_steps=3, truncation=None, max_grad_norm=None),
               seed=0)
    msg = str(ei.value)
    assert "truncation" in msg and "float64" in msg and "particles" not in msg
    assert ei.value.last_good is not None
