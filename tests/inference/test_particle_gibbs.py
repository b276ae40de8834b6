"""Particle Gibbs with ancestor sampling: the CSMC kernel against the Kalman smoother, the update rate that
ancestor sampling buys, and the parameter posterior against the exact oracle."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference.kalman import ffbs_sample, kalman_filter, rts_smoother
from ppl_rnn.inference.particle_gibbs import (
    HMCStep,
    ParticleGibbs,
    conjugate_noise_draw,
    conjugate_noise_sites,
    csmc_sweep,
    inverse_gamma_scale,
)
from ppl_rnn.models import LinearGaussianSSM
from pyro.nn import PyroSample

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.priors import ParameterSpace
from ppl_rnn.rng import seeded

from .pmcmc_oracle import LinearGaussian1D, exact_posterior, kalman_log_likelihood, mc_se, oracle_data, rhat


def _lgssm():
    return LinearGaussianSSM(2, 1, seed=3, R=0.01 * torch.eye(1))


@pytest.mark.parametrize("proposal,ancestor_sampling,path_sampling", [
    ("bootstrap", True, "ancestor"), ("adapted", True, "ancestor"), ("bootstrap", False, "ancestor"),
    ("bootstrap", True, "backward"), ("adapted", True, "backward")])
def test_csmc_kernel_leaves_the_smoothing_distribution_invariant(float64, proposal, ancestor_sampling,
                                                                 path_sampling):
    """Exact check of the kernel: 2000 chains (replicate sequences) start at exact FFBS draws of p(h | y, θ);
    after 3 CSMC sweeps with N = 4 particles each chain's path is still an exact draw, so the path means are
    within 4.5 SE of the RTS smoother's at every (t, unit) and the variances within 4.5 SE (SE = sqrt(2/B))."""
    model = _lgssm()
    y = model.simulate(15, 1, seed=5).observations.clone()
    y[0, 6] = float("nan")  # a missing step
    B = 2000
    data = prepare(model, y.expand(B, -1, -1).clone())
    p = model.linear_gaussian()
    f = kalman_filter(p, data.observations, data.mask, data.inputs)
    rts = rts_smoother(p.A, f)
    with seeded(0):
        path = ffbs_sample(p.A, f, 1)[0].detach()
        for _ in range(3):
            path, rec = csmc_sweep(model, data, path, 4, proposal=proposal, ancestor_sampling=ancestor_sampling,
                                   path_sampling=path_sampling)
    assert rec.proposal == proposal
    m_exact = rts.mean[0].detach()
    v_exact = torch.diagonal(rts.cov[0], dim1=-2, dim2=-1).detach()
    z = (path.mean(0) - m_exact) / (v_exact / B).sqrt()
    assert z.abs().max() < 4.5, z
    zv = (path.var(0) / v_exact - 1) / math.sqrt(2 / B)
    assert zv.abs().max() < 4.5, zv


def test_csmc_reference_is_pinned_and_validated(float64):
    """The reference occupies the last particle slot at every step; bad references and proposals are refused."""
    model = _lgssm()
    data = prepare(model, model.simulate(10, 2, seed=1).observations)
    ref = torch.randn(2, 10, 2)
    with seeded(1):
        _, rec = csmc_sweep(model, data, ref, 5, proposal="bootstrap")
    assert torch.equal(rec.particles[:, -1].transpose(0, 1), ref)
    with pytest.raises(ConfigurationError, match="reference must be a tensor of shape"):
        csmc_sweep(model, data, ref[:, :5], 5)
    with pytest.raises(ConfigurationError, match="bootstrap or the fully adapted proposal"):
        csmc_sweep(model, data, ref, 5, proposal="ekf")
    with pytest.raises(ConfigurationError, match="path_sampling"):
        csmc_sweep(model, data, ref, 5, path_sampling="forward")


