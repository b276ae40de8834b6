r"""Particle-marginal Metropolis–Hastings (PMMH; Andrieu, Doucet & Holenstein 2010), plain or correlated.

Target: the posterior of a Bayesian model's parameters (its ``PyroSample`` sites, :mod:`ppl_rnn.priors`) in the
unconstrained space :math:`z\in\mathbb R^D`, :math:`\theta = T(z)`:

.. math:: \pi(z\mid y) \propto \pi(z)\, p(y\mid\theta(z)),\qquad
          \pi(z) = p(T(z))\,|\det\partial T/\partial z| \quad(\texttt{ParameterSpace.log\_prior})

The likelihood is replaced by the particle filter's unbiased estimate :math:`\hat p_U(y\mid\theta)` (``U``: the
filter's random numbers) at a fixed model (``ParameterSpace.load``); the chain on :math:`(z, U)` with the
acceptance probability

.. math:: \alpha = \min\Big(1,\ \frac{\pi(z')\,\hat p_{U'}(y\mid\theta')}{\pi(z)\,\hat p_{U}(y\mid\theta)}\Big)

(symmetric proposals) leaves :math:`\pi(z\mid y)` invariant exactly, whatever the number of particles (the
pseudo-marginal argument): the current estimate is kept, never recomputed.

**Proposal.** A Gaussian random walk :math:`z' = z + s L\xi`, :math:`\xi\sim N(0, I_D)`. During warm-up
(Haario, Saksman & Tamminen 2001) :math:`LL^\top` is re-estimated from the chain's own warm-up draws
(:math:`\hat\Sigma + 10^{-6} I`) and :math:`\log s` follows a Robbins–Monro recursion towards
``target_accept``; both are frozen after warm-up, so the kept draws come from a fixed, valid MH kernel.

**Correlated pseudo-marginal** (``correlation=rho``; Deligiannidis, Doucet & Pitt 2018). :math:`U` is made
explicit: standard normals :math:`\varepsilon_{t}^{n,b}\in\mathbb R^H` (the propagation noise,
:math:`h_t = \mu_\theta(h_{t-1}) + \sigma_\theta\,\varepsilon_t`) and one normal :math:`v_{t,b}` per resampling
step (its uniform :math:`\Phi(v_{t,b})`). Each proposal moves them by a Crank–Nicolson step that leaves
:math:`N(0, I)` invariant,

.. math:: U' = \rho\,U + \sqrt{1-\rho^2}\,\eta,\qquad \eta\sim N(0, I),

and resampling is **sorted systematic**: particles are sorted by a 1-D key (the state itself when
:math:`H = 1`; their position along the Hilbert curve otherwise, :func:`sort_key`) and resampled systematically with the
common uniform :math:`\Phi(v_{t,b})`, so a small change of :math:`(\theta, U)` changes the estimate a little.
The log-likelihood estimates at :math:`(\theta, U)` and :math:`(\theta', U')` are then strongly correlated and
their ratio has a small variance, so far fewer particles give a good acceptance rate. It needs Gaussian initial
and transition laws (``Normal(...).to_event(1)``, a ``MultivariateNormal`` or the ``transition_loc_scale``
capability): the filter runs with a proposal object and a resampler object that read :math:`U` (no change to
the filter's loop), resampling at every step.

Chains run one after another (their parameters differ, and a model's conditionals need not broadcast
parameters per sequence); each costs ``warmup + num_samples`` particle-filter passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import xarray as xr

from ppl_rnn.capabilities import capability
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError, ModelCapabilityError
from ppl_rnn.method import InferenceMethod, check_positive_float, check_positive_int
from ppl_rnn.priors import ParameterSpace
from ppl_rnn.results import FitResult, ParameterPosterior
from ppl_rnn.rng import seeded

from .proposals import Auto, as_proposal, diag_normal
from .smc import best_proposal, run_particle_filter


# ---- the correlated estimator's random numbers -------------------------------------------------------------
@dataclass(frozen=True)
class AuxiliaryNormals:
    r"""The particle filter's random numbers as standard normals: ``eps`` ``(T, N, B, H)`` propagation noise,
    ``v`` ``(T, B)`` one normal per resampling step and sequence (its uniform is :math:`\Phi(v)`)."""

    eps: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def draw(num_steps: int, num_particles: int, num_sequences: int, hidden_dim: int,
             dtype: torch.dtype = torch.float32) -> AuxiliaryNormals:
        """Fresh :math:`N(0, I)` draws (global torch RNG)."""
        return AuxiliaryNormals(torch.randn((num_steps, num_particles, num_sequences, hidden_dim), dtype=dtype),
                                torch.randn((num_steps, num_sequences), dtype=dtype))

    def crank_nicolson(self, rho: float) -> AuxiliaryNormals:
        r""":math:`\rho U + \sqrt{1-\rho^2}\,\eta`: a move that leaves :math:`N(0, I)` invariant."""
        c = math.sqrt(max(0.0, 1.0 - rho * rho))
        return AuxiliaryNormals(self.eps * rho + torch.randn_like(self.eps) * c,
                                self.v * rho + torch.randn_like(self.v) * c)


class CorrelatedProposal:
    r"""The bootstrap proposal driven by given normals: :math:`h_0 = m_0 + L_0\varepsilon_0`,
    :math:`h_t = \mu_\theta(h_{t-1}) + L_\theta\varepsilon_t` (diagonal or Cholesky scale), read from
    :class:`AuxiliaryNormals`; it remembers the particles it drew last, for :class:`SortedSystematic`."""

    name = "bootstrap (given normals)"
    fills_out = True

    def __init__(self, aux: AuxiliaryNormals):
        self.aux = aux
        self.t = -1
        self.last = None
        self._tr_ls = None

    def setup(self, model, data, num_particles):
        T, N, B, H = self.aux.eps.shape
        want = (data.observations.shape[1], num_particles, data.observations.shape[0], model.hidden_dim)
        if (T, N, B, H) != want:
            raise ConfigurationError(f"auxiliary normals have shape {(T, N, B, H)}; the filter needs {want} "
                                     "= (num_steps, num_particles, num_sequences, hidden_dim).")
        self._tr_ls = capability(model, "transition_loc_scale")
        self.t, self.last = -1, None

    @staticmethod
    def _move(d, eps, what: str):
        g = diag_normal(d)
        if g is not None:
            loc, scale = g
            return loc + scale * eps
        tril = getattr(d, "scale_tril", None)
        if tril is not None and type(d).__name__ == "MultivariateNormal":
            return d.loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        raise ModelCapabilityError(
            f"correlated PMMH moves the filter's normals, so it needs a Gaussian {what} law (Normal(loc, scale)."
            f"to_event(1), a MultivariateNormal, or the transition_loc_scale capability); found "
            f"{type(d).__name__}. Use PMMH(correlation=None) (plain PMMH) for this model.")

    def propose(self, model, t, h_prev, y_t, mask_t, u_t, out=None):
        eps = self.aux.eps[t].to(y_t.dtype)
        if h_prev is None:
            h = self._move(model.initial_batched(u_t, (y_t.shape[0],)), eps, "initial")
        elif self._tr_ls is not None:
            loc, scale = self._tr_ls(t, h_prev, u_t)
            h = loc + scale * eps
        else:
            h = self._move(model.transition(t, h_prev, u_t), eps, "transition")
        if out is not None and h.shape == out.shape:
            out.copy_(h)
            h = out
        self.t, self.last = t, h
        return h, None


def hilbert_index(cells: torch.Tensor, bits: int) -> torch.Tensor:
    r"""The position along the Hilbert curve of integer grid cells ``cells`` ``(..., H)`` in
    :math:`[0, 2^{bits})^H` (Skilling 2004: axes to the "transposed" index, then its bits interleaved),
    int64 ``(...)``. Consecutive indices are neighbouring cells, so sorting by it keeps nearby points nearby."""
    n = cells.shape[-1]
    if n * bits > 62:
        raise ConfigurationError(f"hilbert_index: {n} dims x {bits} bits exceed an int64; use fewer bits.")
    x = [cells[..., i].long().clone() for i in range(n)]
    q = 1 << (bits - 1)
    while q > 1:  # inverse undo
        p = q - 1
        for i in range(n):
            hit = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0_hit = x[0] ^ p
            x[i] = torch.where(hit, x[i], x[i] ^ t)
            x[0] = torch.where(hit, x0_hit, x[0] ^ t) if i > 0 else torch.where(hit, x0_hit, x[0])
        q >>= 1
    for i in range(1, n):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[n - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    key = torch.zeros_like(x[0])
    for j in range(bits - 1, -1, -1):
        for i in range(n):
            key = (key << 1) | ((x[i] >> j) & 1)
    return key


def sort_key(h: torch.Tensor) -> torch.Tensor:
    r"""A 1-D sort key of particles ``(N, B, H)`` per sequence: the state itself for :math:`H = 1`, else the
    Hilbert index of the particles mapped to :math:`[0,1)^H` by a logistic of their standardised coordinates
    (per sequence), on a grid of :math:`2^{\lfloor 62/H
floor}` (at most :math:`2^{16}`) cells per axis."""
    if h.shape[-1] == 1:
        return h[..., 0]
    H = h.shape[-1]
    bits = max(1, min(16, 62 // H))
    z = (h - h.mean(0, keepdim=True)) / h.std(0, keepdim=True).clamp_min(1e-12)
    cells = (torch.sigmoid(z.double()) * (1 << bits)).long().clamp_(0, (1 << bits) - 1)
    return hilbert_index(cells, bits)


class SortedSystematic:
    r"""Sorted systematic resampling with given uniforms (the resampler signature
    ``(log_weights (N,B), num, generator) -> (num, B)``): the particles of :class:`CorrelatedProposal`'s last step
    sorted by :func:`sort_key` (the state for :math:`H=1`, the Hilbert curve otherwise), then systematic resampling with :math:`U = \Phi(v_{t,b})` for the step being taken."""

    def __init__(self, proposal: CorrelatedProposal):
        self.proposal = proposal

    def __call__(self, log_weights: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        prop = self.proposal
        h = prop.last  # (N, B, H): the particles at t-1, being resampled for step t
        t = prop.t + 1
        key = sort_key(h)
        order = torch.argsort(key, dim=0)  # (N, B)
        lw = log_weights.gather(0, order)
        w = torch.softmax(lw.double(), dim=0)
        c = torch.cumsum(w, 0)
        c = c / c[-1:]
        u = torch.special.ndtr(prop.aux.v[t].double()).clamp(1e-12, 1 - 1e-12)  # (B,)
        n = c.shape[0]
        pts = (torch.arange(num, dtype=torch.float64, device=c.device).unsqueeze(1) + u.unsqueeze(0)) / num
        idx = torch.searchsorted(c.T.contiguous(), pts.T.contiguous(), right=True).clamp_(max=n - 1).T  # (num, B)
        return order.gather(0, idx)


def log_likelihood_estimate(model, data, num_particles: int, *, aux: AuxiliaryNormals | None = None,
                            proposal="auto", keep_history: bool = False):
    r"""One particle-filter estimate of :math:`\log p(y\mid\theta)` at the (fixed) ``model``: the
    :class:`~ppl_rnn.inference.smc.ParticleFilterRecord`. With ``aux`` the filter's randomness is ``aux``
    (:class:`CorrelatedProposal`, :class:`SortedSystematic`, resampling at every step), so the estimate is a
    deterministic function of :math:`(\theta, U)`; else the global torch RNG with ``proposal``."""
    if aux is None:
        return run_particle_filter(model, data, num_particles, proposal=proposal, keep_history=keep_history)
    prop = CorrelatedProposal(aux)
    return run_particle_filter(model, data, num_particles, proposal=prop, resampling=SortedSystematic(prop),
                               ess_threshold=1.0, keep_history=keep_history)


def _trace_path(rec) -> torch.Tensor:
    """One path ``(B, T, H)`` of a filter's history: a final particle drawn by weight, its ancestors traced."""
    T, N, B, H = rec.particles.shape
    idx = torch.multinomial(rec.final_log_weights.T.double().softmax(-1), 1).squeeze(1)  # (B,)
    cols = torch.arange(B)
    out = torch.empty((B, T, H), dtype=rec.particles.dtype)
    for t in range(T - 1, -1, -1):
        out[:, t] = rec.particles[t, idx, cols]
        idx = rec.ancestors[t, idx, cols]
    return out


