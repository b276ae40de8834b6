"""The fully adapted auxiliary particle filter (proposal="adapted", the default through "auto") against exact
answers: closed-form one-step conditionals, exact Kalman evidence on sharp linear models and on a tanh network
in its linear regime, and a brute-force (grid) evidence on a genuinely nonlinear network."""

import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference import ParticleFilter, ParticleSmoother, best_proposal, run_particle_filter
from ppl_rnn.inference.adapted import FullyAdaptedProposal
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.inference.resampling import RESAMPLERS
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.model import StateSpaceModel
from ppl_rnn.rng import seeded


def _sharp():
    """r = 0.003, rank-one-ish process noise (q = 0.01, 0.01, 0.1), W a rotation with gain 0.9."""
    return ElmanSSM(3, 1, activation="identity", process_noise=torch.tensor([0.01, 0.01, 0.1]), obs_noise=0.003,
                    init_scale=0.3, weight_init="rotation", weight_scale=0.9, seed=2)


def _kalman(model, y):
    data = prepare(model, y)
    with torch.no_grad():
        return kalman_filter(model.linear_gaussian(), data.observations, data.mask, data.inputs)


def _ratios(model, y, logZ, *, N, reps, seeds, proposal="auto", resampling="systematic", flags=None):
    """exp(log Zhat - log Z) of reps * len(seeds) independent filters (replicate sequences, one call per seed)."""
    out = []
    for s in seeds:
        post = pr.infer(model, y.expand(reps, -1, -1).clone(),
                        method=ParticleFilter(N, proposal=proposal, resampling=resampling), seed=s)
        out.append(torch.exp((post.log_evidence - logZ).detach().double()))
        if flags is not None:
            flags.append(post.diagnostics["resampled"])
    return torch.cat(out)


def _mean_se(r):
    return float(r.mean()), float(r.std() / math.sqrt(r.numel()))


# ---- exact one-step conditionals -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["elman", "lgssm"])
def test_one_step_predictive_and_draw_exact(float64, which):
    r"""log p(y_{t,o} | h_{t-1}) equals the closed form and draws have the mean and covariance of
    p(h_t | h_{t-1}, y_{t,o}) (observed entries only: one of two entries missing for the LGSSM)."""
    model = _sharp() if which == "elman" else LinearGaussianSSM(3, 2, seed=3, R=0.01 * torch.eye(2))
    p = model.linear_gaussian()
    y_t = torch.tensor([[0.3, -0.2]])[:, :model.obs_dim]
    mask = torch.tensor([[True, False]])[:, :model.obs_dim]
    h_prev = torch.tensor([[[0.2, -0.1, 0.4]]])
    data = prepare(model, y_t.unsqueeze(1))
    prop = FullyAdaptedProposal()
    prop.setup(model, data, 1)
    with torch.no_grad():
        lp, step = prop.predictive(model, 1, h_prev, y_t, mask, None)
        mu = h_prev[0, 0] @ p.A.T + p.b
        o = mask[0]
        C, d, Q, R = p.C[o], p.d[o], p.Q, p.R[o][:, o]
        S = C @ Q @ C.T + R
        exact = dist.MultivariateNormal(C @ mu + d, S).log_prob(y_t[0, o])
        assert torch.allclose(lp[0, 0], exact, atol=1e-10)
        K = Q @ C.T @ torch.linalg.inv(S)
        m = mu + K @ (y_t[0, o] - C @ mu - d)
        P = Q - K @ C @ Q
        n = 100_000
        with seeded(0):
            h = prop.sample(step, torch.zeros(n, 1, dtype=torch.long), n)[:, 0]
    se = (torch.diagonal(P).sqrt() / math.sqrt(n))
    assert bool(((h.mean(0) - m).abs() < 5 * se).all()), (h.mean(0), m)
    emp = torch.cov(h.T)
    scale = torch.sqrt(torch.outer(torch.diagonal(P), torch.diagonal(P)))
    assert bool(((emp - P).abs() < 0.03 * scale).all()), (emp, P)


