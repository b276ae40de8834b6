"""MonteCarloEM's ascent test (``Acceptance(ascent_z=)``) and rotation restarts (``MultiStart(kind="rotation")``),
float64.

Oracle: the exact Kalman log-evidence of ``ElmanSSM(activation="identity")``.

* at the exact EM optimum (KalmanEM run to convergence) every MCEM step is Monte Carlo noise: plain MCEM with
  few paths loses exact log-evidence, the ascent test refuses those steps (parameters kept, paths doubled) and
  ends where it began;
* from a poor start the ascent test keeps the steps (they are real ascents) and the evidence rises like plain
  MCEM's;
* ``rotation_restart`` redraws ``W`` as a rotation times the gain (every eigenvalue of modulus 1.1) and leaves
  the other parameters; restarts of that kind run and choose the best candidate; a model without the
  capability gets a ModelCapabilityError naming it; bad settings raise ConfigurationError.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference import KalmanFilter, ParticleSmoother
from ppl_rnn.inference.acceptance import Acceptance
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.kalman_em import KalmanEM
from ppl_rnn.inference.mcem import MonteCarloEM
from ppl_rnn.inference.msteps import ClosedFormMStep
from ppl_rnn.inference.starts import MultiStart
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError


def _exact(model, y):
    return float(pr.infer(model, y, method=KalmanFilter()).log_evidence.sum())


def _data(T=80, B=2, seed=0):
    true = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.2, seed=1)
    return true.simulate(T, B, seed=seed).observations


def _mcem(ascent_z=None, learn_initial=True):
    return MonteCarloEM(smoother=ParticleSmoother(100, 4), num_iterations=3, stopping=ConvergenceRule(tol=0),
                        mstep=ClosedFormMStep(learn_initial=learn_initial), acceptance=Acceptance(ascent_z=ascent_z))


@pytest.mark.slow  # about 30 s: 400 KalmanEM iterations to an exact optimum, then MCEM there
def test_ascent_test_keeps_an_exact_optimum(float64):
    y = _data()
    opt = pr.fit(ElmanSSM(2, 1, activation="identity", seed=5), y, method=KalmanEM(num_iterations=400, tol=0),
                 seed=0).model
    le_opt = _exact(opt, y)
    plain = pr.fit(opt, y, method=_mcem(learn_initial=False), seed=0)
    guarded = pr.fit(opt, y, method=_mcem(learn_initial=False, ascent_z=1.0), seed=0)
    loss_plain = le_opt - _exact(plain.model, y)
    loss_guarded = le_opt - _exact(guarded.model, y)
    assert loss_plain > 0.15, loss_plain  # four paths: the M-step fits their noise
    assert loss_guarded < 0.05, loss_guarded
    t = guarded.trace
    kept = t.ascent_kept.values[:-1]
    assert kept.sum() < len(kept), kept
    # a refused step leaves the parameters exactly and doubles the paths of the next E-step
    k = int(np.argmin(kept))
    np.testing.assert_array_equal(t.W.values[k + 1], t.W.values[k])
    assert t.num_paths.values[k + 1] == 2 * t.num_paths.values[k]
    assert np.isnan(t.objective.values[k + 1])  # no M-step kept: no Q-hat of the refused parameters
    assert np.all(t.ascent_se.values[:-1] > 0)


def test_ascent_test_keeps_real_ascents(float64):
    y = _data()
    m = ElmanSSM(2, 1, activation="identity", seed=5)
    guarded = pr.fit(m, y, method=_mcem(ascent_z=1.0), seed=0)
    assert guarded.trace.ascent_kept.values[0] == 1
    assert guarded.trace.ascent_dq.values[0] > 3 * guarded.trace.ascent_se.values[0]
    assert _exact(guarded.model, y) > _exact(m, y) + 10


def test_rotation_restart_draws_a_rotation_times_the_gain(float64):
    m = ElmanSSM(4, 1, seed=2)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.rotation_restart(torch.Generator().manual_seed(0))
    ev = torch.linalg.eigvals(m.W.detach())
    np.testing.assert_allclose(ev.abs().numpy(), 1.1, rtol=1e-10)
    assert float(ev.angle().abs().max()) < 1.5  # slow modes: a rotation close to the identity
    for k, v in m.state_dict().items():
        if not k.startswith("W"):
            assert torch.equal(v, before[k]), k


def test_rotation_restarts_run_and_need_the_capability(float64):
    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1)
    y = true.simulate(60, 1, seed=0).observations
    m = ElmanSSM(2, 1, seed=5)
    fit = pr.fit(m, y, method=MonteCarloEM(smoother=ParticleSmoother(64, 8), num_iterations=1,
                                           stopping=ConvergenceRule(tol=0),
                                           start=MultiStart(num_starts=3, iterations=2, kind="rotation")), seed=0)
    scores = fit.diagnostics["restart_log_evidence"]
    assert len(scores) == 3 and fit.diagnostics["restart_chosen"] == int(np.argmax(scores))
    # the full run continues the chosen candidate's fit (row 0 = its parameters), not another candidate's
    models = fit.diagnostics["restart_models"]
    chosen = models[fit.diagnostics["restart_chosen"]]
    for name in ("W", "b", "C", "q"):
        np.testing.assert_allclose(fit.trace[name].values[0], getattr(chosen, name).detach().numpy(), rtol=1e-12,
                                   err_msg=name)
    assert all(not np.allclose(models[i].W.detach().numpy(), chosen.W.detach().numpy())
               for i in range(3) if models[i] is not chosen)
    with pytest.raises(ModelCapabilityError, match="rotation_restart"):
        pr.fit(LinearGaussianSSM(2, 1, seed=0), y, method=MonteCarloEM(
            num_iterations=1, start=MultiStart(num_starts=2, iterations=1, kind="rotation")), seed=0)
    with pytest.raises(ConfigurationError, match="kind"):
        MultiStart(kind="gaussian")
    with pytest.raises(ConfigurationError, match="ascent_z"):
        Acceptance(ascent_z=-1.0)
