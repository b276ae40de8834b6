"""Particle smoother (FFBSi, backward MCMC, FFBSm) against the exact RTS smoother."""

import math

import pytest
import torch
from ppl_rnn.inference import ParticleSmoother, ffbsm, pairwise_expectations, run_particle_filter
from ppl_rnn.inference.kalman import kalman_filter, rts_smoother
from ppl_rnn.inference.particle_smoother import _pair_log_f
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.rng import seeded


def _elman():
    return ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.5, seed=1)


def _lgssm():
    return LinearGaussianSSM(2, 2, seed=3, R=0.2 * torch.eye(2))


def _rts(model, y):
    data = prepare(model, y)
    p = model.linear_gaussian()
    return rts_smoother(p.A, kalman_filter(p, data.observations, data.mask, data.inputs))


def _diag(c):
    return torch.diagonal(c, dim1=-2, dim2=-1)


@pytest.mark.parametrize("backward,which", [("simulation", "elman"), ("mcmc", "elman"), ("marginal", "elman"),
                                            ("simulation", "lgssm")])
def test_smoothed_moments_match_rts(float64, backward, which):
    """Smoothed means within 6 SE of RTS at every step (SE across 32 independent replicate sequences);
    smoothed variances within 25% at every step and 10% on average; lag-one covariances within 0.05."""
    model = _elman() if which == "elman" else _lgssm()
    y = model.simulate(20, 1, seed=31).observations
    rts = _rts(model, y)
    R = 32
    post = pr.infer(model, y.expand(R, -1, -1).clone(),
                    method=ParticleSmoother(250, 64, backward=backward, mcmc_steps=2), seed=0)
    assert post.kind == "smoothing" and post.evidence_kind == "estimate"
    m, se = post.mean.mean(0), post.mean.std(0) / math.sqrt(R)
    exact = rts.mean[0]
    assert torch.all((m - exact).abs() < 6 * se + 2e-3), ((m - exact) / se).abs().max()
    ratio = post.var.mean(0) / _diag(rts.cov[0])
    assert torch.all((ratio - 1).abs() < 0.25), ratio
    assert abs(ratio.mean() - 1) < 0.1, ratio.mean()
    assert (post.cross_cov.mean(0)[1:] - rts.cross_cov[0, 1:]).abs().max() < 0.05
    paths = post.diagnostics["paths"]
    assert paths.shape == (64, R, 20, model.hidden_dim)
    # the smoothed paths themselves (all modes) agree with RTS
    pm = paths.mean(0).mean(0)
    pse = paths.mean(0).std(0) / math.sqrt(R)
    assert torch.all((pm - exact).abs() < 6 * pse + 2e-3)


def test_ffbsm_pairwise_expectations(float64):
    """E[h_{t-1,k} h_{t,k}] under the FFBSm pairwise weights matches RTS (cross-cov + mean products)."""
    model = _elman()
    y = model.simulate(15, 1, seed=32).observations
    rts = _rts(model, y)
    R = 6
    data = prepare(model, y.expand(R, -1, -1).clone())
    with seeded(1):
        rec = run_particle_filter(model, data, 400, keep_history=True)
    e = pairwise_expectations(model, data, rec, lambda t, hp, h, u: hp * h)  # (B,T,H)
    assert e.shape == (R, 15, 2) and torch.all(e[:, 0] == 0)
    exact = _diag(rts.cross_cov[0]) + rts.mean[0] * torch.roll(rts.mean[0], 1, 0)
    assert (e.mean(0)[1:] - exact[1:]).abs().max() < 0.05
    marg = ffbsm(model, data, rec, {"sq": lambda t, hp, h, u: (h - hp).pow(2).sum(-1)})
    assert marg.expectations["sq"].shape == (R, 15)
    assert torch.allclose(torch.logsumexp(marg.log_weights, 1), torch.zeros(15, R, dtype=torch.float64))
    # final step: smoothing = filtering
    assert torch.allclose(marg.mean[:, -1], rec.filt_mean[:, -1])


@pytest.mark.parametrize("which", ["elman", "lgssm"])
def test_fast_pair_log_density_matches_generic(float64, which):
    """The expanded-quadratic fast path equals the transition's own log_prob."""
    model = _elman() if which == "elman" else _lgssm()
    g = torch.Generator().manual_seed(0)
    hp = 3 + torch.randn(7, 3, model.hidden_dim, generator=g)
    hn = 3 + torch.randn(5, 3, model.hidden_dim, generator=g)
    fast = _pair_log_f(model, 1, hp, hn, None)  # (B,P,N)
    generic = model.transition(1, hp.unsqueeze(1), None).log_prob(hn).permute(2, 1, 0)
    assert torch.allclose(fast, generic, atol=1e-9)


def test_mcmc_backward_breaks_path_degeneracy(float64):
    """The genealogy collapses to few ancestors at t=0; backward MCMC and FFBSi paths do not."""
    model = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.1, seed=1)
    y = model.simulate(60, 1, seed=33).observations
    data = prepare(model, y)
    with seeded(2):
        rec = run_particle_filter(model, data, 200, keep_history=True, ess_threshold=1.0)
    idx = torch.arange(200).unsqueeze(1)
    for t in range(59, 0, -1):
        idx = rec.ancestors[t].gather(0, idx)
    genealogy_unique = idx.unique().numel()
    post = pr.infer(model, y, method=ParticleSmoother(200, 200, backward="mcmc", ess_threshold=1.0), seed=2)
    mcmc_unique = post.diagnostics["paths"][:, 0, 0, 0].unique().numel()
    assert genealogy_unique < 10 and mcmc_unique > 3 * genealogy_unique


