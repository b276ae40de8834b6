"""MonteCarloEM as parts (issue 26, point 3): the signature, each part's validation, the flat options of
``make_method("mcem", ...)`` mapped onto the parts, and the start objects used by other trainers.

Oracles: the parts' own definitions (a flat-option method and its parts-built twin give the same fit bit for
bit; a MultiStart keeps the candidate with the largest score and continues from exactly its parameters), and
the exact Kalman log-evidence for the linear models.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from ppl_rnn.inference import (
    BPTT,
    SAEM,
    Acceptance,
    AutoMStep,
    ClosedFormMStep,
    ConvergenceRule,
    FromModel,
    GradientMStep,
    KalmanEM,
    KalmanFilter,
    KalmanSmoother,
    LinearStart,
    MonteCarloEM,
    MultiStart,
    NARStart,
    ParticleSchedule,
    ParticleSmoother,
)
from ppl_rnn.inference.registry import make_method
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError


def _exact(model, y):
    return float(pr.infer(model, y, method=KalmanFilter()).log_evidence.sum())


def _linear_data(T=40, B=1, seed=0):
    true = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    return true.simulate(T, B, seed=seed).observations


def test_signature_has_at_most_ten_parameters():
    params = inspect.signature(MonteCarloEM).parameters
    assert len(params) <= 10
    assert list(params) == ["smoother", "num_iterations", "mstep", "acceptance", "schedule", "averaging", "start",
                            "stopping", "dtype", "progress"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    m = MonteCarloEM()
    assert isinstance(m.mstep, AutoMStep) and isinstance(m.acceptance, Acceptance)
    assert isinstance(m.start, FromModel) and m.averaging is None
    assert (m.stopping.tol, m.stopping.window, m.stopping.z) == (1e-5, 5, 2.0)
    with pytest.raises(TypeError):
        MonteCarloEM(init="nar")  # the old flat keywords are gone from the class (make_method maps them)


@pytest.mark.parametrize("make, name", [
    (lambda: ClosedFormMStep(transition_steps=-1), "transition_steps"),
    (lambda: GradientMStep(steps=1.5), "steps"),
    (lambda: GradientMStep(lr=0), "lr"),
    (lambda: GradientMStep(anneal_noise=(0.5, 10)), "anneal_noise"),
    (lambda: AutoMStep(anneal_noise=(2.0, 0)), "anneal_noise"),
    (lambda: AutoMStep(gradient=ClosedFormMStep()), "gradient"),
    (lambda: Acceptance(reject_se=-1.0), "reject_se"),
    (lambda: Acceptance(max_boost=0), "max_boost"),
    (lambda: Acceptance(ascent_z=-1.0), "ascent_z"),
    (lambda: Acceptance(overrelax=2.0), "overrelax"),
    (lambda: Acceptance(se_runs=1), "se_runs"),
    (lambda: Acceptance(se_runs=0), "se_runs"),  # would turn rejection off silently
    (lambda: ParticleSchedule(particles=(0, 10)), "particles"),
    (lambda: ParticleSchedule(paths=(10,)), "paths"),
    (lambda: ParticleSchedule(fn=lambda k: 10, particles=(1, 2)), "fn"),
    (lambda: SAEM(0.5), "alpha"),
    (lambda: LinearStart(iterations=0), "iterations"),
    (lambda: LinearStart(begin="zero"), "begin"),
    (lambda: LinearStart(gain=0.0), "gain"),
    (lambda: NARStart(order=0), "order"),
    (lambda: NARStart(ridge=-1.0), "ridge"),
    (lambda: NARStart(feature_scale=0.0), "feature_scale"),
    (lambda: MultiStart(num_starts=0), "num_starts"),
    (lambda: MultiStart(iterations=0), "iterations"),
    (lambda: MultiStart(kind="gaussian"), "kind"),
    (lambda: MultiStart(base=MultiStart()), "base"),
    (lambda: MonteCarloEM(mstep="gradient"), "mstep"),
    (lambda: MonteCarloEM(acceptance=3.0), "acceptance"),
    (lambda: MonteCarloEM(schedule=(10, 100)), "schedule"),
    (lambda: MonteCarloEM(averaging=0.7), "averaging"),
    (lambda: MonteCarloEM(start="nar"), "start"),
    (lambda: MonteCarloEM(stopping=1e-5), "stopping"),
])
def test_each_part_validates_its_options(make, name):
    with pytest.raises(ConfigurationError, match=name):
        make()


def test_se_runs_zero_is_allowed_only_without_rejection(float64):
    assert Acceptance(se_runs=0, reject_se=None).se_runs == 0
    with pytest.raises(ConfigurationError, match="reject_se=None"):
        Acceptance(se_runs=0)


def test_schedule_and_saem_sizes():
    sm = ParticleSmoother(50, 10)
    s = ParticleSchedule(particles=(50, 400))
    assert [s.sizes(k, 4, sm) for k in range(5)] == [(50, 10), (100, 10), (200, 10), (400, 10), (400, 10)]
    assert ParticleSchedule(fn=lambda k: (7, 3)).sizes(0, 4, sm) == (7, 3)
    assert ParticleSchedule().sizes(2, 4, KalmanSmoother()) == (None, 100)
    g = SAEM(1.0)
    assert [g.gamma(k, 6) for k in range(6)] == [1.0, 1.0, 1.0, 1.0, 0.5, 1 / 3]
    grown = ParticleSchedule(growth=(8, 2), over=4)
    assert [grown.sizes(k, 4, sm) for k in (0, 3, 9)] == [(50, 10), (400, 20), (400, 20)]
    # reached at iteration over - 1 whatever the run's length (resumable)
    assert ParticleSchedule(growth=(8, 2)).sizes(49, 2, sm) == (400, 20)
    assert ParticleSchedule(growth=(8, 2)).sizes(1, 2, sm) == ParticleSchedule(growth=(8, 2)).sizes(1, 50, sm)
    for bad in ((0.5, 1), (8,), (True, 2)):
        with pytest.raises(ConfigurationError, match="growth"):
            ParticleSchedule(growth=bad)
    with pytest.raises(ConfigurationError, match="alone"):
        ParticleSchedule(growth=(2, 2), particles=(10, 20))


def test_default_schedule_follows_the_m_step():
    """No schedule given: an M-step with a ``particle_growth`` (L-BFGS) grows the E-step, the closed form and Adam
    keep the smoother's sizes; a given schedule always wins."""
    m = MonteCarloEM(smoother=ParticleSmoother(50, 10), num_iterations=5)
    assert m._sizes(49, GradientMStep()) == (400, 20)
    assert m._sizes(49, GradientMStep(optimizer="adam")) == (50, 10)
    assert m._sizes(49, ClosedFormMStep()) == (50, 10)
    given = MonteCarloEM(smoother=ParticleSmoother(50, 10), num_iterations=5, schedule=ParticleSchedule())
    assert given._sizes(49, GradientMStep()) == (50, 10)


