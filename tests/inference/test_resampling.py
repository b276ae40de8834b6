"""Resamplers: unbiased offspring counts, independence over sequences, float edge cases."""

import math

import pytest
import torch
from ppl_rnn.inference import resampling
from ppl_rnn.inference.resampling import RESAMPLERS, effective_sample_size, get_resampler

from ppl_rnn.errors import ConfigurationError

SCHEMES = sorted(RESAMPLERS)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num", [7, 13])
def test_offspring_counts_unbiased(scheme, num):
    """E[#offspring of i] = num * W_i, per sequence; replicates are independent columns (sequences)."""
    g = torch.Generator().manual_seed(1)
    N, S, R = 7, 3, 4000  # particles, distinct weight vectors, replicates
    lw = torch.randn(N, S, generator=g, dtype=torch.float64) * 1.5
    lw[2, 1] = -math.inf  # a zero weight
    W = torch.softmax(lw, 0)
    big = lw.repeat(1, R)  # (N, S*R): column s + S*r is replicate r of vector s
    idx = RESAMPLERS[scheme](big, num, torch.Generator().manual_seed(2))
    assert idx.shape == (num, S * R) and idx.dtype == torch.int64
    counts = torch.zeros(N, S * R, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    counts = counts.reshape(N, R, S)
    mean, sd = counts.mean(1), counts.std(1)
    se = sd / math.sqrt(R)
    expected = num * W
    assert torch.all((mean - expected).abs() <= 5 * se + 1e-9), (scheme, mean, expected)
    assert torch.all(counts[2, :, 1] == 0)  # zero weight: never chosen
    assert torch.all(counts.sum(0) == num)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_low_variance_schemes_keep_counts_within_one(scheme):
    """Systematic, stratified (per stratum) and residual counts stay near num * W; multinomial does not."""
    N = 50
    lw = torch.randn(N, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    idx = RESAMPLERS[scheme](lw, N, torch.Generator().manual_seed(4))
    counts = torch.zeros(N, 200, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    dev = (counts - N * torch.softmax(lw, 0)).abs().max()
    if scheme in ("systematic", "residual"):
        if scheme == "systematic":
            assert dev < 1.0 + 1e-9
        else:  # residual: the floors of N*W are kept exactly, the rest is multinomial on the residual weights
            NW = N * torch.softmax(lw, 0)
            fl = torch.floor(NW)
            assert torch.all(counts >= fl)
            resid = NW - fl
            R = resid.sum(0, keepdim=True)  # residual draws per sequence
            var = resid * (1 - resid / R)  # multinomial variance of the excess counts, R p (1 - p)
            z = (counts - NW).sum(1) / var.sum(1).sqrt()  # per particle, over the 200 sequences
            assert float(z.abs().max()) < 5, float(z.abs().max())
            assert bool(((counts - fl) <= R).all())
    elif scheme == "multinomial":
        assert dev > 1.0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("pos", [0, 4, 9])
def test_single_nonzero_weight(scheme, pos):
    lw = torch.full((10, 2), -math.inf)
    lw[pos, 0] = 0.0
    lw[9 - pos, 1] = 3.0  # unnormalised
    idx = RESAMPLERS[scheme](lw, 10)
    assert torch.all(idx[:, 0] == pos) and torch.all(idx[:, 1] == 9 - pos)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_cumsum_short_of_one(scheme):
    """float32 weights whose cumulative sum ends below 1; trailing zero weights are never chosen and every
    index is valid."""
    g = torch.Generator().manual_seed(5)
    N = 100_003
    w = torch.rand(N, generator=g, dtype=torch.float32)
    w[-1000:] = 0.0
    w = w / w.sum() * (1 - 1e-4)  # "normalised" float32 weights whose cumulative sum falls short of 1
    assert float(torch.cumsum(w, 0)[-1]) < 1.0
    lw = torch.log(w).unsqueeze(1).repeat(1, 4)
    idx = RESAMPLERS[scheme](lw, N, torch.Generator().manual_seed(6))
    assert idx.min() >= 0 and idx.max() < N - 1000


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "multinomial", "residual"])
def test_points_rounding_to_one_never_pick_zero_weight(scheme, monkeypatch):
    """With the largest float32 uniform, (num-1+V)/num rounds to 1.0; the last positive particle is chosen,
    not the zero-weight particle after it."""
    top = torch.nextafter(torch.ones(()), torch.zeros(())).item()
    monkeypatch.setattr(resampling, "_uniform", lambda shape, like, gen: torch.full(shape, top, dtype=like.dtype))
    lw = torch.zeros(6, 1, dtype=torch.float32)
    lw[4:] = -math.inf
    idx = RESAMPLERS[scheme](lw, 3)
    assert idx.max() <= 3


def test_sequences_independent():
    """Sequence 0's draws do not depend on sequence 1's weights (same generator state)."""
    lw = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    lw2 = lw.clone()
    lw2[:, 1] = torch.randn(20, dtype=torch.float64)
    for name, fn in RESAMPLERS.items():
        a = fn(lw, 20, torch.Generator().manual_seed(8))
        b = fn(lw2, 20, torch.Generator().manual_seed(8))
        assert torch.equal(a[:, 0], b[:, 0]), name


def test_get_resampler_and_ess():
    assert get_resampler("systematic") is RESAMPLERS["systematic"]
    with pytest.raises(ConfigurationError, match="resampling must be one of"):
        get_resampler("bogus")
    lw = torch.log(torch.tensor([[0.5, 1.0], [0.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(effective_sample_size(lw), torch.tensor([2.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("trailing", [(), (4,)])
def test_take_selects_rows_per_sequence(B, trailing):
    """take(x, idx)[p, b] == x[idx[p, b], b] for one sequence (its own index_select route) and several, with
    and without a trailing particle dimension, and with more or fewer indices than particles."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((7, B) + trailing, generator=g)
    for P in (5, 7, 9):
        idx = torch.randint(0, 7, (P, B), generator=g)
        expected = torch.stack([torch.stack([x[idx[p, b], b] for b in range(B)]) for p in range(P)])
        assert torch.equal(resampling.take(x, idx), expected)
        assert torch.equal(resampling.take(x, idx, torch.arange(B)), expected)