def test_sampler_and_diagnostics():
    model = ElmanSSM(3, 1, seed=0)  # float32, nonlinear
    y = model.simulate(12, 2, seed=34).observations
    post = pr.infer(model, y, method=ParticleSmoother(64, 10), seed=0)
    assert post.diagnostics["paths"].shape == (10, 2, 12, 3)
    assert post.mean.dtype == torch.float32 and post.var.shape == (2, 12, 3)
    s1, s2 = post.sample(5, seed=1), post.sample(5, seed=1)
    assert s1.shape == (5, 2, 12, 3) and torch.equal(s1, s2)
    assert not torch.equal(s1, post.sample(5, seed=2))
    assert post.sample_final(4, seed=0).shape == (4, 2, 3)
    assert torch.isfinite(post.log_evidence).all() and post.diagnostics["ess"].shape == (2, 12)
    again = pr.infer(model, y, method=ParticleSmoother(64, 10), seed=0)
    assert torch.equal(again.diagnostics["paths"], post.diagnostics["paths"])
    p64 = pr.infer(model, y, method=ParticleSmoother(64, 10, backward="marginal", dtype=torch.float64), seed=0)
    assert p64.mean.dtype == torch.float64 and "smoothed_log_weights" in p64.diagnostics


def test_configuration():
    with pytest.raises(ConfigurationError, match="backward"):
        ParticleSmoother(10, 5, backward="bogus")
    with pytest.raises(ConfigurationError):
        ParticleSmoother(10, 0)


@pytest.mark.parametrize("where", ["all", "some"])
def test_backward_mcmc_raises_on_nan_like_ffbsi(where):
    """Issue 11 bug 5: backward MCMC used to reject NaN proposals silently and stay on a NaN current state
    without an error; now it raises DegenerateWeightsError naming the step, as FFBSi does."""
    import dataclasses

    from ppl_rnn.inference.particle_smoother import backward_mcmc, backward_simulation

    from ppl_rnn.errors import DegenerateWeightsError

    model = _elman()
    y = model.simulate(12, 2, seed=4).observations
    data = prepare(model, y)
    with seeded(0):
        rec = run_particle_filter(model, data, 32, keep_history=True)
    X = rec.particles.clone()
    if where == "all":
        X[5] = float("nan")
    else:
        X[5, ::3, 1] = float("nan")  # a third of the particles of sequence 1
    bad = dataclasses.replace(rec, particles=X)
    with seeded(1), pytest.raises(DegenerateWeightsError, match="time step 5") as e:
        backward_mcmc(model, data, bad, 64, mcmc_steps=3)
    assert e.value.time_step == 5 and e.value.sequence == (0 if where == "all" else 1)
    with seeded(1), pytest.raises(DegenerateWeightsError, match="time step 5"):
        backward_simulation(model, data, bad, 64)
    with seeded(1):  # the clean record runs and gives finite paths
        assert bool(torch.isfinite(backward_mcmc(model, data, rec, 64, mcmc_steps=3)).all())


def test_ffbsm_normalises_final_weights(float64):
    """ffbsm's smoothed marginals do not depend on a constant added to the final log-weights."""
    import dataclasses

    model = _elman()
    y = model.simulate(10, 1, seed=5).observations
    data = prepare(model, y)
    with seeded(0):
        rec = run_particle_filter(model, data, 64, keep_history=True, proposal="adapted")
    LW = rec.log_weights.clone()
    LW[-1] += 3.0
    a = ffbsm(model, data, rec)
    b = ffbsm(model, data, dataclasses.replace(rec, log_weights=LW))
    assert torch.allclose(a.mean, b.mean, atol=1e-10) and torch.allclose(a.log_weights, b.log_weights, atol=1e-10)


def test_smoother_consumes_its_filter():
    """ParticleSmoother(filter=ParticleFilter(...)) holds the filter as its one source of truth; the
    num_particles/proposal/... convenience builds the same filter; resized copies leave the original alone."""
    from ppl_rnn.inference import Bootstrap, ParticleFilter

    pf = ParticleFilter(64, proposal=Bootstrap(), ess_threshold=0.7)
    sm = ParticleSmoother(filter=pf, num_paths=10)
    assert sm.filter is pf and "num_particles" not in vars(sm) and "proposal" not in vars(sm)
    assert (sm.num_particles, sm.proposal, sm.ess_threshold, sm.resampling) == (64, pf.proposal, 0.7, "systematic")
    conv = ParticleSmoother(64, 10, proposal="bootstrap", ess_threshold=0.7)
    assert isinstance(conv.filter, ParticleFilter) and conv.filter.num_particles == 64
    model = ElmanSSM(2, 1, seed=0)
    y = model.simulate(8, 1, seed=1).observations
    a, b = pr.infer(model, y, method=sm, seed=3), pr.infer(model, y, method=conv, seed=3)
    assert torch.equal(a.diagnostics["paths"], b.diagnostics["paths"]) and a.diagnostics["proposal"] == "bootstrap"
    small = sm.resized(num_particles=16, num_paths=4)
    assert (small.num_particles, small.num_paths, small.filter.proposal) == (16, 4, pf.proposal)
    assert (sm.num_particles, sm.num_paths, pf.num_particles) == (64, 10, 64)
    assert sm.resized(num_paths=3).filter is pf
    assert pr.infer(model, y, method=small, seed=0).diagnostics["paths"].shape == (4, 1, 8, 2)
    assert pf.resized(8).num_particles == 8 and pf.num_particles == 64
    with pytest.raises(ConfigurationError, match="not both"):
        ParticleSmoother(num_particles=10, filter=pf)
    with pytest.raises(ConfigurationError, match="filter must be a ParticleFilter"):
        ParticleSmoother(filter="bootstrap")
