"""The method matrix on the model suite: every suite model x the remaining generic methods (particle smoother, SVI with
each guide, EKF-EM, BPTT) runs on a short simulated sequence and gives finite results, or raises the documented
ModelCapabilityError where the pair does not apply. (Particle filter, Monte Carlo EM, EKF smoother, Kalman and
KalmanEM are in test_suite.py.)"""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference import BPTT, EKFEM, SVI, ParticleSmoother

import ppl_rnn as pr
from ppl_rnn.capabilities import capability
from ppl_rnn.errors import ModelCapabilityError

from .test_suite import SPECS, data

MODELS = list(SPECS)
GUIDES = ("mean_field", "markov_gaussian", "amortized", "ekf")


def _finite_posterior(post, H):
    assert post.mean.shape[-1] == H
    assert torch.isfinite(post.mean).all() and torch.isfinite(post.log_evidence).all()


@pytest.mark.parametrize("name", MODELS)
def test_particle_smoother(name):
    m = SPECS[name][0](1)
    sim, u = data(m)
    post = pr.infer(m, sim.observations, inputs=u, method=ParticleSmoother(100, 10), seed=0)
    _finite_posterior(post, m.hidden_dim)
    assert post.kind == "smoothing"


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("lstm_h", "dmm_t")])  # same code paths as lstm, dmm_bern
def test_svi_each_guide(name, guide):
    m = SPECS[name][0](1)
    sim, u = data(m)
    method = SVI(guide=guide, num_steps=2, num_eval_particles=4, num_posterior_samples=4)
    if guide == "ekf" and not SPECS[name][2]:
        with pytest.raises(ModelCapabilityError, match="Gaussian"):
            pr.fit(m, sim.observations, inputs=u, method=method, seed=0)
        return
    fit = pr.fit(m, sim.observations, inputs=u, method=method, seed=0)
    assert all(torch.isfinite(p).all() for p in fit.model.parameters())
    _finite_posterior(fit.posterior, m.hidden_dim)


@pytest.mark.parametrize("name", MODELS)
def test_ekf_em_where_gaussian(name):
    m = SPECS[name][0](1)
    sim, u = data(m)
    method = EKFEM(num_iterations=1, num_samples=2, mstep_steps=2)
    if not SPECS[name][2]:
        with pytest.raises(ModelCapabilityError, match="Gaussian"):
            pr.fit(m, sim.observations, inputs=u, method=method, seed=0)
        return
    fit = pr.fit(m, sim.observations, inputs=u, method=method, seed=0)
    assert all(torch.isfinite(p).all() for p in fit.model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_bptt_where_the_noise_can_be_set(name):
    m = SPECS[name][0](1)
    sim, u = data(m)
    if capability(m, "noise_scales") is None:
        with pytest.raises(ModelCapabilityError, match="noise_scales"):
            pr.fit(m, sim.observations, inputs=u, method=BPTT(num_steps=2), seed=0)
        return
    fit = pr.fit(m, sim.observations, inputs=u, method=BPTT(num_steps=3, lr=0.01), seed=0)
    assert all(torch.isfinite(p).all() for p in fit.model.parameters())
    le = torch.as_tensor(fit.trace.log_evidence.values)
    assert torch.isfinite(le).all() and le[-1] > le[0]  # three Adam steps raise the deterministic likelihood


@pytest.mark.parametrize("name", MODELS)
def test_the_common_yardstick_scores_every_model(name):
    """pr.evaluate (held-out log-evidence by a particle filter, forecast CRPS) takes every suite model."""
    m = SPECS[name][0](0)
    y = m.simulate(20, 2, seed=0).observations
    ds = pr.evaluate(m, y[:, :14], y[:, 14:], horizons=(1, 2), num_particles=100, max_particles=100,
                     num_replicates=2, se_tol=None, num_samples=10, seed=0)
    assert torch.isfinite(torch.as_tensor(float(ds.heldout_logev_per_step)))
    assert torch.isfinite(torch.as_tensor(ds.crps.values)).all()