def test_ancestor_sampling_keeps_the_first_steps_moving():
    """N = 10 particles, T = 500 steps of the oracle model (parameters sampled too): with ancestor sampling the
    path at t = 0 changes in at least half the sweeps; plain conditional SMC's path degeneracy pins it to the
    reference (update rate < 0.1), while both update the last steps."""
    y = oracle_data(seed=1, T=500)
    rates = {}
    for a in (True, False):
        post = pr.infer(LinearGaussian1D(), y, method=ParticleGibbs(20, num_chains=1, num_particles=10, warmup=2,
                                                                    ancestor_sampling=a), seed=0)
        rate = post.diagnostics["pg_update_rate"]
        assert rate.shape == (500,)
        assert torch.equal(rate, post.sample_stats["pg_update"].mean((0, 1)))
        rates[a] = rate
    assert rates[True][0] >= 0.5, rates[True][:5]
    assert rates[False][0] < 0.1, rates[False][:5]
    assert rates[True][-1] >= 0.5 and rates[False][-1] >= 0.5


def test_hmc_step_leaves_its_target_invariant(float64):
    """HMCStep on a correlated 2-D Gaussian (sds 1 and 0.3, correlation 0.8), with the diagonal mass matrix
    adapted in warm-up: 6000 steps from a draw of the target keep its means (within 4.5 MC SE, batch means) and
    variances (within 10%); dual averaging brings the acceptance near target_accept, the inverse mass near the
    variances."""
    cov = torch.tensor([[1.0, 0.24], [0.24, 0.09]])
    prec = torch.linalg.inv(cov)

    def log_density(z):
        return -0.5 * z @ prec @ z, -(prec @ z)

    step = HMCStep(step_size=0.5, leapfrog_steps=3, target_accept=0.75)
    state = step.init_state()
    g = torch.Generator().manual_seed(0)
    z = torch.linalg.cholesky(cov) @ torch.randn(2, generator=g, dtype=torch.float64)
    acc, warm = [], []
    for i in range(700):
        if i == 300:  # the diagonal mass matrix from the first 300 draws, then dual averaging restarts
            step.set_mass(state, torch.stack(warm))
        z, info = step.step(z, log_density, state, generator=g)
        step.adapt(state, info["accept_prob"])
        acc.append(info["accept_prob"])
        warm.append(z)
    step.freeze(state)
    assert abs(sum(acc[450:]) / 250 - 0.75) < 0.1
    assert ((state["inv_mass"] / torch.diagonal(cov) - 1).abs() < 0.5).all(), state["inv_mass"]
    zs = []
    for _ in range(6000):
        z, info = step.step(z, log_density, state, generator=g)
        zs.append(z)
    zs = torch.stack(zs)
    batch = zs.reshape(60, 100, 2).mean(1)
    se = batch.std(0) / math.sqrt(60)
    assert (zs.mean(0).abs() < 4.5 * se).all(), (zs.mean(0), se)
    assert ((zs.var(0) / torch.diagonal(cov) - 1).abs() < 0.1).all(), zs.var(0)


def test_particle_gibbs_result_shapes_and_stats():
    """pr.infer returns a ParameterPosterior with (chain, draw) draws, per-draw stats, paths and pointwise
    log-likelihoods, exported to ArviZ with the PG update per time step; the seed fixes the draws."""
    y = oracle_data(T=20)
    method = ParticleGibbs(6, num_chains=2, num_particles=8, warmup=3, keep_paths=True)
    post = pr.infer(LinearGaussian1D(), y, method=method, seed=3)
    assert isinstance(post, pr.ParameterPosterior) and post.method == "particle_gibbs"
    assert set(post.draws) == {"q", "r"} and post.draws["q"].shape[:2] == (2, 6)
    assert post.paths.shape == (2, 6, 1, 20, 1) and post.log_likelihood.shape == (2, 6, 1, 20)
    for k in ("accept_prob", "accepted", "step_size", "log_likelihood_estimate", "lp"):
        assert post.sample_stats[k].shape == (2, 6) and torch.isfinite(post.sample_stats[k]).all(), k
    assert post.sample_stats["pg_update"].shape == (2, 6, 20)
    assert torch.allclose(post.log_likelihood.sum((-2, -1)).double(), post.sample_stats["log_likelihood_estimate"],
                          rtol=1e-5)
    assert post.diagnostics["log_joint"] == "time-stacked"
    idata = pr.to_inference_data(post)
    assert idata.sample_stats["pg_update"].dims == ("chain", "draw", "time")
    assert idata.posterior["q"].shape[:2] == (2, 6)
    again = pr.infer(LinearGaussian1D(), y, method=method, seed=3)
    assert torch.equal(post.draws["q"], again.draws["q"])
    with pytest.raises(ConfigurationError, match="num_particles"):
        ParticleGibbs(10, num_particles=1)
    with pytest.raises(ConfigurationError, match="proposal"):
        ParticleGibbs(10, proposal="ekf")
    with pytest.raises(ConfigurationError, match="target_accept"):
        HMCStep(target_accept=1.5)
    with pytest.raises(ConfigurationError, match="no parameter priors"):
        pr.infer(LinearGaussianSSM(1, 1), y, method=ParticleGibbs(2), seed=0)


