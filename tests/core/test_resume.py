"""Resumable fits: ``pr.fit(..., resume=earlier_fit)`` continues a fit from its recorded state.

Oracle: the uninterrupted run. ``K`` then ``L - K`` iterations must give the parameters and the trace of ``L``
uninterrupted ones (float64, to 1e-6; in fact bit for bit, since the resumed run redraws its first evaluation
from the recorded RNG state) for MonteCarloEM (closed-form and gradient M-steps, over-relaxation, SAEM's bank,
a particle smoother E-step) and for BPTT, KalmanEM and MeanFieldEM; methods or fits that cannot resume raise ConfigurationError.
"""

from __future__ import annotations

import numpy as np
import pytest
from ppl_rnn.inference import BPTT, KalmanSmoother, ParticleFilter, ParticleSmoother
from ppl_rnn.inference.acceptance import Acceptance
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.mcem import MCEMState, MonteCarloEM
from ppl_rnn.inference.msteps import GradientMStep
from ppl_rnn.inference.starts import LinearStart
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.results import FitState


def _data(T=50):
    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1)
    return true.simulate(T, 1, seed=0).observations


def _assert_same_fit(a, b, tol=1e-6):
    assert set(a.trace.data_vars) == set(b.trace.data_vars)
    assert a.trace.sizes["iteration"] == b.trace.sizes["iteration"]
    for name in a.trace.data_vars:
        if name == "wall_time_s":
            continue
        np.testing.assert_allclose(a.trace[name].values, b.trace[name].values, rtol=0, atol=tol, err_msg=name)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=tol, err_msg=n)


def _mcem(n, **kw):
    return MonteCarloEM(smoother=ParticleSmoother(64, 8, backward="mcmc"), num_iterations=n,
                        stopping=ConvergenceRule(tol=0), **kw)


@pytest.mark.parametrize("opts", [
    {},
    {"mstep": GradientMStep(steps=3)},
    {"mstep": GradientMStep(optimizer="adam", steps=3, lr=0.02)},
    {"acceptance": Acceptance(overrelax=1.5), "averaging": lambda k: 1.0 if k < 1 else 0.5},
])
def test_mcem_two_plus_two_iterations_equal_four(float64, opts):
    y, m = _data(), ElmanSSM(2, 1, seed=5)
    full = pr.fit(m, y, method=_mcem(4, **opts), seed=3)
    half = pr.fit(m, y, method=_mcem(2, **opts), seed=3)
    assert isinstance(half.state, FitState) and half.state.iteration == 2
    assert isinstance(half.state.trainer, MCEMState)
    resumed = pr.fit(m, y, method=_mcem(4, **opts), seed=99, resume=half)  # the seed is not used again
    _assert_same_fit(resumed, full)
    assert resumed.diagnostics["num_iterations"] == 4 and resumed.state.iteration == 4
    # the resumed trace holds the earlier rows: it is not the 2-iteration run re-done
    assert not np.allclose(half.model.W.detach().numpy(), resumed.model.W.detach().numpy())
    if opts:
        st = resumed.state.trainer
        assert st.mstep is not None or st.acceptance.omega_of > 1 or opts.get("averaging")
    # and 1 + 1 + 2 as well
    one = pr.fit(m, y, method=_mcem(1, **opts), seed=3)
    two = pr.fit(m, y, method=_mcem(2, **opts), resume=one)
    _assert_same_fit(pr.fit(m, y, method=_mcem(4, **opts), resume=two), full)


def test_mcem_resume_skips_the_warm_start(float64):
    y, m = _data(), ElmanSSM(2, 1, activation="identity", seed=5)
    method = lambda n: MonteCarloEM(smoother=KalmanSmoother(), num_iterations=n,  # noqa: E731
                                    stopping=ConvergenceRule(tol=0), start=LinearStart(iterations=5))
    full = pr.fit(m, y, method=method(4), seed=0)
    half = pr.fit(m, y, method=method(2), seed=0)
    resumed = pr.fit(m, y, method=method(4), seed=0, resume=half)
    _assert_same_fit(resumed, full)
    assert resumed.diagnostics["init"] == "linear"  # the warm start's record is carried, not re-run
    # a resumed fit that has nothing left to do re-evaluates theta_K only
    same = pr.fit(m, y, method=method(4), seed=0, resume=resumed)
    _assert_same_fit(same, full)


