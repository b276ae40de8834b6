"""Particle filter against the exact Kalman oracle (ElmanSSM(activation="identity"), LinearGaussianSSM)."""

import math

import pytest
import torch
from ppl_rnn.inference import Auto, Bootstrap, FullyAdapted, Guided, ParticleFilter, run_particle_filter
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.inference.proposals import as_proposal
from ppl_rnn.inference.resampling import RESAMPLERS
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError
from ppl_rnn.rng import seeded


def _elman(**kw):
    opts = dict(activation="identity", process_noise=0.3, obs_noise=0.5, seed=1)
    opts.update(kw)
    return ElmanSSM(2, 1, **opts)


def _lgssm():
    return LinearGaussianSSM(2, 2, seed=3, R=0.2 * torch.eye(2))


def _kalman(model, y, inputs=None):
    data = prepare(model, y, inputs)
    return kalman_filter(model.linear_gaussian(), data.observations, data.mask, data.inputs)


def _replicate(y, R):
    return y.expand(R, -1, -1).clone()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
@pytest.mark.parametrize("which", ["elman", "lgssm"])
def test_evidence_unbiased(float64, scheme, which):
    """Bootstrap filter: mean of Zhat/Z over 40 seeds (x5 replicate sequences each) is within 3 SE of 1, adaptive
    resampling (the adapted filter's counterpart: tests/inference/test_adapted.py)."""
    model = _elman() if which == "elman" else _lgssm()
    y = model.simulate(30, 1, seed=11).observations
    logZ = _kalman(model, y).log_evidence  # (1,)
    R, N = 5, (128 if which == "elman" else 256)
    ratios, flags = [], []
    for seed in range(40):
        post = pr.infer(model, _replicate(y, R), method=ParticleFilter(N, proposal="bootstrap", resampling=scheme),
                        seed=seed)
        ratios.append(torch.exp(post.log_evidence - logZ))
        flags.append(post.diagnostics["resampled"])
        assert torch.allclose(post.diagnostics["log_lik"].sum(1), post.log_evidence)
    r = torch.cat(ratios)
    se = r.std() / math.sqrt(r.numel())
    assert abs(r.mean() - 1) < 3 * se, (r.mean(), se)
    assert se < 0.05  # moderate variance: the test has power
    f = torch.cat(flags)
    assert 0.05 < f[:, 1:].float().mean() < 0.95  # adaptive: some steps resample, some do not


def test_evidence_unbiased_diagonal_emission_of_two_entries(float64):
    """Bootstrap filter on a linear ElmanSSM with two observed entries (a diagonal-Gaussian emission, read
    through its (loc, scale) shortcut): mean Zhat/Z over 200 runs within 3 SE of exact Kalman."""
    model = ElmanSSM(2, 2, activation="identity", process_noise=0.3, obs_noise=torch.tensor([0.4, 0.7]), seed=1)
    y = model.simulate(20, 1, seed=11).observations
    logZ = _kalman(model, y).log_evidence
    post = pr.infer(model, _replicate(y, 200), method=ParticleFilter(128, proposal="bootstrap"), seed=0)
    r = torch.exp(post.log_evidence - logZ)
    se = r.std() / math.sqrt(r.numel())
    assert abs(r.mean() - 1) < 3 * se and se < 0.05, (r.mean(), se)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_evidence_unbiased_never_and_always(float64, threshold):
    """Zhat stays unbiased when never resampling (SIS) and when resampling every step."""
    model = _elman()
    y = model.simulate(15, 1, seed=12).observations
    logZ = _kalman(model, y).log_evidence
    post = pr.infer(model, _replicate(y, 400), method=ParticleFilter(256, ess_threshold=threshold), seed=0)
    r = torch.exp(post.log_evidence - logZ)
    se = r.std() / math.sqrt(r.numel())
    assert abs(r.mean() - 1) < 3 * se and se < 0.05
    f = post.diagnostics["resampled"][:, 1:]
    assert bool(f.all()) if threshold == 1.0 else not bool(f.any())