@pytest.mark.slow
def test_particle_gibbs_matches_the_exact_posterior():
    """Exact oracle (1-D linear-Gaussian, q, r ~ HalfNormal(1), 60 steps; 2-D quadrature): the posterior means of
    q and r from 4 chains are within 4 Monte Carlo SE (ESS from ArviZ) of the exact ones, the posterior sds within
    25%, and R-hat <= 1.05."""
    y = oracle_data()
    exact = exact_posterior(y)
    # the Gibbs coupling of θ and the path (lag-one autocorrelation ~0.9-0.95 here) needs long chains
    post = pr.infer(LinearGaussian1D(), y, method=ParticleGibbs(5000, num_chains=4, num_particles=20, warmup=500),
                    seed=0)
    for name in ("q", "r"):
        d = post.draws[name].reshape(4, -1)
        mean, sd = exact[name]
        se = mc_se(d)
        assert abs(float(d.mean()) - mean) < 4 * se, (name, float(d.mean()), mean, se)
        assert abs(float(d.std()) / sd - 1) < 0.25, (name, float(d.std()), sd)
        assert rhat(d) <= 1.05, (name, rhat(d))


class NoisyAR1(LinearGaussian1D):
    """The oracle model with other priors on q and r, declaring the noise_scales capability."""

    def __init__(self, q_prior, r_prior):
        super().__init__()
        self.q = PyroSample(q_prior)
        self.r = PyroSample(r_prior)

    def noise_scales(self):
        return {"process": self.q, "obs": self.r}


class ScaleInTheMean(NoisyAR1):
    """r is the observation noise scale and also shifts the mean: its full conditional is not inverse gamma."""

    def emission(self, t, h, u_t):
        return dist.Normal(h + self.r, self.r * torch.ones_like(h)).to_event(1)

    def noise_scales(self):
        return {"process": self.q, "obs": self.r}


A_IG, B_IG = 3.0, 0.5


def test_conjugate_sites_need_the_conjugate_prior_and_the_capability():
    """Only a site whose prior is inverse_gamma_scale and which the probe finds to be a declared noise scale is
    drawn in closed form; HalfNormal priors, near misses (an inverse gamma on the scale itself, a square-root
    gamma), a scale that also enters the mean, or no noise_scales capability fall back to the HMC step."""
    y = oracle_data(T=20)
    ig = inverse_gamma_scale(A_IG, B_IG)
    one, half = torch.tensor(1.0), torch.tensor(0.5)
    ig_on_scale = dist.TransformedDistribution(dist.InverseGamma(one * A_IG, one * B_IG),
                                               [torch.distributions.PowerTransform(one)])
    sqrt_gamma = dist.TransformedDistribution(dist.Gamma(one * A_IG, one * B_IG),
                                              [torch.distributions.PowerTransform(half)])
    for model, expected in ((NoisyAR1(ig, ig), {"q": "process", "r": "obs"}),
                            (NoisyAR1(ig_on_scale, sqrt_gamma), {}),
                            (ScaleInTheMean(ig, ig), {"q": "process"}),
                            (NoisyAR1(dist.HalfNormal(torch.tensor(1.0)), ig), {"r": "obs"}),
                            (NoisyAR1(dist.HalfNormal(torch.tensor(1.0)), dist.HalfNormal(torch.tensor(1.0))), {}),
                            (LinearGaussian1D(), {})):
        space = ParameterSpace(model)
        z = space.to_unconstrained(model)
        work = space.fixed(model, z)
        data = prepare(work, y)
        path = data.observations.clone()
        assert conjugate_noise_sites(space, work, z, path, data) == expected
        assert torch.equal(space.to_unconstrained(work), z)  # the probe restores the model
    post = pr.infer(NoisyAR1(dist.HalfNormal(torch.tensor(1.0)), ig), y,
                    method=ParticleGibbs(3, num_chains=1, num_particles=8, warmup=2), seed=0)
    assert post.diagnostics["conjugate_sites"] == {"r": "obs"}


