"""NaN = missing: a NaN entry behaves exactly as if its observation site were removed from the model.

Checked at three levels: the emission log-density (``masked_log_prob`` = the marginal density of the
observed entries), the Pyro program (trace log-density given the same h), and the exact evidence
(Kalman on data with NaN = the brute-force joint Gaussian with the missing rows dropped), for both
``Independent(Normal)`` (ElmanSSM) and ``MultivariateNormal`` (LinearGaussianSSM) emissions, with one
entry of a 2-d observation missing and with whole steps missing.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from ppl_rnn.inference import KalmanFilter, KalmanSmoother
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.masking import PartiallyObserved, masked_log_prob
from tests.inference.test_kalman import _brute, _lg_model, _params


def _random_mask(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < 0.6


def test_independent_normal_is_sum_over_observed(float64):
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    y = torch.randn(5, 3)
    mask = _random_mask((5, 3), 0)
    mask[0] = False
    mask[1] = True
    lp = masked_log_prob(dist.Normal(loc, scale).to_event(1), y, mask)
    for i in range(5):
        o = mask[i]
        ref = dist.Normal(loc[i, o], scale[i, o]).log_prob(y[i, o]).sum()
        assert torch.allclose(lp[i], ref, atol=1e-12)
    assert lp[0] == 0.0
    # the value at a missing entry is irrelevant
    y2 = y.clone()
    y2[~mask] = 1e3
    assert torch.allclose(masked_log_prob(dist.Normal(loc, scale).to_event(1), y2, mask), lp, atol=1e-12)


def test_multivariate_normal_is_marginal_of_observed(float64):
    torch.manual_seed(1)
    B, D = 6, 3
    L = torch.tril(torch.randn(B, D, D)) + 2 * torch.eye(D)
    cov = L @ L.transpose(-1, -2)
    loc, y = torch.randn(B, D), torch.randn(B, D)
    mask = _random_mask((B, D), 1)
    mask[0] = False
    mask[1] = True
    mask[2] = torch.tensor([True, False, True])
    d = dist.MultivariateNormal(loc, cov)
    lp = masked_log_prob(d, y, mask)
    for i in range(B):
        o = mask[i]
        if not bool(o.any()):
            assert lp[i] == 0.0
            continue
        ref = dist.MultivariateNormal(loc[i, o], cov[i][o][:, o]).log_prob(y[i, o])
        assert torch.allclose(lp[i], ref, atol=1e-10)
    assert torch.allclose(masked_log_prob(d, y, None), d.log_prob(y))


def test_other_emissions_allow_only_whole_step_missingness(float64):
    torch.manual_seed(2)
    d = dist.LowRankMultivariateNormal(torch.zeros(2, 2), torch.ones(2, 2, 1), torch.ones(2, 2))
    y = torch.randn(2, 2)
    whole = torch.tensor([[True, True], [False, False]])
    lp = masked_log_prob(d, y, whole)
    assert torch.allclose(lp, torch.stack([d.log_prob(y)[0], torch.zeros(())]))
    with pytest.raises(ModelCapabilityError, match="partially missing"):
        masked_log_prob(d, y, torch.tensor([[True, False], [True, True]]))


def test_partially_observed_site(float64):
    torch.manual_seed(3)
    base = dist.Normal(torch.zeros(4, 2), torch.ones(4, 2)).to_event(1)
    mask = torch.tensor([[True, False]]).expand(4, 2)
    po = PartiallyObserved(base, mask)
    assert po.batch_shape == (4,) and po.event_shape == (2,)
    y = torch.randn(4, 2)
    assert torch.allclose(po.log_prob(y), dist.Normal(0.0, 1.0).log_prob(y[:, 0]))
    assert po.sample().shape == (4, 2)
    assert po.expand((3, 4)).log_prob(y).shape == (3, 4)


# ---------------------------------------------------------------------------------------------
# the Pyro program, given the same hidden trajectory


def test_program_nan_entry_equals_site_removed_elman(float64):
    """Independent(Normal): a NaN entry subtracts exactly that entry's Normal log-density; a NaN step
    removes the y_t site."""
    model = ElmanSSM(3, 2, process_noise=0.3, obs_noise=0.5, weight_scale=1.5, seed=0)
    y = model.simulate(6, 2, seed=0).observations
    full = poutine.trace(model).get_trace(y)
    h = torch.stack([full.nodes[f"h_{t}"]["value"] for t in range(6)], 1)
    y_nan = y.clone()
    y_nan[0, 2, 1] = float("nan")  # partial
    y_nan[:, 4] = float("nan")  # whole step, every sequence
    tr = poutine.trace(poutine.replay(model, trace=full)).get_trace(y_nan)
    assert "y_4" not in tr.nodes and "y_2" in tr.nodes
    entry = dist.Normal(h[0, 2] @ model.C.T + model.d, model.r).log_prob(y[0, 2])[1]
    y4 = full.nodes["y_4"]["fn"].log_prob(y[:, 4]).sum()
    assert torch.allclose(tr.log_prob_sum(), full.log_prob_sum() - entry - y4, atol=1e-10)


def test_program_nan_entry_is_marginal_mvn(float64):
    model = _lg_model(H=2, D=2, seed=1)
    y = model.simulate(4, 2, seed=0).observations
    y_nan = y.clone()
    y_nan[1, 1, 0] = float("nan")
    tr = poutine.trace(model).get_trace(y_nan)
    tr.compute_log_prob()
    h1 = tr.nodes["h_1"]["value"]
    em = model.emission(1, h1, None)
    ref0 = em.log_prob(y[:, 1])[0]
    ref1 = dist.Normal(em.loc[1, 1], em.covariance_matrix[1, 1, 1].sqrt()).log_prob(y[1, 1, 1])
    assert torch.allclose(tr.nodes["y_1"]["log_prob"], torch.stack([ref0, ref1]), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# the exact evidence


def _elman_identity():
    m = ElmanSSM(2, 2, activation="identity", process_noise=[0.3, 0.5], obs_noise=[0.4, 0.2], seed=3).double()
    m.d = torch.tensor([0.5, -1.0], dtype=torch.float64)
    return m


@pytest.mark.parametrize("which", ["independent", "mvn"])
@pytest.mark.parametrize("pattern", ["partial", "whole_step", "first_and_last"])
def test_evidence_with_nan_equals_site_removed(which, pattern):
    model = _elman_identity() if which == "independent" else _lg_model(H=2, D=2, seed=7)
    T = 5
    y = model.simulate(T, 1, seed=2).observations[0]
    y_nan = y.clone()
    if pattern == "partial":
        y_nan[2, 1] = float("nan")
    elif pattern == "whole_step":
        y_nan[3] = float("nan")
    else:
        y_nan[0] = float("nan")
        y_nan[T - 1, 0] = float("nan")
    mask = ~torch.isnan(y_nan)
    p = _params(model)
    ref, ref_mean, _ = _brute(p, y, mask)  # the joint Gaussian with the missing rows dropped
    post = pr.infer(model, y_nan, method=KalmanSmoother())
    assert torch.allclose(post.log_evidence[0], ref, atol=1e-8, rtol=0)
    assert torch.allclose(post.mean[0], ref_mean, atol=1e-8, rtol=0)
    full, _, _ = _brute(p, y, torch.ones_like(mask))
    assert not torch.allclose(full, ref)  # the NaN mattered
    if pattern == "whole_step":
        # a whole missing step contributes nothing to the evidence (no y_3 site)
        f = pr.infer(model, y_nan, method=KalmanFilter())
        assert f.diagnostics["log_lik"][0, 3] == 0.0


def test_caller_tensor_not_mutated():
    model = _elman_identity()
    y = model.simulate(6, 2, seed=0).observations
    y[0, 1, 0] = float("nan")
    y[1, 3] = float("nan")
    before = y.clone()
    pr.infer(model, y, method=KalmanSmoother())
    pr.infer(model, y.numpy(), method=KalmanFilter())
    poutine.trace(model).get_trace(y)
    assert torch.isnan(y[0, 1, 0]) and torch.isnan(y[1, 3]).all()
    assert torch.equal(torch.nan_to_num(y, nan=-7.0), torch.nan_to_num(before, nan=-7.0))