@pytest.mark.parametrize("which", ["elman", "lgssm"])
def test_filtered_moments_match_kalman(float64, which):
    """Filtered means within 6 SE of Kalman at every step (SE across 20 independent replicate sequences);
    filtered variances within 15% at every step."""
    model = _elman() if which == "elman" else _lgssm()
    y = model.simulate(25, 1, seed=13).observations
    kf = _kalman(model, y)
    R = 20
    post = pr.infer(model, _replicate(y, R), method=ParticleFilter(500), seed=1)
    m, se = post.mean.mean(0), post.mean.std(0) / math.sqrt(R)
    exact = kf.filt_mean[0]
    assert torch.all((m - exact).abs() < 6 * se + 1e-3 * exact.abs().max()), ((m - exact) / se).abs().max()
    ratio = post.var.mean(0) / torch.diagonal(kf.filt_cov[0], dim1=-2, dim2=-1)
    assert torch.all((ratio - 1).abs() < 0.15), ratio


def test_missing_entries_match_kalman(float64):
    """NaN entries (one entry of a step, and a whole step) add no weight: evidence and means match Kalman
    with the same entries missing."""
    model = _lgssm()
    y = model.simulate(20, 1, seed=14).observations.clone()
    y[0, 3, 0] = float("nan")
    y[0, 7, :] = float("nan")
    y[0, 8:12, 1] = float("nan")
    kf = _kalman(model, y)
    kf_full = _kalman(model, model.simulate(20, 1, seed=14).observations)
    assert not torch.allclose(kf.log_evidence, kf_full.log_evidence)  # the missing entries matter
    R = 200
    post = pr.infer(model, _replicate(y, R), method=ParticleFilter(256), seed=2)
    r = torch.exp(post.log_evidence - kf.log_evidence)
    assert abs(r.mean() - 1) < 3 * r.std() / math.sqrt(R)
    m, se = post.mean.mean(0), post.mean.std(0) / math.sqrt(R)
    assert torch.all((m - kf.filt_mean[0]).abs() < 6 * se + 1e-3)
    assert post.diagnostics["log_lik"][:, 7].abs().max() == 0  # a fully missing step adds nothing


def test_inputs_match_kalman(float64):
    model = ElmanSSM(2, 1, input_dim=1, activation="identity", process_noise=0.3, obs_noise=0.5, seed=2)
    u = torch.sin(torch.arange(20.0) / 3).reshape(1, 20, 1)
    y = model.simulate(20, 1, inputs=u, seed=15).observations
    kf = _kalman(model, y, u)
    R = 20
    post = pr.infer(model, _replicate(y, R), method=ParticleFilter(400), inputs=u.expand(R, -1, -1), seed=3)
    m, se = post.mean.mean(0), post.mean.std(0) / math.sqrt(R)
    assert torch.all((m - kf.filt_mean[0]).abs() < 6 * se + 1e-3)
    # the inputs matter: without them the exact answer is different
    kf0 = _kalman(model, y, torch.zeros_like(u))
    assert (kf0.filt_mean - kf.filt_mean).abs().max() > 10 * se.max()


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_sequence_independence_exact(float64, threshold):
    """Sequence 0's weights, evidence and moments do not depend on sequence 1's data (same random stream)."""
    model = _elman()
    y = model.simulate(20, 2, seed=16).observations
    y2 = y.clone()
    y2[1] = y2[1] * 3 + 5.0
    y2[1, 4] = float("nan")
    a = pr.infer(model, y, method=ParticleFilter(64, ess_threshold=threshold), seed=4)
    b = pr.infer(model, y2, method=ParticleFilter(64, ess_threshold=threshold), seed=4)
    assert torch.equal(a.log_evidence[0], b.log_evidence[0])
    assert torch.equal(a.mean[0], b.mean[0]) and torch.equal(a.diagnostics["ess"][0], b.diagnostics["ess"][0])
    assert not torch.equal(a.log_evidence[1], b.log_evidence[1])


