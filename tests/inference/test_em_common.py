"""The one EM loop (inference/em_common.py): its convergence rule and its rejection of Monte Carlo steps.

* the rule does not stop a run that is still improving — noisy (Monte Carlo EM: SE 1 nat per estimate) or
  exact (KalmanEM-like, SE 0) — and does stop one that has levelled off (so it is not "never stop");
* ``EMLoop`` rejects a step whose estimate falls by more than ``reject_se`` standard errors: trace row
  marked, parameters restored, ``on_reject`` called, the same parameters evaluated again; a run that cannot
  raise its particles stops at the last accepted parameters;
* every trainer uses the loop (no private copies): their results carry the loop's diagnostics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppl_rnn.inference.em_common import ConvergenceRule, EMLoop, EMStep
from ppl_rnn.models import ElmanSSM

from ppl_rnn.errors import ConfigurationError


def _first_stop(rule, values, ses, n_obs):
    for k in range(1, len(values) + 1):
        if rule.converged(values[:k], ses[:k], n_obs):
            return k - 1
    return None


def test_rule_does_not_stop_a_noisy_run_that_is_still_improving():
    """MCEM-like: n_obs = 1000, rise 0.05 nats per iteration (5x the default tol's 0.01), estimates with
    SE 1 nat. Over 200 seeded runs of 100 iterations the default rule never stops early; the rule of the
    old MCEM (window means, 1e-4 per observed entry, no SE) stopped most of them."""
    rng = np.random.default_rng(0)
    rule = ConvergenceRule(1e-5, window=5, z=2.0)
    n_obs, K = 1000, 100
    old_stops = 0
    for _ in range(200):
        vals = -500.0 + 0.05 * np.arange(K) + rng.normal(0.0, 1.0, K)
        ses = np.ones(K)
        assert _first_stop(rule, list(vals), list(ses), n_obs) is None
        w = 3
        old = [k for k in range(2 * w, K + 1) if (vals[k - w:k].mean() - vals[k - 2 * w:k - w].mean()) / n_obs < 1e-4]
        old_stops += bool(old)
    assert old_stops > 150


def test_rule_stops_a_run_that_has_levelled_off():
    rule = ConvergenceRule(1e-5, window=5, z=2.0)
    vals = list(-500.0 + 20 * (1 - np.exp(-np.arange(200) / 5.0)))
    k = _first_stop(rule, vals, [0.001] * 200, 1000)
    assert k is not None and 25 < k < 60  # the rise per iteration is 4 exp(-k/5): 0.01 at k = 30
    # with noise: the bound shrinks only with the SE, so SE 1 nat never lets it stop at tol 1e-5...
    assert _first_stop(rule, vals, [1.0] * 200, 1000) is None
    # ...but a looser tolerance does, after the rise is over
    k = _first_stop(ConvergenceRule(1e-3, window=5), vals, [1.0] * 200, 1000)
    assert k is not None and 4 * np.exp(-k / 5) < 1.0  # stopped once the rise was below 1 nat per iteration


def test_rule_exact_relative_tolerance():
    """SE 0, window 1: stop at the first change per iteration at most tol * max(|l|, n_obs)."""
    rule = ConvergenceRule(1e-6)
    vals = [-1000.0 + 10.0 * (1 - 0.5**k) for k in range(40)]  # changes 5 * 0.5^(k-1)
    k = _first_stop(rule, vals, [0.0] * 40, 100)
    # first k with 10 * 0.5^k <= 1e-6 * |l| (about 9.9e-4): k = 14
    assert k == 14
    # a still-rising exact run (1 nat per iteration) never stops; tol = 0 never stops
    assert _first_stop(rule, [float(k) for k in range(100)], [0.0] * 100, 100) is None
    assert _first_stop(ConvergenceRule(0.0), [1.0] * 10, [0.0] * 10, 100) is None
    # a falling objective has not converged either
    assert _first_stop(rule, [-float(k) for k in range(100)], [0.0] * 100, 100) is None
    with pytest.raises(ConfigurationError):
        ConvergenceRule(-1.0)


def _toy(values, ses, *, reject_se=3.0, max_boosts=3, num_iterations=None, strict=False):
    """An EMLoop run on ElmanSSM(1) whose update adds 1 to d and whose evaluate returns scripted values."""
    model = ElmanSSM(1, 1, seed=0)
    calls = {"eval": [], "reject": 0}

    def evaluate(k):
        i = len(calls["eval"])
        calls["eval"].append(float(model.d.detach()[0]))
        return EMStep(value=values[i], se=ses[i], scalars={"log_evidence": values[i]}, strict=strict)

    def update(k, step):
        model.d = model.d.detach() + 1.0

    def on_reject(k):
        calls["reject"] += 1
        return calls["reject"] <= max_boosts

    loop = EMLoop(method="toy", evidence_kind="estimate", num_iterations=num_iterations or len(values) - 1,
                  rule=ConvergenceRule(0.0), n_obs=10, reject_se=reject_se)
    res = loop.run(model, evaluate=evaluate, update=update, seed=0, on_reject=on_reject)
    return res, calls


def test_loop_rejects_a_step_that_falls_by_more_than_reject_se():
    # theta_0: 0 +- 1; theta_1: 10 +- 1 (accepted); theta_2: 0 +- 1 (falls 10 > 3 * sqrt(2): rejected);
    # theta_1 again: 9.5 (kept whatever its value); theta_2': 9 (falls 0.5: accepted)
    res, calls = _toy([0.0, 10.0, 0.0, 9.5, 9.0], [1.0] * 5, num_iterations=3)
    tr = res.trace
    np.testing.assert_array_equal(tr.rejected.values, [0, 0, 1, 0, 0, 0][: tr.sizes["iteration"]])
    assert calls["reject"] == 1
    # the parameters went back to theta_1 (d = 1) before the re-evaluation
    assert calls["eval"] == [0.0, 1.0, 2.0, 1.0, 2.0]
    np.testing.assert_allclose(tr.d.values[:, 0], [0.0, 1.0, 2.0, 1.0, 2.0])
    np.testing.assert_allclose(tr.log_evidence_se.values, 1.0)
    # a fall within the noise is kept
    res, calls = _toy([0.0, 10.0, 6.0], [1.0] * 3)
    assert calls["reject"] == 0 and float(res.model.d.detach()[0]) == 2.0


def test_exact_values_are_rejected_only_when_strict_and_falling():
    """SE 0: a fall is kept unless the step is ``strict`` (the over-relaxation guard with an exact E-step);
    a strict step is refused by any fall beyond rounding (1e-9 relative), whatever ``reject_se`` is."""
    vals = [0.0, 10.0, 10.0 - 1e-3, 10.0, 10.0 - 1e-12]
    res, calls = _toy(vals, [0.0] * 5, num_iterations=3)
    assert calls["reject"] == 0 and "stopped" not in res.diagnostics  # not strict: never rejected
    res, calls = _toy(vals, [0.0] * 5, num_iterations=3, strict=True)
    # theta_2 falls by 1e-3: rejected; theta_1 again (10.0) kept; theta_2' falls by 1e-12 (rounding): kept
    np.testing.assert_array_equal(res.trace.rejected.values, [0, 0, 1, 0, 0])
    assert calls["reject"] == 1 and calls["eval"] == [0.0, 1.0, 2.0, 1.0, 2.0]
    res, calls = _toy([0.0, 10.0, 9.0, 10.0, 10.5], [0.0] * 5, num_iterations=3, strict=True, reject_se=100.0)
    assert calls["reject"] == 1  # no standard-error slack for an exact value


def test_loop_stops_at_last_accepted_parameters_when_it_cannot_raise_particles():
    res, calls = _toy([0.0, 10.0, 0.0, 10.0, 0.0], [1.0] * 5, max_boosts=1, num_iterations=5)
    assert res.diagnostics["stopped"] == "rejected" and not res.converged
    assert calls["reject"] == 2
    assert float(res.model.d.detach()[0]) == 1.0  # theta_1, the last accepted


def test_every_trainer_uses_the_loop():
    """The five trainers report through EMLoop (its diagnostics) and keep no private loop."""
    import inspect

    from ppl_rnn.inference import bptt, ekf_em, kalman_em, mcem, meanfield_em

    for mod in (bptt, ekf_em, kalman_em, mcem, meanfield_em):
        src = inspect.getsource(mod)
        assert "EMLoop(" in src and "TraceRecorder(" not in src and "tqdm(" not in src, mod.__name__
    y = torch.sin(torch.arange(30.0) / 3).unsqueeze(-1)
    from ppl_rnn.inference import BPTT, EKFEM, KalmanEM, MeanFieldEM

    import ppl_rnn as pr

    for method in (KalmanEM(num_iterations=2, tol=0), MeanFieldEM(num_iterations=2, tol=0),
                   EKFEM(num_iterations=2, mstep_steps=2, num_samples=2), BPTT(num_steps=2)):
        m = ElmanSSM(2, 1, activation="identity" if isinstance(method, KalmanEM) else "tanh", seed=0)
        r = pr.fit(m, y, method=method, seed=0)
        assert r.diagnostics["num_iterations"] == 2 and r.trace.sizes["iteration"] == 3, method
