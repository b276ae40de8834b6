"""The EKF proposal for the particle filter: ESS gain over bootstrap, unbiased evidence (Zhat/Z vs Kalman)."""

import pytest
import torch
from ppl_rnn.inference.ekf_proposal import EKFProposal
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ModelCapabilityError

from .test_ekf import _PoissonEmission


def _pf(model, y, proposal, seed, n=100):
    return pr.infer(model, y, method=pr.inference.ParticleFilter(num_particles=n, proposal=proposal), seed=seed)


def test_ekf_proposal_doubles_ess_on_nonlinear_model(float64):
    model = ElmanSSM(2, 2, process_noise=0.3, obs_noise=0.05, weight_scale=1.3, seed=5)
    y = model.simulate(30, num_sequences=2, seed=1).observations
    ess_b = _pf(model, y, "bootstrap", 0).diagnostics["ess"].mean()
    ess_e = _pf(model, y, "ekf", 0).diagnostics["ess"].mean()
    assert ess_e > 2 * ess_b, (float(ess_e), float(ess_b))


@pytest.mark.slow
def test_ekf_proposal_evidence_unbiased_and_ess(float64):
    """Linear-Gaussian model, r=0.05, missing entries: mean of Zhat/Z over 30 seeds x 2 sequences within 3 SE of 1."""
    model = ElmanSSM(2, 2, activation="identity", process_noise=0.3, obs_noise=0.05, seed=1)
    y = model.simulate(30, num_sequences=2, seed=0).observations
    y[0, 5, 1] = float("nan")
    y[1, 7] = float("nan")
    logZ = pr.infer(model, y, method=pr.inference.KalmanFilter()).log_evidence
    runs = [_pf(model, y, "ekf", s) for s in range(30)]
    ratio = torch.stack([torch.exp(r.log_evidence - logZ) for r in runs]).reshape(-1)
    mean, se = float(ratio.mean()), float(ratio.std() / ratio.numel() ** 0.5)
    assert abs(mean - 1.0) < 3 * se, (mean, se)
    assert se < 0.05  # the test has power: Zhat/Z is tightly concentrated with this proposal
    ess_e = torch.stack([r.diagnostics["ess"].mean() for r in runs[:5]]).mean()
    ess_b = torch.stack([_pf(model, y, "bootstrap", s).diagnostics["ess"].mean() for s in range(5)]).mean()
    assert ess_e > 2 * ess_b, (float(ess_e), float(ess_b))


def test_ekf_proposal_shapes_and_registry(float64):
    model = ElmanSSM(3, 2, seed=0)
    prop = pr.inference.proposals.get_proposal("ekf")
    assert isinstance(prop, EKFProposal)
    y = model.simulate(3, num_sequences=4, seed=0).observations
    data = pr.prepare(model, y)
    prop.setup(model, data, 7)
    h0, lq0 = prop.propose(model, 0, None, data.observations[:, 0], data.mask[:, 0], None)
    assert h0.shape == (7, 4, 3) and lq0.shape == (7, 4)
    mask = data.mask[:, 1].clone()
    mask[:] = False  # fully missing step: the proposal is the transition itself
    h1, lq1 = prop.propose(model, 1, h0, data.observations[:, 1], mask, None)
    torch.testing.assert_close(lq1, model.transition(1, h0, None).log_prob(h1))
    with pytest.raises(ModelCapabilityError, match="emission"):
        pr.infer(_PoissonEmission(2, 1), torch.ones(1, 4, 1), method=pr.inference.ParticleFilter(
            num_particles=10, proposal="ekf"), seed=0)


def test_ekf_proposal_analytic_jacobian_equals_autograd(float64):
    """ElmanSSM's analytic emission Jacobian gives the same proposal (same random stream) as autograd, which a
    subclass that overrides the emission falls back to."""
    from ppl_rnn.inference import ParticleFilter

    class Sub(ElmanSSM):
        def emission(self, t, h, u_t):
            return super().emission(t, h, u_t)

    kw = dict(seed=2, obs_noise=0.05, process_noise=0.2)
    m, s = ElmanSSM(3, 2, **kw), Sub(3, 2, **kw)
    from ppl_rnn.capabilities import capability

    assert capability(m, "emission_jacobian") is not None
    assert capability(s, "emission_jacobian") is None
    y = m.simulate(40, 2, seed=1).observations
    y[0, 5, 1] = float("nan")
    a = pr.infer(m, y, method=ParticleFilter(64, proposal="ekf"), seed=3)
    b = pr.infer(s, y, method=ParticleFilter(64, proposal="ekf"), seed=3)
    torch.testing.assert_close(a.log_evidence, b.log_evidence, atol=1e-8, rtol=0)
    torch.testing.assert_close(a.mean, b.mean, atol=1e-8, rtol=0)