@pytest.mark.slow
def test_mcem_resume_carries_the_boost_and_omega(float64):
    """Over-relaxed MCEM with an exact E-step (the issue-28 guard refuses falls): by iteration 20 of this run
    rejections have doubled the paths and omega is growing back after a fallback; 20 + 3 = 23 iterations."""
    true = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    y, m = true.simulate(200, 1, seed=0).observations, ElmanSSM(2, 1, activation="identity", seed=5)
    method = lambda n: MonteCarloEM(smoother=KalmanSmoother(), num_iterations=n,  # noqa: E731
                                    stopping=ConvergenceRule(tol=0), acceptance=Acceptance(overrelax=1.8))
    half = pr.fit(m, y, method=method(20), seed=0)
    st = half.state.trainer.acceptance
    assert st.boost == 2 and st.grow and st.omega < 1.8  # the parts a fresh start would get wrong
    full = pr.fit(m, y, method=method(23), seed=0)
    _assert_same_fit(pr.fit(m, y, method=method(23), resume=half), full)
    assert (full.trace.num_paths.values[-3:] == 200).all() and full.trace.rejected.values.sum() >= 3


def test_bptt_two_plus_two_steps_equal_four(float64):
    y, m = _data(), ElmanSSM(2, 1, seed=5)
    full = pr.fit(m, y, method=BPTT(num_steps=4, lr=0.05), seed=0)
    half = pr.fit(m, y, method=BPTT(num_steps=2, lr=0.05), seed=0)
    resumed = pr.fit(m, y, method=BPTT(num_steps=4, lr=0.05), seed=0, resume=half)
    _assert_same_fit(resumed, full)
    # Adam's moments are part of the state: a fresh Adam from the 2-step parameters goes elsewhere
    restart = pr.fit(half.model, y, method=BPTT(num_steps=2, lr=0.05), seed=0)
    assert not np.allclose(restart.model.W.detach().numpy(), full.model.W.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["kalman_em", "meanfield_em"])
def test_closed_form_em_three_plus_three_equal_six(float64, kind):
    from ppl_rnn.inference.kalman_em import KalmanEM
    from ppl_rnn.inference.meanfield_em import MeanFieldEM

    cls = KalmanEM if kind == "kalman_em" else MeanFieldEM
    y = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1).simulate(60, 1, seed=0).observations
    m = ElmanSSM(2, 1, activation="identity" if kind == "kalman_em" else "tanh", seed=5)
    full = pr.fit(m, y, method=cls(num_iterations=6, tol=0), seed=0)
    half = pr.fit(m, y, method=cls(num_iterations=3, tol=0), seed=0)
    _assert_same_fit(pr.fit(m, y, method=cls(num_iterations=6, tol=0), resume=half), full, tol=1e-9)


def test_resume_errors_are_clear(float64):
    y, m = _data(), ElmanSSM(2, 1, seed=5)
    half = pr.fit(m, y, method=_mcem(1), seed=0)
    with pytest.raises(ConfigurationError, match="same kind of method"):
        pr.fit(m, y, method=BPTT(num_steps=3), resume=half)  # a fit of another method class
    with pytest.raises(ConfigurationError, match="shape"):
        pr.fit(m, y[:, :40], method=_mcem(3), resume=half)  # other data
    with pytest.raises(ConfigurationError, match="cannot continue"):
        pr.fit(m, y, method=ParticleFilter(32), resume=half)  # a method without resume support
    from ppl_rnn.inference import SVI

    with pytest.raises(ConfigurationError, match="SVI cannot continue"):
        pr.fit(m, y, method=SVI(num_steps=2), resume=half)
    with pytest.raises(ConfigurationError, match="FitResult"):
        pr.fit(m, y, method=_mcem(3), resume=half.model)
    with pytest.raises(ConfigurationError, match="num_iterations"):
        pr.fit(m, y, method=_mcem(3), resume=pr.fit(m, y, method=_mcem(4), seed=0))  # would end before it
    with pytest.raises(ConfigurationError, match="no state"):
        import dataclasses

        pr.fit(m, y, method=_mcem(3), resume=dataclasses.replace(half, state=None))
    with pytest.raises(ConfigurationError, match="do not fit this model"):
        pr.fit(ElmanSSM(3, 1, seed=0), y, method=_mcem(3), resume=half)