def test_sequences_together_same_distribution_as_alone(float64):
    """Adaptive resampling decides per sequence, and sequence 0 filtered beside a very different sequence
    has the same evidence distribution as filtered alone (two-sample test over 300 runs each)."""
    model = _elman()
    y0 = model.simulate(20, 1, seed=17).observations
    y1 = 4.0 * model.simulate(20, 1, seed=18).observations  # forces frequent resampling
    logZ0 = _kalman(model, y0).log_evidence
    R = 300
    alone = pr.infer(model, _replicate(y0, R), method=ParticleFilter(64), seed=5)
    both = pr.infer(model, torch.cat([_replicate(y0, R), _replicate(y1, R)]), method=ParticleFilter(64), seed=6)
    ra = torch.exp(alone.log_evidence - logZ0)
    rb = torch.exp(both.log_evidence[:R] - logZ0)
    se = (ra.var() / R + rb.var() / R).sqrt()
    assert abs(ra.mean() - rb.mean()) < 4 * se
    fl = both.diagnostics["resampled"].float()
    assert fl[R:].mean() > fl[:R].mean() + 0.1  # per-sequence decisions
    assert torch.allclose(fl[:R].mean(), alone.diagnostics["resampled"].float().mean(), atol=0.05)


class _WideProposal:
    """Transition with the noise inflated by 1.5: a non-bootstrap proposal with an explicit log q."""

    def propose(self, model, t, h_prev, y_t, mask_t, u_t):
        base = model.initial_batched(u_t, (y_t.shape[0],)) if h_prev is None else model.transition(t, h_prev, u_t)
        loc, scale = base.base_dist.loc, base.base_dist.scale * 1.5
        if h_prev is None:
            loc, scale = loc.expand(256, *loc.shape), scale.expand(256, *scale.shape)
        q = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
        h = q.sample()
        return h, q.log_prob(h)


def test_custom_proposal_weights(float64):
    """A proposal object with an explicit log q gets weights p(y|h) p(h|h')/q(h): evidence and means
    stay correct."""
    model = _elman()
    y = model.simulate(20, 1, seed=19).observations
    kf = _kalman(model, y)
    R = 100
    post = pr.infer(model, _replicate(y, R), method=ParticleFilter(256, proposal=_WideProposal()), seed=7)
    r = torch.exp(post.log_evidence - kf.log_evidence)
    assert abs(r.mean() - 1) < 3 * r.std() / math.sqrt(R)
    m, se = post.mean.mean(0), post.mean.std(0) / math.sqrt(R)
    assert torch.all((m - kf.filt_mean[0]).abs() < 6 * se + 1e-3)


def test_proposal_objects_and_names():
    """Proposals are objects (passed through as they are); the four convenience names map to fresh objects in
    one function; anything else is a ConfigurationError that lists what is accepted."""
    wide = _WideProposal()
    assert as_proposal(wide) is wide and ParticleFilter(10, proposal=wide).proposal is wide
    for name, cls in (("auto", Auto), ("bootstrap", Bootstrap), ("adapted", FullyAdapted), ("ekf", Guided)):
        assert type(as_proposal(name)) is cls and type(ParticleFilter(10, proposal=name).proposal) is cls
    assert as_proposal("bootstrap") is not as_proposal("bootstrap")
    with pytest.raises(ConfigurationError, match="proposal must be a proposal object"):
        ParticleFilter(10, proposal="no-such-proposal")
    with pytest.raises(ConfigurationError):
        ParticleFilter(10, proposal=42)