def test_fully_missing_step_is_the_prior(float64):
    """Nothing observed: predictive log-likelihood exactly 0 and the draw is the transition."""
    model = _sharp()
    data = prepare(model, torch.zeros(1, 1, 1))
    prop = FullyAdaptedProposal()
    prop.setup(model, data, 1)
    h_prev = torch.tensor([[[0.2, -0.1, 0.4]]])
    with torch.no_grad():
        lp, step = prop.predictive(model, 1, h_prev, torch.tensor([[5.0]]), torch.tensor([[False]]), None)
        assert float(lp) == 0.0
        n = 50_000
        with seeded(1):
            h = prop.sample(step, torch.zeros(n, 1, dtype=torch.long), n)[:, 0]
    mu = model.transition_mean(1, h_prev[0, 0], None)
    assert bool(((h.mean(0) - mu).abs() < 5 * model.q / math.sqrt(n)).all())
    assert torch.allclose(h.std(0), model.q.detach(), rtol=0.02)


def test_missing_entries_and_steps_unbiased(float64):
    """LGSSM (full transition covariance, D = 2) with partially and fully missing steps: Zhat/Z unbiased."""
    model = LinearGaussianSSM(2, 2, seed=3, R=0.05 * torch.eye(2))
    y = model.simulate(20, 1, seed=13).observations.clone()
    y[0, 3, 0] = y[0, 7, 1] = y[0, 12, 0] = float("nan")
    y[0, 9] = float("nan")
    y[0, 0] = float("nan")
    logZ = _kalman(model, y).log_evidence
    r = _ratios(model, y, logZ, N=32, reps=400, seeds=[0])
    m, se = _mean_se(r)
    assert abs(m - 1) < 3 * se and se < 0.05, (m, se)


