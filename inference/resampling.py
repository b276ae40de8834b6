r"""Resampling schemes for sequential Monte Carlo, vectorised over independent sequences.

Every resampler has one signature (BlackJAX style)::

    resampler(log_weights: Tensor (N, B), num: int, generator: torch.Generator | None = None) -> Tensor (num, B)

``log_weights[:, b]`` are the (unnormalised) log-weights of the ``N`` particles of sequence ``b``; the
result holds, for each sequence independently, ``num`` ancestor indices in ``[0, N)`` (int64). Each scheme
is *unbiased*: the expected number of offspring of particle :math:`i` is :math:`num \cdot W^i` with
:math:`W^i = e^{\ell^i} / \sum_j e^{\ell^j}`.

With :math:`C^i = \sum_{j\le i} W^j` the normalised cumulative weights and points :math:`U_k\in[0,1)`,
particle :math:`i` is chosen for point :math:`k` iff :math:`C^{i-1} \le U_k < C^i` (``searchsorted`` with
``right=True``, so particles of weight 0 are never chosen):

* ``multinomial``: :math:`U_k` i.i.d. uniform.
* ``stratified``: :math:`U_k = (k + V_k)/num`, :math:`V_k` i.i.d. uniform (one per stratum).
* ``systematic``: :math:`U_k = (k + V)/num` with one uniform :math:`V` per sequence (lowest variance in
  practice, the default).
* ``residual``: :math:`\lfloor num W^i\rfloor` deterministic copies of each particle, the remaining
  :math:`R = num - \sum_i \lfloor num W^i\rfloor` drawn multinomially from the residual weights
  :math:`num W^i - \lfloor num W^i\rfloor`.

Float robustness: the cumulative sum is divided by its own last entry, so it ends at exactly 1 even when a
float32 sum of normalised weights falls short of 1; points are kept strictly below 1 (``(k+V)/num`` can
round up to 1.0 in float32) and indices are clamped to ``N-1``, so a particle of weight 0 is never chosen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ppl_rnn.errors import ConfigurationError

Resampler = Callable[..., torch.Tensor]


def _normalised_cumsum(log_weights: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` cumulative normalised weights ending at exactly 1."""
    if log_weights.dim() != 2:
        raise ConfigurationError(
            f"log_weights must have shape (num_particles, num_sequences); found {tuple(log_weights.shape)}."
        )
    c = torch.cumsum(torch.softmax(log_weights, dim=0), dim=0).T.contiguous()  # (B, N)
    return c.div_(c[:, -1:].clone())


_BELOW_ONE: dict = {}


def _below_one(points: torch.Tensor) -> torch.Tensor:
    """Points strictly below 1: ``(k + V)/num`` can round up to 1.0 in float32."""
    top = _BELOW_ONE.get(points.dtype)
    if top is None:
        one = torch.ones((), dtype=points.dtype)
        top = _BELOW_ONE[points.dtype] = torch.nextafter(one, torch.zeros_like(one)).item()
    return points.clamp_(max=top)