class _BoxEmission(ElmanSSM):
    """Elman dynamics with a bounded emission y ~ Uniform(Ch - 1, Ch + 1): zero likelihood is reachable."""

    def emission(self, t, h, u_t):
        c = h @ self.C.T
        return torch.distributions.Independent(torch.distributions.Uniform(c - 1.0, c + 1.0), 1)


def test_degenerate_weights_error():
    """An impossible observation raises DegenerateWeightsError naming sequence and step, never NaN."""
    model = _BoxEmission(2, 1, seed=0)
    y = model.simulate(10, 3, seed=20).observations.clone()
    y[2, 6, 0] = 50.0
    with pytest.raises(DegenerateWeightsError, match="sequence 2 at time step 6") as e:
        pr.infer(model, y, method=ParticleFilter(50), seed=0)
    assert e.value.sequence == 2 and e.value.time_step == 6
    assert "observation noise" in str(e.value) and "outlier" in str(e.value)
    y[2, 6, 0] = float("nan")  # marking it missing is the documented fix
    assert torch.isfinite(pr.infer(model, y, method=ParticleFilter(50), seed=0).log_evidence).all()


def test_degenerate_weights_float32_overflow():
    """A float32 Gaussian log-density that overflows to -inf for every particle is reported, not NaN."""
    model = ElmanSSM(2, 1, obs_noise=1e-3, seed=0)
    y = model.simulate(8, 2, seed=24).observations.clone()
    y[0, 5, 0] = 1e25
    with pytest.raises(DegenerateWeightsError, match="sequence 0 at time step 5"):
        pr.infer(model, y, method=ParticleFilter(50), seed=0)


def test_nan_weights_error_not_nan_result():
    class NanProposal:
        def propose(self, model, t, h_prev, y_t, mask_t, u_t):
            h = model.initial_batched(u_t, (y_t.shape[0],)).sample((8,)) if h_prev is None else h_prev
            lq = torch.zeros(h.shape[:2], dtype=h.dtype)
            if t == 3:
                lq[:, 1] = float("nan")
            return h, lq

    model = _elman()
    y = model.simulate(6, 2, seed=21).observations
    with pytest.raises(DegenerateWeightsError, match="NaN") as e:
        pr.infer(model, y, method=ParticleFilter(8, proposal=NanProposal()), seed=0)
    assert e.value.sequence == 1 and e.value.time_step == 3


def test_posterior_fields_dtype_and_no_mutation():
    model = _elman()  # float32
    y = model.simulate(12, 2, seed=22).observations
    y_copy = y.clone()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    post = pr.infer(model, y, method=ParticleFilter(100, dtype=torch.float64), seed=0)
    assert post.kind == "filtering" and post.evidence_kind == "estimate"
    assert post.mean.dtype == torch.float64 and post.mean.shape == (2, 12, 2) and post.var.shape == (2, 12, 2)
    assert post.log_evidence.shape == (2,) and post.diagnostics["ess"].shape == (2, 12)
    assert post.diagnostics["resampled"].dtype == torch.bool and not post.diagnostics["resampled"][:, 0].any()
    assert post.sample_final(7, seed=1).shape == (7, 2, 2)
    assert torch.equal(post.sample_final(7, seed=1), post.sample_final(7, seed=1))
    assert torch.equal(y, y_copy) and model.dtype == torch.float32
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    again = pr.infer(model, y, method=ParticleFilter(100, dtype=torch.float64), seed=0)
    assert torch.equal(post.log_evidence, again.log_evidence)  # seeded
    f32 = pr.infer(model, y, method=ParticleFilter(100), seed=0)
    assert f32.mean.dtype == torch.float32 and torch.isfinite(f32.log_evidence).all()