# ---- sharp linear model: the acceptance figures ---------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_sharp_model_evidence_unbiased_default_filter(float64, scheme):
    """Default filter (auto -> adapted) on the sharp model, T = 50, N = 256: mean Zhat/Z over 64 independent
    runs (4 seeds x 16 replicate sequences) within 3 SE of 1, for every resampling scheme; the resampling is
    adaptive (some steps resample, some do not)."""
    model = _sharp()
    y = model.simulate(50, 1, seed=3).observations
    logZ = _kalman(model, y).log_evidence
    flags = []
    r = _ratios(model, y, logZ, N=256, reps=16, seeds=range(4), resampling=scheme, flags=flags)
    m, se = _mean_se(r)
    assert abs(m - 1) < 3 * se and se < 0.1, (m, se)
    f = torch.cat(flags)[:, 1:].float().mean()
    assert 0.05 < float(f) < 0.95, float(f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sharp_model_log_evidence_per_step(dtype):
    """N = 256, T = 400: log-evidence per step within 0.01 of exact Kalman (mean of 4 runs), in float32 and
    float64, without any warning (no jitter); the bootstrap filter at the same N is far off (> 0.1 nat/step)."""
    model = _sharp().to(dtype)
    y = model.simulate(400, 1, seed=3).observations
    logZ = _kalman(model.copy().double(), y.double()).log_evidence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = pr.infer(model, y.expand(4, -1, -1).clone(), method=ParticleFilter(256), seed=0)
    assert post.diagnostics["proposal"] == "adapted"
    assert post.log_evidence.dtype == dtype
    per_step = float((post.log_evidence.double() - logZ).mean()) / 400
    assert abs(per_step) < 0.01, per_step
    boot = pr.infer(model, y, method=ParticleFilter(256, proposal="bootstrap"), seed=0)
    assert float(boot.log_evidence.double() - logZ) / 400 < -0.1


# ---- tanh network in its linear regime against its linear limit -----------------------------------------
def _embedded_tanh():
    lin = _sharp()
    net = ElmanSSM(3, 1, activation="tanh", seed=5)
    net.embed_linear(lin.linear_gaussian(), gain=0.1)
    return lin, net


def test_tanh_linear_regime_matches_linear_limit(float64):
    """A tanh network embedded in its linear regime (states x 0.1): the default filter's Zhat/Z_linear is
    unbiased (64 runs, T = 50) and its log-evidence per step is within 0.01 of the linear model's exact
    Kalman value at N = 256 (T = 400)."""
    lin, net = _embedded_tanh()
    y = lin.simulate(400, 1, seed=3).observations
    logZ = _kalman(lin, y).log_evidence
    post = pr.infer(net, y.expand(4, -1, -1).clone(), method=ParticleFilter(256), seed=0)
    assert post.diagnostics["proposal"] == "adapted"
    per_step = float((post.log_evidence - logZ).mean()) / 400
    assert abs(per_step) < 0.01, per_step
    y50 = y[:, :50]
    r = _ratios(net, y50, _kalman(lin, y50).log_evidence, N=256, reps=16, seeds=range(4))
    m, se = _mean_se(r)
    assert abs(m - 1) < 3 * se and se < 0.1, (m, se)


# ---- genuinely nonlinear network: unbiased against a brute-force (grid) evidence ---------------------------
def _grid_log_evidence(net, y, lo=-5.0, hi=5.0, G=2001):
    r"""Exact-to-quadrature :math:`\log p(y_{0:T-1})` of a 1-D network by grid filtering: densities on ``G``
    points of ``[lo, hi]``, :math:`\alpha_t(g') = \sum_g \alpha_{t-1}(g) p(g'\mid g)\,\Delta\,p(y_t\mid g')`."""
    g = torch.linspace(lo, hi, G, dtype=torch.float64)
    dx = (hi - lo) / (G - 1)

    def npdf(x, m, s):
        return torch.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    with torch.no_grad():
        W, b, q, C, d, r, m0, s0 = (float(getattr(net, k).reshape(-1)[0]) for k in ("W", "b", "q", "C", "d", "r",
                                                                                     "m0", "s0"))
        K = npdf(g.unsqueeze(0), torch.tanh(W * g + b).unsqueeze(1), q)  # (from, to)
        a, log_z = npdf(g, m0, s0), 0.0
        for t in range(y.shape[0]):
            if t > 0:
                a = (a @ K) * dx
            a = a * npdf(float(y[t]), C * g + d, r)
            z = float(a.sum() * dx)
            log_z += math.log(z)
            a = a / z
    return log_z


def test_nonlinear_tanh_unbiased_against_grid_evidence(float64):
    """1-D tanh network with W = 2 (bistable, saturating states): mean Zhat/Z of 1600 adapted filters with N = 32
    within 3 SE of 1, Z by grid filtering (2001 points; 4001 agree to 1e-12)."""
    from ppl_rnn.model import set_param

    net = ElmanSSM(1, 1, activation="tanh", process_noise=0.3, obs_noise=0.2, init_scale=1.0, seed=7)
    set_param(net, "W", torch.tensor([[2.0]]))
    set_param(net, "C", torch.tensor([[1.0]]))
    sim = net.simulate(30, 1, seed=8)
    assert float(sim.states.abs().mean()) > 0.5  # not the linear regime
    y = sim.observations
    log_z = _grid_log_evidence(net, y[0, :, 0])
    r = _ratios(net, y, torch.tensor(log_z), N=32, reps=400, seeds=range(4))
    m, se = _mean_se(r)
    assert abs(m - 1) < 3 * se and se < 0.02, (m, se)


# ---- proposal="auto" -------------------------------------------------------------------------------------
class _TanhEmission(ElmanSSM):
    """Gaussian but nonlinear emission: the linear-Gaussian emission capability is not inherited."""

    def emission(self, t, h, u_t):
        return dist.Normal(torch.tanh(h) @ self.C.T + self.d, self.r).to_event(1)


class _StudentEmission(ElmanSSM):
    def emission(self, t, h, u_t):
        return dist.StudentT(4.0, h @ self.C.T + self.d, self.r).to_event(1)


@pytest.mark.parametrize("model,expected", [
    (ElmanSSM(2, 1, activation="identity"), "adapted"),
    (ElmanSSM(2, 1, activation="tanh"), "adapted"),
    (LinearGaussianSSM(2, 2, seed=0), "adapted"),
    (_TanhEmission(2, 1), "bootstrap"),  # Gaussian but not declared linear: the EKF proposal is never automatic
    (_StudentEmission(2, 1), "bootstrap"),
])
def test_auto_picks_the_best_exact_weight_proposal(model, expected):
    y = model.simulate(6, 2, seed=0).observations
    for method in (ParticleFilter(16), ParticleSmoother(16, 4)):
        post = pr.infer(model, y, method=method, seed=0)
        assert post.diagnostics["proposal"] == expected
        assert post.diagnostics["proposal_reason"].startswith(expected + ":")
        assert bool(torch.isfinite(post.log_evidence).all())
    choice = best_proposal(model)
    assert choice.proposal.name == expected and choice.reason.startswith(expected + ":")


class _GSS(StateSpaceModel):
    """The Gordon-Salmond-Smith benchmark as a user writes it (no capabilities): x_t = x/2 + 25x/(1+x^2) +
    8 cos(1.2t) + N(0, 10), y = x^2/20 + N(0, 1)."""

    def __init__(self):
        super().__init__(1, 1)

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), math.sqrt(5.0) * torch.ones(1)).to_event(1)

    def transition(self, t, h, u_t):
        return dist.Normal(0.5 * h + 25 * h / (1 + h * h) + 8 * math.cos(1.2 * t), math.sqrt(10.0)).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h * h / 20, 1.0).to_event(1)