def _same_fit(a, b):
    assert set(a.trace.data_vars) == set(b.trace.data_vars)
    for v in a.trace.data_vars:
        if v != "wall_time_s":
            np.testing.assert_array_equal(a.trace[v].values, b.trace[v].values, err_msg=v)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_flat_options_of_make_method_build_the_same_parts(float64):
    flat = make_method("mcem", num_particles=64, num_paths=8, num_iterations=3, tol=0, mstep="gradient",
                       gradient_steps=3, lr=0.02, anneal_noise=(2.0, 2), overrelax=1.5, max_boost=4, saem=0.8,
                       particle_schedule=((32, 4), (64, 8)), init="nar", init_order=2, num_restarts=2,
                       restart_iterations=1)
    assert flat.mstep == GradientMStep(optimizer="adam", steps=3, lr=0.02, anneal_noise=(2.0, 2))  # lr: Adam
    assert flat.acceptance == Acceptance(overrelax=1.5, max_boost=4)
    assert flat.averaging == SAEM(0.8) and flat.schedule == ParticleSchedule(particles=(32, 64), paths=(4, 8))
    assert flat.start == MultiStart(num_starts=2, iterations=1, base=NARStart(order=2))
    assert flat.stopping.tol == 0
    auto = make_method("mcem", gradient_steps=3, lr=0.5, learn_initial=False)
    assert auto.mstep == AutoMStep(closed_form=ClosedFormMStep(transition_steps=3, learn_initial=False),
                                   gradient=GradientMStep(optimizer="adam", steps=3, lr=0.5))
    assert make_method("mcem", mstep="gradient", gradient_steps=4).mstep == GradientMStep(steps=4)
    assert make_method("mcem", init="linear", init_iterations=5, init_linear="model").start == LinearStart(
        iterations=5, begin="model")
    with pytest.raises(ConfigurationError, match="not both"):
        make_method("mcem", acceptance=Acceptance(), reject_se=2.0)
    # the flat method and the parts-built one fit the same, bit for bit
    y = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1).simulate(40, 1, seed=0).observations
    m = ElmanSSM(2, 1, seed=5)
    flat = make_method("mcem", num_particles=64, num_paths=8, num_iterations=3, tol=0, mstep="gradient",
                       gradient_steps=3, lr=0.02, overrelax=1.5, saem=0.8)
    parts = MonteCarloEM(smoother=ParticleSmoother(64, 8), num_iterations=3, stopping=ConvergenceRule(tol=0),
                         mstep=GradientMStep(optimizer="adam", steps=3, lr=0.02), acceptance=Acceptance(overrelax=1.5),
                         averaging=SAEM(0.8))
    _same_fit(pr.fit(m, y, method=flat, seed=3), pr.fit(m, y, method=parts, seed=3))