def test_conjugate_draw_is_the_inverse_gamma_full_conditional(float64):
    """Given a path, 4000 closed-form draws of r^2 and q^2 have the mean and variance of
    InverseGamma(a + n/2, b + SS/2) (SS: squared residuals of y - h, resp. h_t - 0.9 h_{t-1}; y[5] missing)
    within 4.5 SE."""
    ig = inverse_gamma_scale(A_IG, B_IG)
    model = NoisyAR1(ig, ig)
    y = oracle_data(T=30).double()
    y[0, 5] = float("nan")
    space = ParameterSpace(model)
    z = space.to_unconstrained(model)
    work = space.fixed(model, z)
    data = prepare(work, y)
    path = torch.nan_to_num(y, 0.0) + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    path[0, 5] = 2.0  # far from the missing entry's placeholder: it must not count
    sites = conjugate_noise_sites(space, work, z, path, data)
    h, yy = path[0, :, 0], y[0, :, 0]
    ok = ~torch.isnan(yy)
    exact = {"r": ((yy - h)[ok].square().sum(), int(ok.sum())),
             "q": ((h[1:] - 0.9 * h[:-1]).square().sum(), 29)}
    with seeded(0):
        draws = torch.stack([conjugate_noise_draw(space, work, z, sites, path, data) for _ in range(4000)])
    vals = space.values(draws)
    for name, (ss, n) in exact.items():
        a, b = A_IG + n / 2, B_IG + float(ss) / 2
        mean, var = b / (a - 1), b * b / ((a - 1) ** 2 * (a - 2))
        v = vals[name].square()
        assert abs(float(v.mean()) - mean) < 4.5 * math.sqrt(var / 4000), (name, float(v.mean()), mean)
        assert abs(float(v.var()) / var - 1) < 0.15, (name, float(v.var()), var)


def _exact_ig_posterior(y, grid=600):
    """Posterior means of q and r under q, r ~ inverse_gamma_scale(A_IG, B_IG) by 2-D quadrature."""
    yy = y.reshape(-1).double().numpy()

    def log_prior(s):  # log p(s) = log IG(s^2; a, b) + log 2s
        return A_IG * math.log(B_IG) - math.lgamma(A_IG) - (A_IG + 1) * np.log(s * s) - B_IG / (s * s) + np.log(2 * s)

    qs, rs = np.linspace(0.05, 2.0, grid), np.linspace(0.05, 2.0, grid)
    Q, R = np.meshgrid(qs, rs, indexing="ij")
    lp = kalman_log_likelihood(yy, Q, R) + log_prior(Q) + log_prior(R)
    w = np.exp(lp - lp.max())
    z = w.sum()
    return {"q": float((Q * w).sum() / z), "r": float((R * w).sum() / z)}


@pytest.mark.slow
def test_particle_gibbs_with_conjugate_noise_matches_the_exact_posterior():
    """The oracle model with q, r ~ inverse_gamma_scale(3, 0.5) (both drawn in closed form, no HMC): posterior
    means within 4 MC SE of the 2-D quadrature, R-hat <= 1.05 over 4 chains."""
    ig = inverse_gamma_scale(A_IG, B_IG)
    y = oracle_data()
    exact = _exact_ig_posterior(y)
    post = pr.infer(NoisyAR1(ig, ig), y, method=ParticleGibbs(1500, num_chains=4, num_particles=20, warmup=200),
                    seed=0)
    assert post.diagnostics["conjugate_sites"] == {"q": "process", "r": "obs"}
    for name in ("q", "r"):
        d = post.draws[name].reshape(4, -1)
        se = mc_se(d)
        assert abs(float(d.mean()) - exact[name]) < 4 * se, (name, float(d.mean()), exact[name], se)
        assert rhat(d) <= 1.05, (name, rhat(d))