# ---- methods returning a parameter posterior ---------------------------------------------------------------
class ParameterSamplingMethod(InferenceMethod):
    r"""Base of the samplers of :math:`p(\theta\mid y)` (``_infer`` returns a
    :class:`~ppl_rnn.results.ParameterPosterior`). ``pr.fit`` with one (as in ``pr.compare``) returns a
    :class:`~ppl_rnn.FitResult` whose ``model`` is the posterior itself: ``pr.evaluate`` and ``pr.forecast``
    score and forecast it by its posterior predictive. Its ``trace`` has dim ``iteration`` = the draws of chain
    0 (``log_evidence``: the log-likelihood estimate at each draw, ``evidence_kind="estimate"``)."""

    def _fit(self, model, data, seed):
        post = self._infer(model, data, seed)
        ll = post.sample_stats.get("log_likelihood_estimate")
        trace = xr.Dataset()
        if ll is not None:
            v = ll[0].double().numpy()
            trace = xr.Dataset({"log_evidence": ("iteration", v), "objective": ("iteration", v)})
        return FitResult(model=post, trace=trace, posterior=None, wall_time_s=post.wall_time_s,
                         converged=bool(post.diagnostics.get("converged", True)), method=self.name,
                         evidence_kind="estimate", diagnostics={"parameter_posterior": post})