def test_multistart_with_kalman_em_through_pr_fit(float64):
    """MultiStart with another trainer: KalmanEM, run short on each candidate through ``pr.fit(start=)``."""
    y = _linear_data()
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    start = MultiStart(num_starts=3, iterations=2)
    r = pr.fit(m, y, method=KalmanEM(num_iterations=3, tol=0), start=start, seed=0)
    scores, chosen = r.diagnostics["restart_log_evidence"], r.diagnostics["restart_chosen"]
    models = r.diagnostics["restart_models"]
    assert len(scores) == 3 and np.ptp(scores) > 1e-3 and chosen == int(np.argmax(scores))
    # each score is the candidate's exact evidence after its short run (KalmanEM's trace is exact)
    short = [pr.fit(start.candidate(m, 0, i), y, method=KalmanEM(num_iterations=2, tol=0), seed=0) for i in range(3)]
    np.testing.assert_allclose(scores, [s.trace.log_evidence.values[-2:].mean() for s in short], rtol=1e-12)
    # the fit continues from exactly the chosen candidate's fitted parameters
    for name in ("W", "C", "q", "r"):
        np.testing.assert_allclose(r.trace[name].values[0], getattr(models[chosen], name).detach().numpy(),
                                   rtol=1e-12, err_msg=name)
    assert r.trace.log_evidence.values[0] == pytest.approx(_exact(models[chosen], y), abs=1e-8)
    np.testing.assert_allclose(m.W.detach().numpy(), ElmanSSM(2, 1, activation="identity", seed=5).W.detach())
    plain = pr.fit(m, y, method=KalmanEM(num_iterations=3, tol=0), seed=0)
    assert "restart_log_evidence" not in plain.diagnostics
    np.testing.assert_allclose(plain.trace.W.values[0], m.W.detach().numpy())


def test_multistart_with_bptt_and_one_route_per_trainer(float64):
    y = _linear_data()
    m = ElmanSSM(2, 1, seed=5)
    r = pr.fit(m, y, method=BPTT(num_steps=3, lr=0.05), start=MultiStart(num_starts=2, iterations=2), seed=0)
    assert len(r.diagnostics["restart_log_evidence"]) == 2
    chosen = r.diagnostics["restart_models"][r.diagnostics["restart_chosen"]]
    np.testing.assert_allclose(r.trace.W.values[0], chosen.W.detach().numpy(), rtol=1e-12)
    with pytest.raises(ConfigurationError, match="MonteCarloEM\\(start="):
        pr.fit(m, y, method=MonteCarloEM(num_iterations=1), start=MultiStart(num_starts=2), seed=0)
    with pytest.raises(ConfigurationError, match="start"):
        pr.fit(m, y, method=BPTT(num_steps=1), start="linear", seed=0)