def test_history_record(float64):
    model = _elman()
    data = prepare(model, model.simulate(9, 2, seed=23).observations)
    with seeded(0):
        rec = run_particle_filter(model, data, 32, keep_history=True)
    assert rec.particles.shape == (9, 32, 2, 2) and rec.log_weights.shape == (9, 32, 2)
    assert rec.ancestors.shape == (9, 32, 2) and rec.num_particles == 32
    assert torch.allclose(torch.logsumexp(rec.log_weights, 1), torch.zeros(9, 2, dtype=torch.float64))
    assert torch.equal(rec.particles[-1], rec.final_particles)
    w = rec.log_weights.exp()
    assert torch.allclose((w.unsqueeze(-1) * rec.particles).sum(1).permute(1, 0, 2), rec.filt_mean)


@pytest.mark.parametrize("B,H", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_filtered_moments_are_the_weighted_moments_of_the_particles(float64, B, H):
    """filt_mean / filt_var (computed in blocks of steps, by a different route for one sequence with H = 1,
    with H > 1 and for several sequences) equal the weighted mean and centred variance of the recorded
    particles at every step to 1e-10; T = 40 spans three blocks, the last partial; without the history (other
    buffers, same random stream) the moments are the same."""
    model = ElmanSSM(H, 1, activation="tanh", process_noise=0.3, obs_noise=0.5, seed=4)
    data = prepare(model, model.simulate(40, B, seed=5).observations)
    with seeded(0):
        rec = run_particle_filter(model, data, 32, proposal="bootstrap", keep_history=True)
    w = rec.log_weights.exp().unsqueeze(-1)  # (T,N,B,1)
    mean = (w * rec.particles).sum(1)  # (T,B,H)
    var = (w * (rec.particles - mean.unsqueeze(1)).square()).sum(1)
    assert torch.allclose(rec.filt_mean, mean.transpose(0, 1), rtol=0, atol=1e-10)
    assert torch.allclose(rec.filt_var, var.transpose(0, 1), rtol=0, atol=1e-10)
    with seeded(0):
        lean = run_particle_filter(model, data, 32, proposal="bootstrap")
    assert torch.allclose(lean.filt_mean, rec.filt_mean, rtol=0, atol=1e-12)
    assert torch.allclose(lean.filt_var, rec.filt_var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(num_particles=0), dict(ess_threshold=1.5), dict(resampling="x"),
                                dict(dtype=torch.int32)])
def test_configuration_errors(kw):
    args = dict(num_particles=10)
    args.update(kw)
    with pytest.raises(ConfigurationError):
        ParticleFilter(**args)


class _BufferedScale(ElmanSSM):
    """A time-varying emission scale r (1 + t mod 3) written in place into one buffer that the (loc, scale)
    shortcut returns at every step (the same tensor object, new values)."""

    def emission(self, t, h, u_t):
        return torch.distributions.Independent(torch.distributions.Normal(h @ self.C.T + self.d,
                                                                          self.r * (1 + t % 3)), 1)

    def emission_loc_scale(self, t, h, u_t):
        if not hasattr(self, "_buf"):
            self._buf = torch.zeros_like(self.r)
        return h @ self.C.T + self.d, self._buf.copy_(self.r * (1 + t % 3))


@pytest.mark.parametrize("obs_dim", [1, 2])
def test_emission_scale_changed_in_place_is_not_stale(float64, obs_dim):
    """The filter computes the emission's log-normaliser once while the scale is the same unchanged tensor;
    a scale buffer rewritten in place at every step gives the same filter as fresh scale tensors through the
    distribution (same random stream), with one or several observed entries."""
    model = _BufferedScale(2, obs_dim, seed=4, process_noise=0.2, obs_noise=0.3)
    data = prepare(model, model.simulate(12, 2, seed=5).observations)
    with seeded(0):
        fast = run_particle_filter(model, data, 64, proposal="bootstrap")
    ref = model.copy()
    ref.emission_loc_scale = None  # patched on the instance: the distribution, a fresh scale at every step
    with seeded(0):
        slow = run_particle_filter(ref, data, 64, proposal="bootstrap")
    torch.testing.assert_close(fast.log_lik, slow.log_lik, atol=1e-10, rtol=0)