class RandomWalk:
    r"""PMMH's parameter proposal :math:`z' = z + s L\xi`, :math:`\xi\sim N(0, I_D)` (module docstring).

    Args:
        step_size: initial scale :math:`s` (:math:`L = I` at the start).
        adapt: in warm-up, re-estimate :math:`LL^\top` from the chain's warm-up draws (Haario et al. 2001) and move
            :math:`\log s` by Robbins–Monro towards ``target_accept``; frozen after warm-up.
        target_accept: the acceptance rate the scale adaptation aims at (None: 0.2 for plain PMMH, whose noisy
            ratio makes smaller steps pay (Sherlock et al. 2015); 0.3 for correlated PMMH, closer to exact MH).
    """

    def __init__(self, step_size: float = 0.1, *, adapt: bool = True, target_accept: float | None = None):
        self.step_size = check_positive_float(step_size, "step_size")
        self.adapt = bool(adapt)
        if target_accept is not None and not (isinstance(target_accept, (int, float))
                                              and not isinstance(target_accept, bool) and 0.0 < target_accept < 1.0):
            raise ConfigurationError(f"target_accept must be None or in (0, 1); found {target_accept!r}.")
        self.target_accept = None if target_accept is None else float(target_accept)

    def target(self, correlated: bool) -> float:
        """The acceptance rate aimed at."""
        if self.target_accept is not None:
            return self.target_accept
        return 0.3 if correlated else 0.2

    def __repr__(self) -> str:
        return f"RandomWalk(step_size={self.step_size}, adapt={self.adapt}, target_accept={self.target_accept})"


