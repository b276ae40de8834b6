"""The genealogy standard error of a particle filter's log-evidence (inference/evidence_se.py).

Oracles: the closed form of independent importance sampling (no resampling: the estimator is
``(N sum W^2 - 1) / (N - 1)``), and the empirical spread of ``log Z-hat`` over 300 independent filters (one
batched run on 300 copies of the series, fixed seed): the root-mean-square of the per-filter estimates must
lie within the stated band of that standard deviation (whose own relative SE is 1/sqrt(2 * 299) = 4 %).
Measured (ElmanSSM(2) tanh, T = 200, N = 100, the default block): bootstrap / adapted proposal 0.87 / 0.76 of
the empirical SD with multinomial resampling, 0.77 / 0.66 with the default systematic resampling, which the
formula does not model (it runs low, as the four extra filters it replaces were measured to: 20-40 %). The
bands below are those ratios with about 3 SE of room on each side (the SD's 4 % and the estimate's own
spread), not more, so a broken genealogy (no Eve indices, no block sum, no generation factor) fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from ppl_rnn.inference import ParticleSmoother
from ppl_rnn.inference.evidence_se import genealogy_log_evidence_se, genealogy_log_evidence_var
from ppl_rnn.models import ElmanSSM

from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError


def _record(model, y, N, R, **opts):
    data = prepare(model, y.repeat(R, 1, 1))
    post = ParticleSmoother(num_particles=N, num_paths=1, **opts).infer_prepared(model, data, 0)
    return post.log_evidence, post.diagnostics["record"]


@pytest.mark.parametrize("proposal,resampling,band", [
    ("bootstrap", "multinomial", (0.75, 1.0)),
    ("auto", "multinomial", (0.65, 0.9)),
    ("bootstrap", "systematic", (0.65, 0.9)),
    ("auto", "systematic", (0.55, 0.8)),
])
def test_genealogy_se_matches_the_spread_over_independent_filters(float64, proposal, resampling, band):
    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1)
    y = true.simulate(200, 1, seed=0).observations
    le, rec = _record(true, y, 100, 300, proposal=proposal, resampling=resampling)
    assert bool(rec.resampled.any())  # a filter with resampling, so the genealogy matters
    sd = float(le.std())
    rms = float(genealogy_log_evidence_var(rec).mean().sqrt())
    assert band[0] * sd <= rms <= band[1] * sd, (rms, sd)


def test_without_resampling_it_is_the_importance_sampling_variance(float64):
    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.3, seed=1)
    y = true.simulate(1, 1, seed=0).observations
    _, rec = _record(true, y, 50, 3, proposal="bootstrap")
    W = torch.softmax(rec.log_weights[0].double(), 0)
    N = W.shape[0]
    v = (N * (W * W).sum(0) - 1) / (N - 1)
    torch.testing.assert_close(genealogy_log_evidence_var(rec), torch.log1p(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(genealogy_log_evidence_se(rec) ** 2, torch.log1p(v), rtol=1e-10, atol=1e-12)


def test_needs_the_history_and_a_positive_block(float64):
    class NoHistory:
        ancestors = log_weights = None
        resampled = None

    with pytest.raises(ConfigurationError, match="keep_history"):
        genealogy_log_evidence_var(NoHistory())
    true = ElmanSSM(2, 1, seed=1)
    _, rec = _record(true, true.simulate(5, 1, seed=0).observations, 10, 1)
    with pytest.raises(ConfigurationError, match="block"):
        genealogy_log_evidence_var(rec, block=0)
    assert math.isfinite(float(genealogy_log_evidence_var(rec, block=3)))


@pytest.mark.parametrize("block", [None, 1, 3])
def test_one_sequence_equals_its_row_of_a_batched_run(float64, block):
    """A single sequence takes its own bookkeeping path (Python counters): it must give that
    sequence's entry of the batched computation (where the sequences' blocks close at different steps), to
    rounding (the batched reductions sum in another order)."""
    import dataclasses

    true = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.1, weight_scale=1.5, seed=1)
    y = true.simulate(200, 3, seed=0).observations
    _, rec = _record(true, y, 100, 1, proposal="bootstrap")
    batched = genealogy_log_evidence_var(rec, block)
    assert bool((rec.resampled.sum(1) != rec.resampled.sum(1)[0]).any())  # different resampling counts
    for b in range(3):
        one = dataclasses.replace(rec, ancestors=rec.ancestors[:, :, b:b + 1], log_weights=rec.log_weights[:, :, b:b + 1],
                                  resampled=rec.resampled[b:b + 1])
        torch.testing.assert_close(genealogy_log_evidence_var(one, block)[0], batched[b], rtol=1e-13, atol=0.0)