def _invert(cdf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Indices ``(num, B)`` of the particles that points ``(B, num)`` fall into."""
    n = cdf.shape[1]
    idx = torch.searchsorted(cdf, _below_one(points), right=True)
    return idx.clamp_(max=n - 1).T


def _uniform(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)


def multinomial(log_weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multinomial resampling: ``num`` i.i.d. draws from the weights, per sequence. ``(num, B)``."""
    cdf = _normalised_cumsum(log_weights)
    u = _uniform((cdf.shape[0], num), cdf, generator)
    return _invert(cdf, u)


def stratified(log_weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stratified resampling: one uniform per stratum ``[k/num, (k+1)/num)``. ``(num, B)``."""
    cdf = _normalised_cumsum(log_weights)
    k = torch.arange(num, dtype=cdf.dtype, device=cdf.device)
    u = (k + _uniform((cdf.shape[0], num), cdf, generator)) / num
    return _invert(cdf, u)


def systematic(log_weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Systematic resampling: one uniform per sequence shifted over a regular grid. ``(num, B)``.

    Linear time, no binary search: with points :math:`U_k=(k+V)/num`, particle :math:`i` is the answer for
    every :math:`k` with :math:`m_{i-1}\le k<m_i`, where :math:`m_i=\#\{k: U_k<C^i\}=\lceil num\,C^i-V\rceil`
    (clamped to ``[0, num]``); so ``index_k`` is the number of :math:`m_i\le k`, a scatter-add and a cumsum.
    :math:`m_i` is computed in float64: in float32, :math:`num - V` can round down to an integer and hand the
    last points to trailing zero-weight particles.
    """
    cdf = _normalised_cumsum(log_weights)  # (B, N), last entry exactly 1
    b, n = cdf.shape
    v = _uniform((b, 1), cdf, generator)
    m = torch.ceil(cdf.double() * num - v.double()).clamp_(0, num).long()  # nondecreasing; equal for a zero weight
    counts = torch.zeros((b, num + 1), dtype=torch.long, device=cdf.device)
    counts.scatter_add_(1, m, torch.ones_like(m))
    idx = torch.cumsum(counts[:, :num], dim=1)
    return idx.clamp_(max=n - 1).T


def systematic_from_weights(weights: torch.Tensor, num: int, generator: torch.Generator | None = None, *,
                            uniform: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                            ones: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`systematic` from non-negative weights ``(N, B)`` (any positive total per sequence) instead of
    log-weights: the same law, without the softmax and transposes (the particle filter's fast path, which
    has the normalised weights at hand). ``(num, B)``.

    The particle filter passes its own buffers (same result, no allocation): ``uniform`` ``(1, B)`` float64, the
    :math:`V` of each sequence (drawn here otherwise), ``counts`` ``(num + 1, B)`` int64 scratch and ``ones``
    ``(N, B)`` int64 ones."""
    c = torch.cumsum(weights, 0, dtype=torch.float64)
    c = c / c[-1]  # (N, B), last row exactly 1
    n, b = c.shape
    v = torch.rand((1, b), dtype=torch.float64, device=c.device, generator=generator) if uniform is None else uniform
    # nondecreasing along N, equal for a zero weight; in [0, num] (c in [0, 1], last row num) without clamping
    m = c.mul_(num).sub_(v).ceil_().long()
    if counts is None:
        counts = torch.zeros((num + 1, b), dtype=torch.long, device=c.device)
    else:
        counts.zero_()
    counts.scatter_add_(0, m, torch.ones_like(m) if ones is None else ones)
    return torch.cumsum(counts[:num], 0)  # <= n - 1: the last particle's m is num > every k


def residual(log_weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Residual resampling: deterministic copies plus multinomial on the residuals. ``(num, B)``."""
    if log_weights.dim() != 2:
        raise ConfigurationError(
            f"log_weights must have shape (num_particles, num_sequences); found {tuple(log_weights.shape)}."
        )
    lw = log_weights.transpose(0, 1)  # (B, N)
    n = lw.shape[1]
    w = torch.softmax(lw.to(torch.float64), dim=1)  # float64: the floors must not lose copies
    scaled = num * w
    counts = torch.floor(scaled)
    det_cum = torch.cumsum(counts, dim=1)  # (B, N)
    n_det = det_cum[:, -1:]  # (B, 1)
    resid = (scaled - counts).clamp_(min=0.0)
    # sequences with no residual mass (all copies deterministic) get a harmless uniform residual
    resid_sum = resid.sum(1, keepdim=True)
    resid = torch.where(resid_sum > 0, resid, torch.ones_like(resid))
    cdf = torch.cumsum(resid, dim=1)
    cdf = (cdf / cdf[:, -1:]).contiguous()
    u = _below_one(_uniform((lw.shape[0], num), cdf, generator))
    resid_idx = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)  # (B, num)
    k = torch.arange(num, dtype=torch.float64, device=lw.device).expand(lw.shape[0], num).contiguous()
    det_idx = torch.searchsorted(det_cum.contiguous(), k, right=True).clamp_(max=n - 1)
    idx = torch.where(k < n_det, det_idx, resid_idx)
    return idx.transpose(0, 1)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


def get_resampler(name_or_fn) -> Resampler:
    """A resampler by name (``"systematic"``, ``"stratified"``, ``"multinomial"``, ``"residual"``) or a
    callable with the common signature (returned as is)."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in RESAMPLERS:
        raise ConfigurationError(
            f"resampling must be one of {sorted(RESAMPLERS)} or a callable (log_weights, num, generator) -> "
            f"indices; found {name_or_fn!r}."
        )
    return RESAMPLERS[name_or_fn]


def take(x: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x[idx[p, b], b]``: rows of ``x (N,B,...)`` at per-sequence indices ``idx (P,B)`` -> ``(P,B,...)``
    (one flat ``index_select``, about 3x faster than ``gather`` with an expanded index). ``offsets``:
    ``arange(B)`` when the caller has it at hand."""
    n, b = x.shape[0], x.shape[1]
    if b == 1:  # one sequence: rows of x directly (no flattening views, ~3x less overhead at N ~ 1000)
        return x.index_select(0, idx.reshape(-1))
    if offsets is None:
        offsets = torch.arange(b, device=idx.device)
    flat = offsets.add(idx, alpha=b).reshape(-1)
    return x.reshape(n * b, *x.shape[2:]).index_select(0, flat).reshape(idx.shape[0], b, *x.shape[2:])


def effective_sample_size(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""ESS :math:`1/\sum_i (W^i)^2` of (unnormalised) log-weights along ``dim``."""
    lw = log_weights - torch.logsumexp(log_weights, dim=dim, keepdim=True)
    return torch.exp(-torch.logsumexp(2 * lw, dim=dim))


__all__ = [
    "multinomial", "stratified", "systematic", "systematic_from_weights", "residual", "RESAMPLERS", "get_resampler",
    "effective_sample_size", "take",
]