class PMMH(ParameterSamplingMethod):
    r"""Particle-marginal Metropolis–Hastings over a Bayesian model's parameters (module docstring).

    Args:
        num_samples: kept draws per chain (after warm-up).
        num_chains: independent chains (run one after another).
        warmup: adaptation iterations per chain (discarded).
        num_particles: particles of each likelihood estimate.
        correlation: ``None`` (plain PMMH: fresh randomness per estimate) or :math:`\rho\in(0,1)`, the
            Crank–Nicolson correlation of the correlated pseudo-marginal method (e.g. 0.99).
        proposal: the particle filter's proposal for plain PMMH (default ``"auto"``: the fully adapted filter
            where the model declares it, else bootstrap). Correlated PMMH uses the bootstrap proposal on its
            normals.
        walk: the random-walk proposal and its warm-up adaptation, a :class:`RandomWalk` (default
            ``RandomWalk()``: step 0.1, adapted).
        init: ``"prior"`` (each chain starts at a prior draw: overdispersed, for R-hat) or ``"model"`` (at the
            model's start values, jittered by ``init_scale`` in the unconstrained space).
        init_scale: the jitter of ``init="model"``.
        keep_paths: also keep one latent path per draw (traced through the accepted filter's history).

    ``pr.infer(model, y, method=PMMH(...), seed=0)`` returns a :class:`~ppl_rnn.results.ParameterPosterior`:
    ``draws`` ``{site: (C, S, *shape)}``; ``sample_stats``: ``acceptance_rate`` (:math:`\min(1,\alpha)` of the move
    that led to the draw), ``accepted``, ``log_likelihood_estimate``, ``lp``, ``step_size``; ``log_likelihood``
    ``(C, S, B, T)`` the accepted filter's increments; ``diagnostics``: ``proposal_cov`` ``(C, D, D)``,
    ``acceptance_rate`` per chain, ``num_particles``, ``correlation``.
    """

    name = "pmmh"

    def __init__(self, num_samples: int = 1000, *, num_chains: int = 4, warmup: int = 500,
                 num_particles: int = 100, correlation: float | None = None, proposal="auto",
                 walk: RandomWalk | None = None, init: str = "prior", init_scale: float = 0.1,
                 keep_paths: bool = False):
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.warmup = check_positive_int(warmup, "warmup", minimum=0)
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if correlation is not None and not (isinstance(correlation, (int, float)) and not isinstance(correlation, bool)
                                            and 0.0 < correlation < 1.0):
            raise ConfigurationError(f"correlation must be None (plain PMMH) or a number in (0, 1), e.g. 0.99; "
                                     f"found {correlation!r}.")
        self.correlation = None if correlation is None else float(correlation)
        self.proposal = as_proposal(proposal)
        walk = RandomWalk() if walk is None else walk
        if not isinstance(walk, RandomWalk):
            raise ConfigurationError(f"walk must be a RandomWalk(step_size=..., adapt=..., target_accept=...); "
                                     f"found {walk!r}.")
        self.walk = walk
        if init not in ("prior", "model"):
            raise ConfigurationError(f"init must be 'prior' or 'model'; found {init!r}.")
        self.init = init
        self.init_scale = check_positive_float(init_scale, "init_scale", allow_zero=True)
        self.keep_paths = bool(keep_paths)

    # one estimate at z (with the chain's working model); -inf where the filter's weights degenerate
    def _estimate(self, space, work, data, z, aux, prop):
        space.load(work, z)
        try:
            if aux is None:
                rec = run_particle_filter(work, data, self.num_particles, proposal=prop, keep_history=self.keep_paths)
            else:
                rec = log_likelihood_estimate(work, data, self.num_particles, aux=aux, keep_history=self.keep_paths)
        except DegenerateWeightsError:
            return -math.inf, None
        ll = float(rec.log_evidence.sum())
        return (ll if math.isfinite(ll) else -math.inf), rec

    def _start(self, space, model, work, data, aux_fn, prop):
        for _ in range(100):
            if self.init == "prior":
                vals = {n: d.sample() for n, d in space.priors.items()}
                z = space.unconstrain(vals)
            else:
                z = space.to_unconstrained(model)
                z = z + self.init_scale * torch.randn_like(z)
            lp = float(space.log_prior(z))
            if not math.isfinite(lp):
                continue
            aux = aux_fn()
            ll, rec = self._estimate(space, work, data, z, aux, prop)
            if math.isfinite(ll):
                return z, lp, ll, rec, aux
        raise ConfigurationError(
            f"PMMH: no start with a finite likelihood estimate in 100 tries (init={self.init!r}); the filter's "
            f"weights degenerate. Use init='model' with a sensible model, or more particles (num_particles="
            f"{self.num_particles}).")

    def _chain(self, space, model, data, dtype):
        D = space.dim
        B, T = data.observations.shape[0], data.observations.shape[1]
        H = model.hidden_dim
        work = space.fixed(model)
        prop = self.proposal
        if isinstance(prop, Auto):
            prop = best_proposal(work, data).proposal
        rho = self.correlation
        aux_fn = (lambda: None) if rho is None else (
            lambda: AuxiliaryNormals.draw(T, self.num_particles, B, H, dtype))
        z, lp, ll, rec, aux = self._start(space, model, work, data, aux_fn, prop)
        L = torch.eye(D, dtype=torch.float64)
        log_s = math.log(self.walk.step_size)
        target = self.walk.target(rho is not None)
        n_total = self.warmup + self.num_samples
        hist = torch.empty((n_total, D), dtype=torch.float64)
        S = self.num_samples
        out_z = torch.empty((S, D), dtype=torch.float64)
        stats = {k: torch.empty(S, dtype=torch.float64) for k in
                 ("acceptance_rate", "log_likelihood_estimate", "lp", "step_size")}
        accepted = torch.zeros(S, dtype=torch.bool)
        pw = torch.empty((S, B, T), dtype=torch.float64)
        paths = torch.empty((S, B, T, H), dtype=dtype) if self.keep_paths else None
        path = _trace_path(rec) if self.keep_paths else None
        n_acc_warm = 0
        for it in range(n_total):
            s = math.exp(log_s)
            z_new = z + s * (L @ torch.randn(D, dtype=torch.float64))
            lp_new = float(space.log_prior(z_new))
            aux_new = None if rho is None else aux.crank_nicolson(rho)
            if math.isfinite(lp_new):
                ll_new, rec_new = self._estimate(space, work, data, z_new, aux_new, prop)
            else:
                ll_new, rec_new = -math.inf, None
            log_alpha = (ll_new + lp_new) - (ll + lp) if math.isfinite(ll_new) else -math.inf
            a = 1.0 if log_alpha >= 0 else math.exp(log_alpha)
            acc = bool(torch.rand(()).item() < a)
            if acc:
                z, lp, ll, rec, aux = z_new, lp_new, ll_new, rec_new, aux_new
                if self.keep_paths:
                    path = _trace_path(rec)
            hist[it] = z
            if it < self.warmup:
                n_acc_warm += acc
                if self.walk.adapt:
                    log_s += (a - target) / (it + 1) ** 0.6
                    if it >= 99 and (it + 1) % 50 == 0:
                        past = hist[(it + 1) // 2: it + 1]
                        cov = torch.cov(past.T).reshape(D, D) + 1e-6 * torch.eye(D, dtype=torch.float64)
                        try:
                            L = torch.linalg.cholesky(cov)
                        except RuntimeError:
                            pass
                continue
            k = it - self.warmup
            out_z[k] = z
            stats["acceptance_rate"][k] = a
            stats["log_likelihood_estimate"][k] = ll
            stats["lp"][k] = ll + lp
            stats["step_size"][k] = s
            accepted[k] = acc
            pw[k] = rec.log_lik.double()
            if paths is not None:
                paths[k] = path
        info = {"proposal_cov": (math.exp(log_s) ** 2) * (L @ L.T), "warmup_acceptance":
                n_acc_warm / max(1, self.warmup)}
        return out_z, stats, accepted, pw, paths, info

    def _infer(self, model, data, seed):
        t0 = time.perf_counter()
        space = ParameterSpace(model)
        dtype = data.observations.dtype
        chains = []
        with seeded(seed):
            for _ in range(self.num_chains):
                chains.append(self._chain(space, model, data, dtype))
        zs = torch.stack([c[0] for c in chains])  # (C, S, D)
        vals = space.values(zs)
        draws = {n: v.detach().to(dtype) for n, v in vals.items()}
        sample_stats = {k: torch.stack([c[1][k] for c in chains]) for k in chains[0][1]}
        sample_stats["accepted"] = torch.stack([c[2] for c in chains])
        acc_rate = sample_stats["accepted"].double().mean(1)
        return ParameterPosterior(
            draws=draws, sample_stats=sample_stats, method=self.name, model=model.copy(),
            paths=torch.stack([c[4] for c in chains]) if self.keep_paths else None,
            log_likelihood=torch.stack([c[3] for c in chains]),
            diagnostics={"proposal_cov": torch.stack([c[5]["proposal_cov"] for c in chains]),
                         "acceptance_rate": acc_rate, "num_particles": self.num_particles,
                         "correlation": self.correlation, "warmup": self.warmup,
                         "warmup_acceptance": [c[5]["warmup_acceptance"] for c in chains],
                         "unconstrained_draws": zs, "parameter_names": space.names},
            wall_time_s=time.perf_counter() - t0, evidence_kind="estimate")


__all__ = ["PMMH", "RandomWalk", "ParameterSamplingMethod", "AuxiliaryNormals", "CorrelatedProposal", "SortedSystematic",
           "log_likelihood_estimate", "hilbert_index", "sort_key"]
