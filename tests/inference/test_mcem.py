"""MonteCarloEM (float64, tiny problems, fixed seeds).

Oracles: KalmanEM (exact EM) and the exact Kalman log-evidence on ElmanSSM(activation="identity").

* one MCEM step with an exact (FFBS) E-step and many paths equals one exact EM step up to Monte Carlo error
  (checks ``ElmanSSM.closed_form_mstep`` against the moment-based KalmanEM update);
* (acceptance a, slow) with the particle smoother, MCEM reaches KalmanEM's exact log-evidence within
  1 nat per 1000 observations;
* (acceptance b) on a tanh network the trace rises up to Monte Carlo noise (drops within 6 SE of the
  evidence estimator, measured by repeated filters);
* the generic gradient M-step (a model without ``closed_form_mstep``) raises the exact evidence;
* trace layout, particle schedule, SAEM; configuration errors; divergence -> DivergenceError with last_good.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanFilter, KalmanSmoother, ParticleFilter, ParticleSmoother
from ppl_rnn.inference.acceptance import Acceptance
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.kalman_em import KalmanEM, kalman_em_step
from ppl_rnn.inference.mcem import SAEM, MonteCarloEM, ParticleSchedule
from ppl_rnn.inference.msteps import AutoMStep, ClosedFormMStep, GradientMStep
from ppl_rnn.inference.starts import MultiStart
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DivergenceError, ModelCapabilityError


def _exact(model, y):
    return float(pr.infer(model, y, method=KalmanFilter()).log_evidence.sum())


def _linear_data(T=60, B=2, seed=0):
    true = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    return true.simulate(T, B, seed=seed).observations


def test_closed_form_step_matches_exact_em_step(float64):
    y = _linear_data()
    y[0, 10:13] = float("nan")
    m = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=5)
    data = prepare(m, y)
    exact = m.copy()
    kalman_em_step(exact, data)
    mc = m.copy()
    with torch.no_grad():
        paths = pr.infer(m, y, method=KalmanSmoother()).sample(4000, seed=0)
    mc.closed_form_mstep(paths, data.observations, data.mask, data.inputs)
    for name in ("W", "b", "C", "d", "q", "r", "m0", "s0"):
        a, b = getattr(exact, name).detach(), getattr(mc, name).detach()
        assert torch.allclose(a, b, atol=0.03, rtol=0.03), (name, a, b)
    # and the step is not the identity map (the test would pass trivially otherwise)
    assert not torch.allclose(exact.W.detach(), m.W.detach(), atol=0.05)


@pytest.mark.slow
def test_mcem_reaches_kalman_em_evidence(float64):
    """Acceptance (a): within 1 nat per 1000 observations of exact EM, same initial model and iterations."""
    y = _linear_data(T=200, B=1, seed=3)
    m0 = ElmanSSM(2, 1, activation="identity", seed=5)
    iters = 20
    kem = pr.fit(m0, y, method=KalmanEM(num_iterations=iters, tol=0), seed=0)
    mcem = pr.fit(m0, y, method=MonteCarloEM(smoother=ParticleSmoother(200, 50), num_iterations=iters, stopping=ConvergenceRule(tol=0),
                                             schedule=ParticleSchedule(particles=(200, 1000), paths=(50, 200))),
                  seed=0)
    le_k, le_m, le_0 = _exact(kem.model, y), _exact(mcem.model, y), _exact(m0, y)
    assert le_k > le_0 + 20
    assert le_m > le_k - 1.0 * y.numel() / 1000, (le_m, le_k)


def test_trace_rises_up_to_mc_noise(float64):
    """Acceptance (b) on a tanh network."""
    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1)
    y = true.simulate(100, 1, seed=0).observations
    m = ElmanSSM(2, 1, seed=5)
    r = pr.fit(m, y, method=MonteCarloEM(smoother=ParticleSmoother(200, 30), num_iterations=8,
                                         stopping=ConvergenceRule(tol=0)), seed=0)
    le = r.trace.log_evidence.values
    # standard error of the evidence estimator at the fitted model (N=200, same as the E-step)
    reps = [float(pr.infer(r.model, y, method=ParticleFilter(200), seed=s).log_evidence.sum()) for s in range(6)]
    se = float(np.std(reps, ddof=1))
    running_max = np.maximum.accumulate(le)
    assert (le[1:] - running_max[:-1]).min() > -6 * math.sqrt(2) * se - 0.5, (le, se)
    assert le[-3:].mean() > le[0] + 8  # it rises (fails if the M-step is removed)
    assert r.trace.objective.values[1:].size == 8 and np.isfinite(r.trace.objective.values[1:]).all()


def test_generic_gradient_mstep_raises_exact_evidence(float64):
    """A model without closed_form_mstep (LinearGaussianSSM) gets Adam steps on the MC objective."""
    true = LinearGaussianSSM(2, 1, seed=1)
    y = true.simulate(40, 2, seed=0).observations
    m = LinearGaussianSSM(2, 1, seed=4, Q=0.5 * torch.eye(2), R=torch.eye(1))
    method = MonteCarloEM(smoother=KalmanSmoother(), schedule=ParticleSchedule(paths=(30, 30)), num_iterations=3,
                          stopping=ConvergenceRule(tol=0), mstep=AutoMStep(gradient=GradientMStep(optimizer="adam", steps=10, lr=0.05)))
    r = pr.fit(m, y, method=method, seed=0)
    assert r.diagnostics["mstep"] == "gradient"
    assert _exact(r.model, y) > _exact(m, y) + 20
    with pytest.raises(ModelCapabilityError):
        pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), mstep=ClosedFormMStep(), num_iterations=1))


def test_trace_layout_schedule_and_saem(float64):
    y = _linear_data(T=30, B=1)
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    method = MonteCarloEM(smoother=ParticleSmoother(50, 10), num_iterations=4, stopping=ConvergenceRule(tol=0),
                          averaging=SAEM(lambda k: 1 / (k + 1)),
                          schedule=ParticleSchedule(particles=(50, 400), paths=(10, 40)))
    r = pr.fit(m, y, method=method, seed=0)
    tr = r.trace
    assert tr.sizes["iteration"] == 5
    for v in ("log_evidence", "objective", "num_particles", "num_paths", "gamma", "wall_time_s", "W", "C", "q"):
        assert v in tr.data_vars
    np.testing.assert_array_equal(tr.num_particles.values, [50, 100, 200, 400, 400])
    np.testing.assert_array_equal(tr.num_paths.values[[0, -1]], [10, 40])
    np.testing.assert_allclose(tr.gamma.values[:4], [1, 1 / 2, 1 / 3, 1 / 4])
    assert np.all(np.diff(tr.wall_time_s.values) >= 0)
    assert math.isnan(tr.objective.values[0])
    np.testing.assert_allclose(tr.q.values[-1], r.model.q.detach().numpy())
    assert r.posterior is not None and r.posterior.kind == "smoothing"
    # same seed, same fit
    r2 = pr.fit(m, y, method=method, seed=0)
    np.testing.assert_allclose(r2.trace.log_evidence.values, tr.log_evidence.values)


def test_configuration_errors():
    default = MonteCarloEM()
    assert isinstance(default.smoother, ParticleSmoother) and default.smoother.num_paths == 100
    assert default.smoother.backward == "mcmc"
    with pytest.raises(ConfigurationError):
        MonteCarloEM(schedule=ParticleSchedule(particles=(0, 100)))
    with pytest.raises(ConfigurationError):
        MonteCarloEM(schedule=ParticleSchedule(particles=(10, 100), paths=(0, 10)))
    with pytest.raises(ConfigurationError):
        MonteCarloEM(schedule=ParticleSchedule(fn=lambda k: 0))
    with pytest.raises(ConfigurationError):
        MonteCarloEM(stopping=ConvergenceRule(tol=-1e-3))
    with pytest.raises(ConfigurationError):
        MonteCarloEM(mstep="newton")
    with pytest.raises(ConfigurationError):
        MonteCarloEM(smoother="particle")
    with pytest.raises(ConfigurationError):
        MonteCarloEM(averaging=SAEM(2.0))
    with pytest.raises(ConfigurationError):
        ParticleSmoother(num_particles=0)


class _Exploding(ElmanSSM):
    """Its second M-step produces NaN output weights."""

    calls = 0

    def closed_form_mstep(self, *args, **kwargs):
        out = super().closed_form_mstep(*args, **kwargs)
        type(self).calls += 1
        if type(self).calls >= 2:
            self.C = torch.full_like(self.C.detach(), float("nan"))
        return out


def test_divergence_error_names_iteration_and_keeps_last_good(float64):
    y = _linear_data(T=30, B=1)
    _Exploding.calls = 0
    m = _Exploding(2, 1, activation="identity", seed=5)
    with pytest.raises(DivergenceError) as ei:
        pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), num_iterations=5, stopping=ConvergenceRule(tol=0)), seed=0)
    e = ei.value
    assert e.iteration == 2 and "iteration 2" in str(e) and "C" in str(e)
    good = e.last_good
    assert good is not None and good.trace.sizes["iteration"] == 2
    assert all(bool(torch.isfinite(p).all()) for p in good.model.parameters())
    np.testing.assert_allclose(good.trace.C.values[-1], good.model.C.detach().numpy())


def test_random_restarts_keep_the_best_candidate(float64):
    y = _linear_data(T=40, B=1)
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    method = MonteCarloEM(smoother=KalmanSmoother(), num_iterations=2, stopping=ConvergenceRule(tol=0),
                          start=MultiStart(num_starts=3, iterations=2))
    r = pr.fit(m, y, method=method, seed=0)
    scores = r.diagnostics["restart_log_evidence"]
    assert len(scores) == 3 and np.ptp(scores) > 1e-3  # the candidates really differ
    assert r.diagnostics["restart_chosen"] == int(np.argmax(scores))
    assert scores[r.diagnostics["restart_chosen"]] == max(scores)
    # the continued run starts from the chosen candidate's fit, not from the given model
    assert not np.allclose(r.trace.W.values[0], m.W.detach().numpy())
    # ... and from that candidate's, not another's: row 0 holds its parameters and (exact E-step) its evidence
    models, chosen = r.diagnostics["restart_models"], r.diagnostics["restart_chosen"]
    assert len(models) == 3
    for name in ("W", "b", "C", "q", "r"):
        np.testing.assert_allclose(r.trace[name].values[0], getattr(models[chosen], name).detach().numpy(),
                                   rtol=1e-12, err_msg=name)
    assert r.trace.log_evidence.values[0] == pytest.approx(_exact(models[chosen], y), abs=1e-8)
    others = [_exact(models[i], y) for i in range(3) if i != chosen]
    assert min(abs(r.trace.log_evidence.values[0] - o) for o in others) > 1e-3  # the candidates' fits differ
    plain = pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), num_iterations=2, stopping=ConvergenceRule(tol=0)), seed=0)
    np.testing.assert_allclose(plain.trace.W.values[0], m.W.detach().numpy())
    assert "restart_log_evidence" not in plain.diagnostics
    # restarts are reproducible and leave the caller's model untouched
    r2 = pr.fit(m, y, method=method, seed=0)
    np.testing.assert_allclose(r2.diagnostics["restart_log_evidence"], scores)
    with pytest.raises(ConfigurationError):
        MultiStart(num_starts=0)


def test_noise_annealing_inflates_process_noise_then_frees_it(float64):
    y = _linear_data(T=40, B=1)
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    plain = pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), num_iterations=1, stopping=ConvergenceRule(tol=0)), seed=0)
    ann = pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), num_iterations=1, stopping=ConvergenceRule(tol=0),
                                           mstep=AutoMStep(anneal_noise=(3.0, 4))), seed=0)
    # first M-step: same paths, same update, then q inflated by the full factor
    np.testing.assert_allclose(ann.model.q.detach().numpy(), 3.0 * plain.model.q.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(ann.model.W.detach().numpy(), plain.model.W.detach().numpy(), rtol=1e-10)
    with pytest.raises(ConfigurationError):
        AutoMStep(anneal_noise=(0.5, 10))


def test_overrelaxed_step_stretches_the_em_move_in_unconstrained_space(float64):
    y = _linear_data(T=40, B=1)
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}

    def one_step(omega):
        method = MonteCarloEM(smoother=KalmanSmoother(), num_iterations=1, stopping=ConvergenceRule(tol=0),
                              mstep=ClosedFormMStep(learn_initial=True),
                              acceptance=Acceptance(reject_se=None, overrelax=omega))
        return pr.fit(m, y, method=method, seed=0).model

    plain, stretched = one_step(1.0), one_step(1.5)
    moved = 0
    for n, p in stretched.named_parameters():
        p1 = dict(plain.named_parameters())[n].detach()
        # same exact-E-step paths (same seed), so the stretched step is theta0 + 1.5 (theta1 - theta0);
        # positive parameters (q, r, s0) are compared in their log-space parametrisation
        np.testing.assert_allclose(p.detach().numpy(), (start[n] + 1.5 * (p1 - start[n])).numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=n)
        moved += int(not torch.allclose(p1, start[n]))
    assert moved >= 6  # the M-step moved (almost) every block, so the identity is not vacuous
    assert torch.all(stretched.q > 0) and torch.all(stretched.r > 0)
    for bad in (0, 2, 2.5, -1.0, True, "1.8"):
        with pytest.raises(ConfigurationError, match="overrelax"):
            Acceptance(overrelax=bad)


def test_a_rejected_stretched_step_falls_back_to_plain_em_and_omega_grows_back(float64):
    """A stretched step that is rejected is retried from theta_k as a plain EM step with the same particles
    (the stretch, not the Monte Carlo sample, is the suspect); omega then grows by 1.1 per accepted step."""
    from .test_mcem_warm_start import _Sabotaged, _sharp_series

    _Sabotaged.calls = 0
    m = _Sabotaged(2, 1, activation="identity", seed=5)
    r = pr.fit(m, _sharp_series(60), method=MonteCarloEM(smoother=ParticleSmoother(100, 20), num_iterations=5,
                                                         stopping=ConvergenceRule(tol=0), acceptance=Acceptance(overrelax=1.5)), seed=0)
    tr = r.trace
    np.testing.assert_array_equal(tr.rejected.values, [0, 0, 1, 0, 0, 0, 0])
    # rows: start, step 1 (1.5), sabotaged step 2 (1.5, rejected), theta_1 again, then 1, 1.1, 1.21
    np.testing.assert_allclose(tr.overrelax.values[1:], [1.5, 1.5, 1.5, 1.0, 1.1, 1.21])
    assert math.isnan(tr.overrelax.values[0])
    np.testing.assert_array_equal(tr.num_particles.values, 100)  # no boost: the plain step was not rejected
    assert r.diagnostics["num_iterations"] == 5 and "stopped" not in r.diagnostics
    plain = pr.fit(ElmanSSM(2, 1, activation="identity", seed=5), _sharp_series(60),
                   method=MonteCarloEM(smoother=ParticleSmoother(100, 20), num_iterations=2, stopping=ConvergenceRule(tol=0)), seed=0)
    assert "overrelax" not in plain.trace  # plain EM's trace is unchanged


def _exact_guard_fit(omega, n):
    y = _linear_data(T=200, B=1)
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    return y, pr.fit(m, y, method=MonteCarloEM(smoother=KalmanSmoother(), num_iterations=n, stopping=ConvergenceRule(tol=0),
                                               acceptance=Acceptance(overrelax=omega)), seed=0)


def _kept_never_falls(tr):
    kept = tr.log_evidence.values[tr.rejected.values == 0]
    assert np.all(np.diff(kept) >= -1e-9 * np.maximum(1.0, np.abs(kept[:-1]))), np.diff(kept)
    return kept


def test_overrelaxed_step_that_lowers_exact_evidence_is_refused(float64):
    """Issue 28: with an exact E-step (standard error 0) the over-relaxation guard compares the exact evidence
    directly: the first stretched step (-31.94 -> -38.05 here) is refused and retried as a plain EM step."""
    y, r = _exact_guard_fit(1.8, 3)
    tr = r.trace
    np.testing.assert_array_equal(tr.rejected.values, [0, 1, 0, 0, 0])
    assert tr.log_evidence.values[1] < tr.log_evidence.values[0] - 5  # the refused stretched step fell
    np.testing.assert_allclose(tr.overrelax.values[1:], [1.8, np.nan, 1.0, 1.1])  # row 2: theta_0 again
    kept = _kept_never_falls(tr)
    assert kept[-1] == pytest.approx(_exact(r.model, y), abs=1e-8)  # the trace's evidence is the exact one


@pytest.mark.slow
def test_overrelaxed_mcem_never_lowers_exact_evidence(float64):
    """Issue 28: 40 iterations of over-relaxed MCEM with an exact E-step never lower the exact log-evidence
    (unguarded, omega = 1.8 ended at 1.420 and 1.95 at 0.773) and end at least where plain EM ends (1.854)."""
    _, plain = _exact_guard_fit(1.0, 40)
    for omega in (1.8, 1.95):
        _, r = _exact_guard_fit(omega, 40)
        kept = _kept_never_falls(r.trace)
        assert r.trace.rejected.values.sum() >= 1 and "stopped" not in r.diagnostics
        assert kept[-1] >= plain.trace.log_evidence.values[-1] - 1e-9, (omega, kept[-1])
