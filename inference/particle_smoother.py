r"""Particle smoothing from a forward particle filter that keeps its history.

The forward pass (:func:`~ppl_rnn.inference.smc.run_particle_filter` with ``keep_history=True``) stores
particles :math:`h^n_t`, normalised filtering log-weights :math:`\ell^n_t` and ancestors :math:`a^n_t`:
**memory** :math:`T N B H` floats for the particles (the dominant term; float32 by default, float64 with
``dtype=torch.float64``), plus :math:`T N B` floats and :math:`T N B` int64. Example: T=1000, N=1000, H=8,
B=1 in float32 is 32 MB of particles. All backward passes below are vectorised over paths and sequences
and read the model only through ``model.transition(t, h_prev, u_t).log_prob``; they use the backward
kernel

.. math:: p(h_t = h^i_t \mid h_{t+1}, y_{0:T-1}) \propto e^{\ell^i_t}\, p(h_{t+1}\mid h^i_t).

* ``backward="simulation"`` — FFBSi (Godsill, Doucet & West 2004): draw :math:`h_{T-1}` from the final
  weights, then for :math:`t = T-2,\dots,0` draw the index from the backward kernel above.
  Cost :math:`O(N)` per path per step (an ``(N, P, B)`` log-density matrix per step).
* ``backward="mcmc"`` — backward MCMC (Bunch & Godsill 2013; Dau & Chopin 2022, as
  ``backward_sampling_mcmc`` in *particles*): start at the genealogy's ancestor
  :math:`a_{t+1}^{i_{t+1}}` and run ``mcmc_steps`` independent Metropolis-Hastings moves with proposals
  :math:`j \sim e^{\ell^j_t}`, accepted with probability
  :math:`\min(1, p(h_{t+1}\mid h^j_t)/p(h_{t+1}\mid h^{i}_t))`. This leaves the backward kernel invariant;
  cost :math:`O(1)` per path per step (per MH move), for large N. A NaN (or +inf) transition log-density at
  the current or a proposed particle raises :class:`~ppl_rnn.errors.DegenerateWeightsError` naming the step
  (as FFBSi does) instead of being rejected silently.
* ``backward="marginal"`` — forward-filtering backward-smoothing (FFBSm; Doucet, Godsill & Andrieu 2000):
  smoothed marginal weights

  .. math::
      W^{i}_{t\mid T} = \sum_j W^{(i,j)}_{t,t+1\mid T},\qquad
      W^{(i,j)}_{t,t+1\mid T} = \frac{e^{\ell^i_t} p(h^j_{t+1}\mid h^i_t)}
      {\sum_k e^{\ell^k_t} p(h^j_{t+1}\mid h^k_t)}\, W^j_{t+1\mid T},

  :math:`O(N^2)` per step (vectorised as ``(N, N, B)`` matrices), which gives the smoothed means and
  variances, the lag-one cross-covariances, and expectations of any user function
  :math:`f(h_{t-1}, h_t)` under the pairwise smoothed weights (:func:`pairwise_expectations`, what an EM
  M-step needs). The trajectories in ``diagnostics["paths"]`` still come from FFBSi.

:class:`ParticleSmoother` returns a smoothing :class:`~ppl_rnn.results.Posterior` whose
``diagnostics["paths"]`` holds ``num_paths`` trajectories ``(P, B, T, H)`` drawn at inference time and
whose ``sample(num)`` draws fresh ones with the same backward method; ``log_evidence`` comes from the
forward filter (``evidence_kind="estimate"``).

The forward filter is a :class:`~ppl_rnn.inference.smc.ParticleFilter` the smoother holds (``filter=``; by
default ``proposal="auto"``: the fully adapted auxiliary filter where the model declares a linear-Gaussian
emission and has a Gaussian transition, see :func:`~ppl_rnn.inference.smc.best_proposal`). The backward kernels above need only the filtering weights of each step
and the transition density, both unchanged by the proposal, so every backward pass works on its history
(``diagnostics["proposal"]`` says which was used). The backward loops run under
:func:`ppl_rnn.scope.threads_for`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.distributions import MultivariateNormal

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError
from ppl_rnn.method import InferenceMethod, check_choice, check_positive_int
from ppl_rnn.model import input_at
from ppl_rnn.results import Posterior
from ppl_rnn.rng import seeded
from ppl_rnn.scope import threads_for

from .resampling import multinomial
from .smc import (
    ParticleFilter,
    ParticleFilterRecord,
    diag_normal,
    exp_clamp_bounds,
    fast_context,
    take,
    weighted_draws,
)

BACKWARD_MODES = ("simulation", "mcmc", "marginal")
#: bound on the elements of the (N, chunk, B, H) intermediate of a backward step
_CHUNK_ELEMENTS = 1 << 24


def _check_history(record: ParticleFilterRecord):
    if record.particles is None:
        raise ValueError("the particle filter record has no history; run run_particle_filter(..., keep_history=True).")


def _pair_log_f(model, t: int, h_prev: torch.Tensor, h_next: torch.Tensor, u_t, loc_scale=None) -> torch.Tensor:
    r"""``(B, P, N)`` matrix :math:`\log p(h_{next}^p \mid h_{prev}^n)` for h_prev ``(N,B,H)``, h_next ``(P,B,H)``.

    Fast path (a transition whose noise does not depend on the particle: ``Normal(loc, scale).to_event(1)``
    with a per-sequence scale, or ``MultivariateNormal`` with one ``scale_tril``): the quadratic form is
    expanded into one batched matrix product, :math:`O(NPH)` flops in BLAS; both sides are centred on the
    mean of ``h_next`` first, which limits the cancellation of the expansion to the particle spread (absolute
    error about eps * (spread/scale)^2; tested equal to ``log_prob`` in float64). Otherwise the generic broadcast ``log_prob`` (chunked over P).
    """
    N, B, H = h_prev.shape
    P = h_next.shape[0]
    white = None
    if loc_scale is not None:  # the model's (loc, scale) shortcut (see ppl_rnn.model): no distribution object
        tr = None
        diag = loc_scale(t, h_prev, u_t)
    else:
        tr = model.transition(t, h_prev, u_t)
        diag = diag_normal(tr)
    if diag is not None:
        loc, scale = diag
        scale = scale.expand(N, B, H)
        if bool((scale == scale[:1]).all()):
            s = scale[0]  # (B,H)
            white = (loc / s, h_next / s, torch.log(s).sum(-1))  # logdet (B,)
    elif isinstance(tr, MultivariateNormal) and tr._unbroadcasted_scale_tril.dim() == 2:
        L = tr._unbroadcasted_scale_tril
        loc = tr.loc.expand(N, B, H)
        wl = torch.linalg.solve_triangular(L, loc.reshape(-1, H).T, upper=False).T.reshape(N, B, H)
        wx = torch.linalg.solve_triangular(L, h_next.reshape(-1, H).T, upper=False).T.reshape(P, B, H)
        white = (wl, wx, torch.log(torch.diagonal(L)).sum().expand(B))
    if white is not None:
        wl, wx, logdet = white
        c = wx.mean(0, keepdim=True)
        wl = (wl - c).permute(1, 0, 2)  # (B,N,H)
        wx = (wx - c).permute(1, 0, 2)  # (B,P,H)
        sq = (wx * wx).sum(-1).unsqueeze(-1) + (wl * wl).sum(-1).unsqueeze(-2)  # (B,P,N)
        quad = torch.baddbmm(sq, wx, wl.transpose(1, 2), alpha=-2.0)
        const = logdet + 0.5 * H * math.log(2 * math.pi)
        return quad.clamp_(min=0.0).mul_(-0.5).sub_(const.view(B, 1, 1))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, N * B * H))
    trb = model.transition(t, h_prev.unsqueeze(1), u_t)
    out = torch.cat([trb.log_prob(h_next[s:s + chunk]) for s in range(0, P, chunk)], dim=1)  # (N,P,B)
    return out.permute(2, 1, 0)


def _sample_rows(logits: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """One categorical draw per row of ``logits (..., N)`` (inverse CDF); returns ``(...)`` int64.

    ``row_max``: ``logits.amax(-1, keepdim=True)`` if the caller has it. Exponents are clamped at
    ``log(tiny)`` (torch's ``exp`` is 10-30x slower below it) and the weights there set to 0."""
    n = logits.shape[-1]
    flat = logits.reshape(-1, n)
    mx = flat.amax(-1, keepdim=True) if row_max is None else row_max.reshape(-1, 1)
    log_tiny, tiny = exp_clamp_bounds(flat.dtype)
    w = torch.nn.functional.threshold_((flat - mx).clamp_min_(log_tiny).exp_(), tiny, 0.0)
    c = torch.cumsum(w, -1)
    u = torch.rand((flat.shape[0], 1), dtype=c.dtype, device=c.device).mul_(c[:, -1:])
    idx = torch.searchsorted(c, u, right=True).clamp_(max=n - 1)
    return idx.reshape(logits.shape[:-1])


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (N,B,H)`` at indices ``idx (P,B)`` -> ``(P,B,H)``."""
    return take(x, idx)


def _raise_backward(t: int, col_bad: torch.Tensor):
    b = int(torch.nonzero(col_bad.any(0)).flatten()[0]) if col_bad.dim() == 2 else int(col_bad.nonzero()[0])
    raise DegenerateWeightsError(
        f"backward smoothing weights degenerate for sequence {b} at time step {t}: no filter particle at t can "
        f"reach the smoothed state at t+1 under the transition density (a transition with bounded support or a "
        f"NaN transition log-density). Increase num_particles or check the model's transition.",
        sequence=b, time_step=t)


def backward_simulation(model, data: Data, record: ParticleFilterRecord, num_paths: int) -> torch.Tensor:
    """FFBSi: ``num_paths`` trajectories ``(P, B, T, H)`` (see module docstring). Uses the global RNG."""
    _check_history(record)
    P = check_positive_int(num_paths, "num_paths")
    X, LW = record.particles, record.log_weights
    T, N, B, H = X.shape
    out = X.new_empty((P, B, T, H))
    with fast_context(model), threads_for(B * P * N):
        h = weighted_draws(X[-1], LW[-1], P)
        out[:, :, -1] = h
        ls = capability(model, "transition_loc_scale")
        for t in range(T - 2, -1, -1):
            logf = _pair_log_f(model, t + 1, X[t], h, input_at(data.inputs, t + 1), ls)  # (B,P,N)
            a = logf.add_(LW[t].T.unsqueeze(1))
            mx = a.amax(-1, keepdim=True)  # (B,P,1)
            bad = ~torch.isfinite(mx.squeeze(-1))
            if bool(bad.any()):
                _raise_backward(t, bad.T)
            idx = _sample_rows(a, mx).T  # (P,B)
            h = _gather(X[t], idx)
            out[:, :, t] = h
    return out


def _check_mcmc(t: int, lf: torch.Tensor, what: str) -> None:
    """Backward MCMC must not run on NaN (or +inf) transition log-densities: an MH move would reject a NaN
    proposal silently and a NaN current state would never move. Raise as FFBSi does."""
    bad = torch.isnan(lf) | (lf == float("inf"))  # (P,B)
    if bool(bad.any()):
        b = int(torch.nonzero(bad.any(0)).flatten()[0])
        raise DegenerateWeightsError(
            f"backward MCMC: the transition log-density log p(h_{{t+1}} | h_t) is NaN or +inf at {what} for "
            f"sequence {b} at time step {t} (filter particles at t that are NaN/inf, or a transition that returns "
            "NaN there). Check the model's transition and the filter's particles at that step, or use "
            "backward='simulation'.", sequence=b, time_step=t)


def _mcmc_proposals(LW: torch.Tensor, hi: int, lo: int, points: torch.Tensor) -> torch.Tensor:
    """Multinomial draws from the filtering weights of the steps ``hi, hi-1, ..., lo`` at once: ``LW (T,N,B)``,
    ``points (K, m, B, P)`` uniforms (the k-th row for step ``hi-k``) -> indices ``(K, m, P, B)``. The same inverse-CDF
    draws as :func:`~ppl_rnn.inference.resampling.multinomial` (cumulative normalised weights ending at exactly 1,
    points kept below 1, ``searchsorted(right=True)``), batched over steps."""
    K, m, B, P = points.shape
    lw = LW[lo:hi + 1].flip(0)  # (K,N,B): steps hi, ..., lo
    c = torch.cumsum(torch.softmax(lw, dim=1), dim=1).transpose(1, 2).contiguous()  # (K,B,N)
    c.div_(c[:, :, -1:].clone())
    top = torch.nextafter(torch.ones((), dtype=c.dtype), torch.zeros((), dtype=c.dtype)).item()
    pts = points.permute(0, 2, 1, 3).reshape(K, B, m * P).contiguous().clamp_(max=top)
    idx = torch.searchsorted(c, pts, right=True).clamp_(max=lw.shape[1] - 1)  # (K,B,m*P)
    return idx.view(K, B, m, P).permute(0, 2, 3, 1)


#: bound on the random numbers of one block of backward-MCMC steps (drawn at once)
_MCMC_BLOCK_ELEMENTS = 1 << 16


def backward_mcmc(model, data: Data, record: ParticleFilterRecord, num_paths: int, mcmc_steps: int = 1
                  ) -> torch.Tensor:
    """Backward sampling by independent Metropolis-Hastings from the genealogy (module docstring).
    ``(P, B, T, H)``; O(mcmc_steps) transition evaluations per path per step.

    Implementation (the same draws as a step-by-step loop): the proposals and the MH uniforms do not depend on
    the chain, so they are drawn for a block of steps at once (in the order of the step-by-step loop: per step and
    move, ``(B, P)`` proposal uniforms then ``(P, B)`` acceptance uniforms); per step the current state and every
    proposal are evaluated in one call of the transition density; the NaN check and the writing of the paths
    are done once per block."""
    _check_history(record)
    P = check_positive_int(num_paths, "num_paths")
    mcmc_steps = check_positive_int(mcmc_steps, "mcmc_steps", minimum=0)
    X, LW, A = record.particles, record.log_weights, record.ancestors
    T, N, B, H = X.shape
    m = mcmc_steps
    out = X.new_empty((P, B, T, H))
    ls = capability(model, "transition_loc_scale")
    offsets = torch.arange(B, device=X.device)

    Xf = X.reshape(T, N * B, H)

    X_l, A_l = Xf.unbind(0), A.unbind(0)

    def rows(t, i):  # X[t] at per-sequence indices i (..., B) -> (numel / B, B, H)
        flat = i.view(-1) if B == 1 else (i * B + offsets).view(-1)
        return X_l[t].index_select(0, flat).view(-1, B, H)

    logdet = [None, None]  # (scale, sum log scale) of the last call: a shared scale is the same tensor every step

    def log_f(t, h_prev, h_next, u, out):
        """``out (1+m, P, B)`` <- log p(h_next | h_prev) up to a constant shared by every pair: ``h_prev``
        ``((1+m)P, B, H)`` (the current state, then the proposals), ``h_next (P, B, H)``."""
        if ls is None:
            return out.copy_(model.transition(t, h_prev, u).log_prob(h_next.repeat(1 + m, 1, 1)).view(1 + m, P, B))
        loc, scale = ls(t, h_prev, u)
        loc = loc.view(1 + m, P, B, H)
        if scale.dim() >= 3 and scale.shape[-3] != 1:  # per particle: the same split
            scale = scale.reshape((1 + m, P) + scale.shape[-2:])
        elif scale is not logdet[0]:
            logdet[0], logdet[1] = scale, scale.log().sum(-1)
        ld = logdet[1] if scale is logdet[0] else scale.log().sum(-1)
        z = (h_next - loc).div_(scale)
        return torch.sub(z.square_().sum(-1).mul_(-0.5), ld, out=out)

    with fast_context(model), threads_for(P * B * H):
        idx = multinomial(LW[-1], P)  # (P,B) indices into X[T-1]
        h = take(X[-1], idx, offsets)
        out[:, :, -1] = h
        K = max(1, min(T - 1, _MCMC_BLOCK_ELEMENTS // max(1, 2 * m * B * P)))
        IDX = torch.empty((K, P, B), dtype=torch.long, device=X.device)
        LF = X.new_empty((K, 1 + m, P, B))
        for hi in range(T - 2, -1, -K):  # block of steps hi, hi-1, ..., lo
            lo = max(hi - K + 1, 0)
            ts = range(hi, lo - 1, -1)
            k_n = len(ts)
            U = torch.rand((k_n, m, 2, B * P), dtype=X.dtype, device=X.device)
            props = _mcmc_proposals(LW, hi, lo, U[:, :, 0].view(k_n, m, B, P))  # (k_n, m, P, B)
            log_u = U[:, :, 1].view(k_n, m, P, B).log_()
            cands = torch.empty((k_n, 1 + m, P, B), dtype=torch.long, device=X.device)  # current state, proposals
            cands[:, 1:] = props
            c_l, p_l, u_l, lf_l, i_l = cands.unbind(0), props.unbind(0), log_u.unbind(0), LF.unbind(0), IDX.unbind(0)
            for k, t in enumerate(ts):  # (views unbound once per block: no per-step indexing in Python)
                u = input_at(data.inputs, t + 1)
                cand = c_l[k]
                cur = torch.gather(A_l[t + 1], 0, idx, out=cand[0])  # the genealogy's ancestor: a valid start
                lf = log_f(t + 1, rows(t, cand), h, u, lf_l[k])
                lf_cur = lf[0]
                for j in range(m):
                    lf_prop = lf[j + 1]
                    acc = u_l[k][j] < lf_prop - lf_cur
                    if j < m - 1:
                        cur = torch.where(acc, p_l[k][j], cur)
                        lf_cur = torch.where(acc, lf_prop, lf_cur)
                    else:
                        cur = torch.where(acc, p_l[k][j], cur, out=i_l[k])
                if m == 0:
                    cur = i_l[k].copy_(cur)
                idx = cur
                h = rows(t, cur)
            lfb = LF[:k_n]
            if bool((torch.isnan(lfb) | (lfb == float("inf"))).any()):  # raise at the first bad one, in loop order
                for k, t in enumerate(ts):
                    _check_mcmc(t, lfb[k, 0], "the genealogy's ancestor")
                    for j in range(m):
                        _check_mcmc(t, lfb[k, 1 + j], "a proposed particle")
            # paths of the block in one gather: out[p, b, t] = X[t, IDX[t, p, b], b]
            steps = torch.arange(hi, lo - 1, -1, device=X.device).view(k_n, 1, 1)
            flat = ((IDX[:k_n] + steps * N) * B + offsets).view(-1)
            g = X.reshape(T * N * B, H).index_select(0, flat).view(k_n, P, B, H)
            out[:, :, lo:hi + 1] = g.flip(0).permute(1, 2, 0, 3)
    return out


@dataclass(frozen=True)
class SmoothedMarginals:
    r"""Output of :func:`ffbsm`.

    log_weights: ``(T,N,B)`` normalised smoothed marginal log-weights :math:`\log W^i_{t\mid T}`
    mean, var: ``(B,T,H)`` :math:`E[h_t\mid y_{0:T-1}]`, diagonal variance
    cross_cov: ``(B,T,H,H)`` :math:`\operatorname{Cov}(h_t, h_{t-1}\mid y_{0:T-1})` (index 0 is zero)
    expectations: name -> ``(B,T,*S)`` :math:`E[f(h_{t-1},h_t)\mid y_{0:T-1}]` (index 0 is zero)
    """

    log_weights: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    cross_cov: torch.Tensor
    expectations: Mapping[str, torch.Tensor] = field(default_factory=dict)


PairFunction = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def ffbsm(model, data: Data, record: ParticleFilterRecord,
          functions: Mapping[str, PairFunction] | None = None) -> SmoothedMarginals:
    r"""Forward-filtering backward-smoothing (module docstring): smoothed marginal weights, moments,
    lag-one cross-covariances and pairwise expectations.

    ``functions``: name -> ``f(t, h_prev, h, u_t)`` called with ``h_prev`` ``(N,1,B,H)`` (particles at
    t-1) and ``h`` ``(1,N,B,H)`` (particles at t) and returning ``(N,N,B,*S)`` (anything broadcastable);
    the result ``expectations[name]`` is ``(B,T,*S)`` with
    :math:`\sum_{i,j} W^{(i,j)}_{t-1,t\mid T} f(h^i_{t-1}, h^j_t)` at index t (index 0 is zero).
    Cost :math:`O(N^2 B H)` per step.
    """
    _check_history(record)
    functions = dict(functions or {})
    X, LW = record.particles, record.log_weights
    T, N, B, H = X.shape
    lws = [None] * T
    cross = [torch.zeros(B, H, H, dtype=X.dtype, device=X.device)] * T
    expect: dict[str, list] = {k: [None] * T for k in functions}
    with fast_context(model), threads_for(N * N * B):
        lws[-1] = LW[-1] - torch.logsumexp(LW[-1], 0)  # normalised, whatever the record holds
        for t in range(T - 2, -1, -1):
            u = input_at(data.inputs, t + 1)
            logf = _pair_log_f(model, t + 1, X[t], X[t + 1], u)  # (B, N_j, N_i)
            a = logf + LW[t].T.unsqueeze(1)
            denom = torch.logsumexp(a, -1)  # (B, N_j)
            lw_next = lws[t + 1].T  # (B, N_j)
            ratio = torch.where(torch.isfinite(lw_next), lw_next - denom, torch.full_like(denom, -float("inf")))
            pair = a + ratio.unsqueeze(-1)  # log W^{(i,j)} as (B, j, i)
            lw_t = torch.logsumexp(pair, 1)  # (B, N_i)
            tot = torch.logsumexp(lw_t, -1, keepdim=True)
            if not bool(torch.isfinite(tot).all()):
                _raise_backward(t, ~torch.isfinite(tot.T))
            lws[t] = (lw_t - tot).T
            Wp = torch.exp(pair - tot.unsqueeze(-1))  # (B,j,i)
            Xp, Xn = X[t].permute(1, 0, 2), X[t + 1].permute(1, 0, 2)  # (B,N,H)
            m_prev = (Wp.sum(1).unsqueeze(-1) * Xp).sum(1)
            m_next = (Wp.sum(2).unsqueeze(-1) * Xn).sum(1)
            e_cross = Xn.transpose(1, 2) @ Wp @ Xp  # (B,H,H): E[h_{t+1} h_t^T]
            cross[t + 1] = e_cross - m_next.unsqueeze(-1) * m_prev.unsqueeze(-2)
            for name, fn in functions.items():
                val = fn(t + 1, X[t].unsqueeze(1), X[t + 1].unsqueeze(0), u)  # (N_i, N_j, B, *S)
                w = Wp.permute(2, 1, 0)
                w = w.reshape(w.shape + (1,) * (val.dim() - 3))
                expect[name][t + 1] = (w * val).sum((0, 1))
        W = torch.exp(torch.stack(lws, 0))  # (T,N,B)
        mean = torch.einsum("tnb,tnbh->bth", W, X)
        d = X - mean.permute(1, 0, 2).unsqueeze(1)
        var = torch.einsum("tnb,tnbh->bth", W, d * d)
    out = {}
    for name, vals in expect.items():
        shape = vals[1].shape if T > 1 else (B,)
        vals[0] = torch.zeros(shape, dtype=X.dtype, device=X.device)
        out[name] = torch.stack(vals, 1)
    return SmoothedMarginals(torch.stack(lws, 0), mean, var, torch.stack(cross, 1), out)


def pairwise_expectations(model, data: Data, record: ParticleFilterRecord, fn: PairFunction) -> torch.Tensor:
    r"""``(B,T,*S)`` :math:`E[f(h_{t-1},h_t)\mid y_{0:T-1}]` under the FFBSm pairwise weights (index 0 zero);
    see :func:`ffbsm` for the signature of ``fn``."""
    return ffbsm(model, data, record, {"f": fn}).expectations["f"]


def _path_moments(paths: torch.Tensor):
    mean = paths.mean(0)
    d = paths - mean
    var = (d * d).mean(0)
    B, T, H = mean.shape
    cross = torch.zeros(B, T, H, H, dtype=paths.dtype, device=paths.device)
    if T > 1:  # batched (H,P) @ (P,H) products: no (P,B,T,H,H) intermediate
        P = paths.shape[0]
        dn = d[:, :, 1:].permute(1, 2, 3, 0).reshape(B * (T - 1), H, P)
        dp = d[:, :, :-1].permute(1, 2, 0, 3).reshape(B * (T - 1), P, H)
        cross[:, 1:] = (dn @ dp).reshape(B, T - 1, H, H) / P
    return mean, var, cross


class ParticleSmoother(InferenceMethod):
    """Particle smoother: a forward particle filter with history, then a backward pass (module docstring).

    Args:
        num_paths: smoothed trajectories drawn at inference time (``diagnostics["paths"]``).
        filter: the forward :class:`~ppl_rnn.inference.smc.ParticleFilter` (its particles, proposal,
            resampling, ESS threshold, dtype, device); the smoother keeps it as its one source of truth for those
            options. Default ``ParticleFilter(1000)``.
        backward: ``"simulation"`` (FFBSi, O(N) per path per step), ``"mcmc"`` (backward MH, O(1) per path
            per step), ``"marginal"`` (FFBSm marginal weights, O(N^2) per step; paths by FFBSi).
        mcmc_steps: MH moves per step for ``backward="mcmc"``.
        num_particles, proposal, resampling, ess_threshold, dtype, device, progress: a convenience that builds
            ``filter=ParticleFilter(num_particles, proposal=..., ...)`` (unset ones take ParticleFilter's
            defaults); not allowed together with ``filter``.

    ``ParticleSmoother(filter=ParticleFilter(500, proposal=Bootstrap()), num_paths=100)`` and
    ``ParticleSmoother(500, 100, proposal="bootstrap")`` are the same smoother. The filter's options are read
    through it (``smoother.filter.proposal``); ``num_particles``, ``proposal``, ``resampling``,
    ``ess_threshold``, ``dtype``, ``device`` and ``progress`` are also readable on the smoother (delegated to the
    filter). :meth:`resized` gives a copy with other particle / path counts.

    Memory: the forward history is T*N*B*H floats (see module docstring).
    """

    name = "particle_smoother"
    smooths = True

    def __init__(self, num_particles: int | None = None, num_paths: int = 100, *, filter: ParticleFilter | None = None,
                 backward: str = "simulation", mcmc_steps: int = 1, proposal=None, resampling=None,
                 ess_threshold: float | None = None, dtype=None, device=None, progress: bool | None = None):
        opts = {"num_particles": num_particles, "proposal": proposal, "resampling": resampling,
                "ess_threshold": ess_threshold, "dtype": dtype, "device": device, "progress": progress}
        given = {k: v for k, v in opts.items() if v is not None}
        if filter is not None:
            if not isinstance(filter, ParticleFilter):
                raise ConfigurationError(f"filter must be a ParticleFilter(...) (the forward pass, with history); found "
                                         f"{filter!r}.")
            if given:
                raise ConfigurationError(
                    f"ParticleSmoother: pass the forward filter's options either as filter=ParticleFilter(...) or as "
                    f"{sorted(given)}, not both; found filter={filter!r} and {given}. Put them in the filter.")
        else:
            n = given.pop("num_particles", 1000)
            filter = ParticleFilter(n, **given)
        self.filter = filter
        self.num_paths = check_positive_int(num_paths, "num_paths")
        self.backward = check_choice(backward, "backward", BACKWARD_MODES)
        self.mcmc_steps = check_positive_int(mcmc_steps, "mcmc_steps")

    # the filter's options, read through the filter (one source of truth)
    @property
    def num_particles(self) -> int:
        return self.filter.num_particles

    @num_particles.setter
    def num_particles(self, value: int) -> None:  # older callers set it on a copy: re-size the filter instead
        self.filter = self.filter.resized(value)

    proposal = property(lambda self: self.filter.proposal)
    resampling = property(lambda self: self.filter.resampling)
    ess_threshold = property(lambda self: self.filter.ess_threshold)
    dtype = property(lambda self: self.filter.dtype)
    device = property(lambda self: self.filter.device)
    progress = property(lambda self: self.filter.progress)

    def resized(self, num_particles: int | None = None, num_paths: int | None = None) -> ParticleSmoother:
        """A copy with ``num_particles`` forward-filter particles (the filter's :meth:`~ParticleFilter.resized`)
        and ``num_paths`` paths; None keeps the current count. ``self`` is unchanged."""
        new = copy.copy(self)
        if num_particles is not None:
            new.filter = self.filter.resized(num_particles)
        if num_paths is not None:
            new.num_paths = check_positive_int(num_paths, "num_paths")
        return new

    def _paths(self, model, data, rec, num):
        if self.backward == "mcmc":
            return backward_mcmc(model, data, rec, num, self.mcmc_steps)
        return backward_simulation(model, data, rec, num)

    def _infer(self, model, data, seed):
        with seeded(seed):
            model, data, rec = self.filter.run(model, data, keep_history=True)
            paths = self._paths(model, data, rec, self.num_paths)
            marg = ffbsm(model, data, rec) if self.backward == "marginal" else None
        if marg is not None:
            mean, var, cross = marg.mean, marg.var, marg.cross_cov
        else:
            mean, var, cross = _path_moments(paths)
        diagnostics = {"paths": paths, "ess": rec.ess, "resampled": rec.resampled, "log_lik": rec.log_lik,
                       "filter_mean": rec.filt_mean, "filter_var": rec.filt_var, "record": rec,
                       "num_particles": self.num_particles, "backward": self.backward, "proposal": rec.proposal,
                       "proposal_reason": rec.proposal_reason}
        if marg is not None:
            diagnostics["smoothed_log_weights"] = marg.log_weights
        fp, fw = rec.final_particles, rec.final_log_weights
        return Posterior(
            kind="smoothing", mean=mean, var=var, log_evidence=rec.log_evidence, evidence_kind="estimate",
            method=self.name, cross_cov=cross, diagnostics=diagnostics,
            sampler=lambda num: self._paths(model, data, rec, num),
            final_sampler=lambda num: weighted_draws(fp, fw, num),
        )


__all__ = ["ParticleSmoother", "backward_simulation", "backward_mcmc", "ffbsm", "pairwise_expectations",
           "SmoothedMarginals"]