def test_auto_is_bootstrap_on_the_gss_user_model():
    """The default filter on a strongly nonlinear Gaussian emission (x^2/20) is the bootstrap filter, and the
    record says why (benchmarks/bench_peers.py measures its time x Var log Z against the bootstrap filter's)."""
    model = _GSS()
    y = model.simulate(20, 1, seed=0).observations
    post = pr.infer(model, y, method=ParticleFilter(64), seed=0)
    assert post.diagnostics["proposal"] == "bootstrap"
    assert "not declared linear" in post.diagnostics["proposal_reason"]
    boot = pr.infer(model, y, method=ParticleFilter(64, proposal="bootstrap"), seed=0)
    assert torch.equal(post.log_evidence, boot.log_evidence)  # the same filter, the same random stream


class _Unprobeable(ElmanSSM):
    def emission(self, t, h, u_t):
        if h.dim() == 3 and h.shape[0] == 2:  # the probe's shape only
            raise RuntimeError("cannot evaluate here")
        return super().emission(t, h, u_t)


def test_auto_warns_when_it_falls_back():
    """Issue 28: a law that raises while "auto" probes it gives a RuntimeWarning naming the error, then the
    bootstrap filter (recorded with the reason)."""
    model = _Unprobeable(2, 1)
    y = model.simulate(5, 1, seed=0).observations
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: cannot evaluate here; falling back to the bootstrap filter"):
        post = pr.infer(model, y, method=ParticleFilter(16), seed=0)
    assert post.diagnostics["proposal"] == "bootstrap"
    assert "could not be probed" in post.diagnostics["proposal_reason"]


def test_adapted_needs_the_capability():
    with pytest.raises(ModelCapabilityError, match="linear_gaussian_emission"):
        pr.infer(_StudentEmission(2, 1), torch.zeros(5, 1), method=ParticleFilter(8, proposal="adapted"), seed=0)


# ---- history, smoothers, threads ------------------------------------------------------------------------
def test_history_and_smoother_on_sharp_model(float64):
    """The adapted filter's history holds normalised filtering weights and valid ancestors; FFBSi, backward
    MCMC and FFBSm on it give the RTS smoothed means of the sharp model (within 6 SE over 8 replicates)."""
    from ppl_rnn.inference.kalman import rts_smoother

    model = _sharp()
    y = model.simulate(30, 1, seed=4).observations
    data = prepare(model, y)
    with seeded(0):
        rec = run_particle_filter(model, data, 64, keep_history=True, proposal="auto")
    assert rec.proposal == "adapted"
    assert torch.allclose(torch.logsumexp(rec.log_weights, 1), torch.zeros(30, 1), atol=1e-10)
    assert int(rec.ancestors.min()) >= 0 and int(rec.ancestors.max()) < 64
    p = model.linear_gaussian()
    with torch.no_grad():
        sm = rts_smoother(p.A, kalman_filter(p, data.observations, data.mask, data.inputs))
    exact = sm.mean[0]
    yr = y.expand(8, -1, -1).clone()
    for backward in ("simulation", "mcmc", "marginal"):
        post = pr.infer(model, yr, method=ParticleSmoother(256, 64, backward=backward), seed=1)
        m = post.mean.detach()
        se = m.std(0) / math.sqrt(8) + 1e-4
        z = ((m.mean(0) - exact) / se).abs()
        assert float(z.max()) < 6, (backward, float(z.max()))


def test_threads_restored_and_one_thread_inside():
    """The per-step loop runs on one torch thread for a small cloud and restores the caller's setting."""
    model = ElmanSSM(2, 1)
    data = prepare(model, model.simulate(5, 1, seed=0).observations)
    old = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        for proposal in ("adapted", "bootstrap"):
            with seeded(0):
                run_particle_filter(model, data, 32, proposal=proposal,
                                    on_step=lambda t, h, lw: seen.append(torch.get_num_threads()))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert seen and set(seen) == {1}
