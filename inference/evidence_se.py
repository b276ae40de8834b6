r"""The Monte Carlo standard error of a particle filter's log-evidence from its own genealogy.

**Lee & Whiteley (2018)**, "Variance estimation in the particle filter" (Biometrika 105): for a particle
filter whose particles at generation :math:`n` (after :math:`n` multinomial resamplings) carry normalised
weights :math:`W^i` and *Eve indices* :math:`E^i` (the index of their ancestor in generation 0), the relative
variance of the unbiased evidence estimate :math:`\hat Z` is estimated by

.. math:: \widehat{\mathrm{Var}}(\hat Z)/\hat Z^2 \;=\; 1-\Big(\frac{N}{N-1}\Big)^{n+1}
          \sum_{i,j:\,E^i\ne E^j} W^iW^j \;=\; 1-\Big(\frac{N}{N-1}\Big)^{n+1}\Big(1-\sum_k S_k^2\Big),
          \qquad S_k=\sum_{i:E^i=k}W^i,

(with :math:`n = 0`, independent importance sampling, it is the familiar :math:`(N\sum_i W_i^2-1)/(N-1)`),
and :math:`\mathrm{Var}(\log\hat Z)\approx\log(1+\widehat{\mathrm{Var}}(\hat Z)/\hat Z^2)` (delta method; the
logarithm keeps it finite when the estimate is large). It costs nothing beyond the ancestors the smoother
keeps anyway (``ParticleFilterRecord.ancestors``, ``keep_history=True``). With adaptive resampling the
generations are the stretches between resampling events (the weights accumulate inside a stretch).

**Blocks.** Over a long series the genealogy coalesces: after about :math:`N` generations every particle
has the same Eve and the estimator degenerates (Olsson & Douc 2019 replace the Eve by a lagged ancestor for
the same reason). We therefore apply the estimator to consecutive **blocks** of at most ``block``
resampling events, each begun at a resampling (its particles are conditionally independent draws, the
estimator's generation 0), with Eve indices taken at the block's start and weights at its end: it estimates
the conditional relative variance of that block's evidence increment :math:`\hat Z_{s:e}` given the past,
and the block terms add,

.. math:: \widehat{\mathrm{Var}}(\log\hat Z)=\sum_b \log\!\big(1+\max(\hat V_b, 0)\big).

The sum leaves out how a block's sampling error moves the *following* blocks' increments (the filter's
forgetting bounds that to a few steps past each boundary), and systematic resampling (the filters' default)
is less variable than the multinomial scheme the formula assumes. Each block's estimate is at most 1 (as
for importance sampling, a sample cannot show the tail it lacks), so where the filter is degenerate (a
poorly fitting model) the sum runs low; short blocks limit that cap, long ones keep more of the propagation
and the lineages coalesce within about :math:`N` generations, hence the default of :math:`N/100`
resampling events per block. The test ``tests/inference/test_evidence_se.py`` measures it against the spread
of independent filters over seeds.
"""

from __future__ import annotations

import math

import torch

from ppl_rnn.errors import ConfigurationError


def _block_term(origin: torch.Tensor, log_w: torch.Tensor, gens: torch.Tensor, N: int) -> torch.Tensor:
    r"""``(B,)`` :math:`\log(1+\max(\hat V,0))` of one block: ``origin`` ``(N,B)`` the particles' indices at the
    block's start, ``log_w`` ``(N,B)`` their normalised log-weights at its end, ``gens`` ``(B,)`` generations."""
    W = torch.softmax(log_w.to(torch.float64), 0)
    S = torch.zeros_like(W).scatter_add_(0, origin, W)
    pairs = (1.0 - (S * S).sum(0)).clamp_min(0.0)
    v = 1.0 - torch.exp(gens.to(torch.float64) * math.log(N / (N - 1))) * pairs
    return torch.log1p(v.clamp_min(0.0))


def genealogy_log_evidence_var(record, block: int | None = None) -> torch.Tensor:
    r"""``(B,)`` estimated :math:`\mathrm{Var}(\log\hat Z)` of a particle filter run (module docstring).

    Args:
        record: a :class:`~ppl_rnn.inference.smc.ParticleFilterRecord` with history (``ancestors``,
            ``log_weights``: the filter run with ``keep_history=True``, as a particle smoother does).
        block: resampling events per block (``None``: :math:`\max(1, \lfloor N/100\rfloor)`; module docstring,
            "Blocks").
    """
    anc, lw, flags = record.ancestors, record.log_weights, record.resampled
    if anc is None or lw is None:
        raise ConfigurationError(
            "record: genealogy_log_evidence_var needs the filter's history (ancestors and log-weights); found a "
            "record without it. Run the filter with keep_history=True (a ParticleSmoother does).")
    T, N, B = lw.shape
    if N < 2:
        return torch.zeros(B, dtype=torch.float64)
    K = max(1, N // 100) if block is None else int(block)
    if K < 1:
        raise ConfigurationError(f"block must be a positive int (resampling events per block); found {block!r}.")
    ident = torch.arange(N, device=lw.device).unsqueeze(1).expand(N, B)
    origin = ident.clone()
    count = torch.zeros(B, dtype=torch.long, device=lw.device)  # resampling events since the block's start
    total = torch.zeros(B, dtype=torch.float64, device=lw.device)
    flags = flags.to(lw.device)
    if B == 1:  # one sequence: the block bookkeeping in Python ints (no per-step tensor reductions)
        n = 0
        for t in [t for t, f in enumerate(flags[0].tolist()) if f and t > 0]:
            if n >= K:  # this resampling would overfill the block: close it, start a new one here
                total = total + _block_term(origin, lw[t - 1], count + n + 1, N)
                origin, n = ident, 0
            else:
                origin = origin.gather(0, anc[t])
                n += 1
        return total + _block_term(origin, lw[T - 1], count + n + 1, N)
    for t in range(1, T):
        f = flags[:, t]
        if not bool(f.any()):
            continue  # identity ancestors: origins and counts unchanged
        close = f & (count >= K)  # a resampling that would overfill the block starts a new one
        if bool(close.any()):
            term = _block_term(origin, lw[t - 1], count + 1, N)
            total = total + torch.where(close, term, torch.zeros_like(term))
            origin = torch.where(close, ident, origin.gather(0, anc[t]))
            count = torch.where(close, torch.zeros_like(count), count + f.long())
        else:
            origin = origin.gather(0, anc[t])
            count = count + f.long()
    return total + _block_term(origin, lw[T - 1], count + 1, N)


def genealogy_log_evidence_se(record, block: int | None = None) -> torch.Tensor:
    r"""``(B,)`` standard error of each sequence's :math:`\log\hat Z` (:func:`genealogy_log_evidence_var`)."""
    return genealogy_log_evidence_var(record, block).sqrt()


__all__ = ["genealogy_log_evidence_var", "genealogy_log_evidence_se"]