def test_loc_scale_shortcut_same_law_and_guarded(float64):
    """ElmanSSM's (loc, scale) shortcuts give the same filter as its distributions (same random stream); a
    subclass that overrides a conditional without its shortcut is read through the distribution."""
    from ppl_rnn.capabilities import capability

    def loc_scale_shortcut(m, role):
        return capability(m, f"{role}_loc_scale")

    model = ElmanSSM(3, 2, input_dim=1, seed=4, process_noise=0.2, obs_noise=0.3)
    sim = model.simulate(30, 2, inputs=torch.randn(2, 30, 1), seed=5)
    y = sim.observations.clone()
    y[0, 4, 1] = float("nan")
    y[1, 9] = float("nan")
    data = prepare(model, y, sim.inputs)
    assert loc_scale_shortcut(model, "transition") is not None and loc_scale_shortcut(model, "emission") is not None
    with seeded(0):
        fast = run_particle_filter(model, data, 200)
    slow = model.copy()
    slow.transition_loc_scale = None  # patched on the instance: the shortcut is not used
    slow.emission_loc_scale = None
    assert loc_scale_shortcut(slow, "transition") is None and loc_scale_shortcut(slow, "emission") is None
    with seeded(0):
        ref = run_particle_filter(slow, data, 200)
    torch.testing.assert_close(fast.log_lik, ref.log_lik, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.filt_mean, ref.filt_mean, atol=1e-10, rtol=0)

    class Shifted(ElmanSSM):  # overrides the emission but not its shortcut
        def emission(self, t, h, u_t):
            return torch.distributions.Independent(torch.distributions.Normal(h @ self.C.T + self.d + 5.0, self.r), 1)

    sh = Shifted(3, 2, input_dim=1, seed=4, process_noise=0.2, obs_noise=0.3)
    assert loc_scale_shortcut(sh, "emission") is None and loc_scale_shortcut(sh, "transition") is not None
    with seeded(0):
        shifted = run_particle_filter(sh, data, 200)
    assert (shifted.log_evidence < fast.log_evidence - 100).all()  # the +5 shift is seen, not the stale shortcut


def test_guided_proposal_fully_missing_step_unbiased(float64):
    """Issue 11 bug 1: with a guided proposal (p/q != 1) a fully missing step has a non-zero evidence increment
    and its weights must be normalised (the filter used to force the increment to 0 and keep unnormalised
    weights, so the next resampling dropped their mass: mean Zhat/Z = 0.969, -11 SE). 1-D linear model, step 0
    missing, N = 4, EKFProposal(inflation=4), resampling every step; 20 000 independent filters in one call
    (one replicate sequence each)."""
    from ppl_rnn.inference.ekf_proposal import EKFProposal

    model = ElmanSSM(1, 1, activation="identity", process_noise=0.5, obs_noise=0.5, init_scale=1.0, seed=0)
    y = model.simulate(3, 1, seed=1).observations.clone()
    y[:, 0] = float("nan")
    logZ = _kalman(model, y).log_evidence
    R = 20000
    post = pr.infer(model, _replicate(y, R),
                    method=ParticleFilter(4, proposal=EKFProposal(inflation=4.0), ess_threshold=1.0), seed=0)
    assert post.diagnostics["proposal"] == "ekf"
    r = torch.exp(post.log_evidence - logZ).detach()
    se = r.std() / math.sqrt(R)
    assert abs(float(r.mean()) - 1) < 4 * float(se), (float(r.mean()), float(se))
    assert float(se) < 0.01  # the test has power: the old bias was about 0.03
    assert not bool((post.diagnostics["log_lik"][:, 0] == 0).all())  # p/q != 1 at the missing step
    lw = post.diagnostics["log_weights"]
    assert torch.allclose(torch.logsumexp(lw, 0), torch.zeros(R, dtype=lw.dtype), atol=1e-9)
