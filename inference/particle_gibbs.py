r"""Particle Gibbs with ancestor sampling: a posterior over a model's parameters *and* its hidden paths.

The target is :math:`p(\theta, h_{0:T-1}\mid y) \propto p(\theta)\,p_\theta(h_{0:T-1}, y_{0:T-1})`, with
:math:`p(\theta)` the model's ``PyroSample`` priors (:mod:`ppl_rnn.priors`). One sweep alternates

1. **path | θ** — conditional SMC with ancestor sampling (CSMC-AS; Lindsten, Jordan & Schön 2014) on the one
   filter loop (:func:`~ppl_rnn.inference.smc.run_particle_filter` with ``reference=``): the last of :math:`N`
   particle slots is pinned to the current path :math:`x^\star`, every step resamples multinomially, and the
   reference's ancestor is redrawn with :math:`P(a_t = i)\propto W^i_{t-1} f_\theta(x^\star_t\mid h^i_{t-1})`
   (the same formula for the fully adapted proposal: the factor :math:`g(y_t\mid x^\star_t)` is common to all
   :math:`i`). The new path is drawn from the final weights and traced back through the ancestors
   (``path_sampling="ancestor"``), or by backward simulation, :math:`P(k_t = i)\propto W^i_t
   f_\theta(x_{t+1}\mid h^i_t)` (``"backward"``). The kernel leaves :math:`p_\theta(h\mid y)` invariant for every
   :math:`N\ge 2` (Andrieu, Doucet & Holenstein 2010); ancestor sampling lets the new path leave the reference
   at *every* step, so the chain mixes over the early steps even when :math:`T\gg N`, where plain CSMC's path
   degeneracy pins :math:`h_0` to the reference (the *PG update rate* at :math:`t` — the fraction of sweeps in
   which :math:`h_t` changed — collapses).
2. **θ | path** — in closed form where the model allows it: a noise scale whose prior is
   :func:`inverse_gamma_scale` (:math:`s^2\sim\text{InverseGamma}(a, b)`, the conjugate family) and which a probe
   finds to be one of the model's declared ``noise_scales`` is redrawn from its inverse-gamma full conditional
   (:func:`conjugate_noise_draw`); any other prior falls back to the generic step. The generic step, for the
   remaining coordinates, is a Metropolis-adjusted Hamiltonian step (HMC with ``leapfrog_steps`` leapfrog steps; one
   step is MALA) on the unconstrained parameters :math:`z` with the log-density

   .. math::
       \log\pi(z) = \log p(\theta(z)) + \log\lvert\det\partial\theta/\partial z\rvert + \log p_\theta(h, y)

   (:func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`, gradients by autograd). The step
   size is tuned during warm-up by dual averaging (Hoffman & Gelman 2014) towards ``target_accept`` and then
   frozen, so the post-warm-up chain is a fixed Markov kernel. The accept/reject step makes it exact for any
   step size; the mass matrix is the identity.

Chains run one after the other: a model's parameters are shared by its sequences, so chains cannot be
sequences of one batched filter without per-sequence parameters, which a model's conditionals need not
broadcast. Chain 0 starts at the model's start values, chain c > 0 there plus ``init_jitter`` times a standard
normal in the unconstrained space.

**Mixing.** Given the path, θ is much more concentrated than given y alone (here :math:`T = 60` already makes
the lag-one autocorrelation of the oracle's noise scales about 0.9-0.95 per sweep): the Gibbs coupling, not
the θ-step, limits the effective sample size; PMMH (:mod:`~ppl_rnn.inference.pmmh`) does not have it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions.transforms import PowerTransform

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DivergenceError, PplRnnError
from ppl_rnn.method import check_choice, check_positive_float, check_positive_int
from ppl_rnn.model import input_at
from ppl_rnn.priors import ParameterSpace
from ppl_rnn.results import ParameterPosterior
from ppl_rnn.rng import seeded

from .complete_data import complete_data_log_likelihood
from .pmmh import ParameterSamplingMethod
from .proposals import as_proposal, diag_normal
from .resampling import multinomial
from .smc import ParticleFilterRecord, run_particle_filter

_PATH_SAMPLING = ("ancestor", "backward")


def trace_path(record: ParticleFilterRecord, index: torch.Tensor) -> torch.Tensor:
    r"""The path ``(B,T,H)`` of final particles ``index (B,)`` traced back through the record's ancestors:
    :math:`k_{T-1} = ` ``index``, :math:`k_{t-1} = a^{k_t}_t`, path :math:`h^{k_t}_t`."""
    if record.particles is None:
        raise ConfigurationError("trace_path needs the filter's history; run it with keep_history=True.")
    P = record.particles  # (T,N,B,H)
    T, _, B, H = P.shape
    A = record.ancestors.cpu().numpy()  # (T,N,B): the index walk runs in NumPy (one small gather per step)
    cols = np.arange(B)
    ks = np.empty((T, B), dtype=np.int64)
    k = index.cpu().numpy().astype(np.int64)
    for t in range(T - 1, -1, -1):
        ks[t] = k
        if t > 0:
            k = A[t, k, cols]
    ks_t = torch.from_numpy(ks).to(P.device)
    steps = torch.arange(T, device=P.device).unsqueeze(1)
    return P[steps, ks_t, torch.arange(B, device=P.device)].transpose(0, 1).contiguous()


def backward_path(model, record: ParticleFilterRecord, data: Data) -> torch.Tensor:
    r"""One backward-simulation path ``(B,T,H)`` (Godsill, Doucet & West 2004): :math:`k_{T-1}\sim W_{T-1}`,
    :math:`P(k_t = i)\propto W^i_t f(h_{t+1}\mid h^i_t)` with the record's filtering weights."""
    if record.particles is None:
        raise ConfigurationError("backward_path needs the filter's history; run it with keep_history=True.")
    P, LW = record.particles, record.log_weights  # (T,N,B,H), (T,N,B)
    T, N, B, H = P.shape
    cols = torch.arange(B, device=P.device)
    u = data.inputs
    out = torch.empty((T, B, H), dtype=P.dtype, device=P.device)
    k = multinomial(LW[T - 1], 1)[0]
    out[T - 1] = P[T - 1, k, cols]
    with torch.no_grad():
        for t in range(T - 2, -1, -1):
            u_next = None if u is None else u[:, t + 1]
            lf = model.transition(t + 1, P[t], u_next).log_prob(out[t + 1].expand(N, B, H))
            k = multinomial(LW[t] + lf, 1)[0]
            out[t] = P[t, k, cols]
    return out.transpose(0, 1).contiguous()


def csmc_sweep(model, data: Data, reference: torch.Tensor | None, num_particles: int, *, proposal="auto",
               ancestor_sampling: bool = True, path_sampling: str = "ancestor"
               ) -> tuple[torch.Tensor, ParticleFilterRecord]:
    r"""One conditional SMC pass (module docstring) and the next path: ``(path (B,T,H), record)``.

    ``reference=None`` runs the unconditional filter (resampling every step) to draw a first path. Uses the
    global torch RNG (wrap in :func:`ppl_rnn.rng.seeded`)."""
    check_choice(path_sampling, "path_sampling", _PATH_SAMPLING)
    rec = run_particle_filter(model, data, num_particles, proposal=proposal, resampling="multinomial",
                              ess_threshold=1.0, keep_history=True, reference=reference,
                              ancestor_sampling=ancestor_sampling)
    if path_sampling == "backward":
        return backward_path(model, rec, data), rec
    k = multinomial(rec.final_log_weights, 1)[0]
    return trace_path(rec, k), rec


# ---- θ | path: the complete-data log-density and a Metropolis-adjusted Hamiltonian step -------------------
def _stacked_log_joint(model, path: torch.Tensor, data: Data) -> torch.Tensor:
    r""":math:`\sum_b \log p_\theta(h_b, y_b)` with every step's conditional evaluated in one batched call (time
    as a leading batch dim; the transition at ``t = 1`` stands for every :math:`t\ge1`)."""
    y, mask, u = data.observations, data.mask, data.inputs
    B = y.shape[0]
    h = path.to(model.dtype).transpose(0, 1)  # (T,B,H)
    uT = None if u is None else u.transpose(0, 1)
    lh = model.initial_batched(input_at(u, 0), (B,)).log_prob(h[0]).sum()
    if h.shape[0] > 1:
        lh = lh + model.transition(1, h[:-1], None if uT is None else uT[1:]).log_prob(h[1:]).sum()
    ly = model.observation_log_prob(0, h, y.transpose(0, 1), mask.transpose(0, 1), uT).sum()
    return lh + ly


def _looped_log_joint(model, path: torch.Tensor, data: Data) -> torch.Tensor:
    return complete_data_log_likelihood(model, path.unsqueeze(0), data).sum()


def log_joint_function(model, path: torch.Tensor, data: Data):
    r"""The fastest exact evaluator of :math:`\log p_\theta(h, y)` for ``model``: the time-stacked one
    (:func:`_stacked_log_joint`, one call per conditional instead of one per step) when it reproduces the
    step-by-step value (:func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`) on ``path`` —
    it does for any model whose conditionals read ``t`` only through ``u_t`` and broadcast over leading dims —
    else the step-by-step one."""
    with torch.no_grad():
        ref = _looped_log_joint(model, path, data)
        try:
            fast = _stacked_log_joint(model, path, data)
        except Exception:  # noqa: BLE001 - a model that does not broadcast over time: the loop serves
            return _looped_log_joint
    tol = 1e-4 * (1.0 + abs(float(ref))) if model.dtype == torch.float32 else 1e-9 * (1.0 + abs(float(ref)))
    if fast.shape == ref.shape and abs(float(fast) - float(ref)) <= tol:
        return _stacked_log_joint
    return _looped_log_joint


class HMCStep:
    r"""The θ-step of :class:`ParticleGibbs`: Hamiltonian Monte Carlo with ``leapfrog_steps`` leapfrog steps of
    size :math:`\varepsilon` and a diagonal mass matrix :math:`M = \operatorname{diag}(m)^{-1}` on the
    unconstrained parameters (momentum :math:`p\sim N(0, M)`, position step :math:`\varepsilon\, m\odot p`,
    kinetic energy :math:`\tfrac12\sum_i m_i p_i^2`; ``leapfrog_steps=1`` is MALA), accepted with probability
    :math:`\min(1, e^{-\Delta E})`. During warm-up :math:`\log\varepsilon` is tuned by dual averaging (Hoffman &
    Gelman 2014, algorithm 5: :math:`\gamma = 0.05`, :math:`t_0 = 10`, :math:`\kappa = 0.75`) so that the mean
    acceptance probability approaches ``target_accept``, and (``adapt_mass``) :math:`m` is set once to the
    regularised variances of the draws of the middle half of warm-up (Stan's
    :math:`\tfrac{n}{n+5}\hat\sigma^2 + 10^{-3}\tfrac{5}{n+5}`), after which dual averaging restarts; after
    warm-up both are frozen.

    Args:
        step_size: initial :math:`\varepsilon`.
        leapfrog_steps: leapfrog steps per proposal.
        target_accept: the warm-up's target acceptance probability.
        adapt_mass: adapt the diagonal mass matrix in warm-up (else the identity).
    """

    def __init__(self, *, step_size: float = 0.1, leapfrog_steps: int = 3, target_accept: float = 0.75,
                 adapt_mass: bool = True):
        self.step_size = check_positive_float(step_size, "step_size")
        self.leapfrog_steps = check_positive_int(leapfrog_steps, "leapfrog_steps")
        target_accept = check_positive_float(target_accept, "target_accept")
        if not target_accept < 1:
            raise ConfigurationError(f"target_accept must be in (0, 1); found {target_accept!r}.")
        self.target_accept = target_accept
        if not isinstance(adapt_mass, bool):
            raise ConfigurationError(f"adapt_mass must be True or False; found {adapt_mass!r}.")
        self.adapt_mass = adapt_mass

    def __repr__(self) -> str:
        return (f"HMCStep(step_size={self.step_size}, leapfrog_steps={self.leapfrog_steps}, "
                f"target_accept={self.target_accept}, adapt_mass={self.adapt_mass})")

    def init_state(self) -> dict:
        eps = self.step_size
        return {"log_eps": math.log(eps), "mu": math.log(10 * eps), "h_bar": 0.0, "log_eps_bar": 0.0, "m": 0,
                "inv_mass": None}

    def set_mass(self, state: dict, draws: torch.Tensor) -> None:
        """Set the inverse mass :math:`m` from warm-up draws ``(n, D)`` and restart dual averaging there."""
        n = draws.shape[0]
        if n < 2:
            return
        var = draws.double().var(0)
        state["inv_mass"] = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
        state.update(mu=state["log_eps"] + math.log(10.0), h_bar=0.0, log_eps_bar=0.0, m=0)

    def step(self, z: torch.Tensor, log_density, state: dict, generator=None) -> tuple[torch.Tensor, dict]:
        r"""One HMC transition from ``z`` ``(D,)`` targeting ``log_density(z) -> (value, grad)``; returns the new
        ``z`` and ``{"accept_prob", "accepted", "step_size"}``."""
        eps = math.exp(state["log_eps"])
        inv_m = state.get("inv_mass")
        if inv_m is None:
            inv_m = torch.ones(z.shape, dtype=z.dtype)
        lp0, g0 = log_density(z)
        p0 = torch.randn(z.shape, dtype=z.dtype, generator=generator) / inv_m.sqrt()  # N(0, M)
        zz, p, g = z, p0 + 0.5 * eps * g0, g0
        lp = lp0
        for i in range(self.leapfrog_steps):
            zz = zz + eps * inv_m * p
            lp, g = log_density(zz)
            if not math.isfinite(float(lp)):
                break
            if i < self.leapfrog_steps - 1:
                p = p + eps * g
        p = p + 0.5 * eps * g
        log_ratio = float(lp - lp0) - 0.5 * float((inv_m * (p.square() - p0.square())).sum())
        accept_prob = math.exp(min(0.0, log_ratio)) if math.isfinite(log_ratio) else 0.0
        u = float(torch.rand((), dtype=torch.float64, generator=generator))
        accepted = u < accept_prob
        return (zz.detach() if accepted else z), {"accept_prob": accept_prob, "accepted": accepted,
                                                  "step_size": eps, "lp": float(lp if accepted else lp0)}

    def adapt(self, state: dict, accept_prob: float) -> None:
        """One dual-averaging update of the step size (warm-up only)."""
        gamma, t0, kappa = 0.05, 10.0, 0.75
        state["m"] += 1
        m = state["m"]
        state["h_bar"] = (1 - 1 / (m + t0)) * state["h_bar"] + (self.target_accept - accept_prob) / (m + t0)
        state["log_eps"] = state["mu"] - math.sqrt(m) / gamma * state["h_bar"]
        w = m ** (-kappa)
        state["log_eps_bar"] = w * state["log_eps"] + (1 - w) * state["log_eps_bar"]

    def freeze(self, state: dict) -> None:
        """End of warm-up: use the averaged step size from now on."""
        if state["m"] > 0:
            state["log_eps"] = state["log_eps_bar"]


# ---- θ | path in closed form: noise scales under their conjugate prior ---------------------------------------
def inverse_gamma_scale(concentration, rate) -> dist.Distribution:
    r"""A prior on a noise standard deviation :math:`s` with :math:`s^2\sim\text{InverseGamma}(a, b)`
    (``concentration`` :math:`a`, ``rate`` :math:`b`): the conjugate prior of a Gaussian noise variance, which
    :class:`ParticleGibbs` updates in closed form, e.g. ``model.r = PyroSample(inverse_gamma_scale(3., 0.5))``."""
    a = torch.as_tensor(concentration, dtype=torch.get_default_dtype())
    b = torch.as_tensor(rate, dtype=a.dtype)
    return dist.TransformedDistribution(dist.InverseGamma(a, b), [PowerTransform(torch.tensor(0.5, dtype=a.dtype))])


def _inverse_gamma_scale_params(prior) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, b)`` (site-shaped) when ``prior`` is :func:`inverse_gamma_scale` (possibly expanded, made an
    event), else None: the conjugate step requires exactly this family."""
    d = prior
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    if not isinstance(d, torch.distributions.TransformedDistribution) or len(d.transforms) != 1:
        return None
    tr = d.transforms[0]
    if not isinstance(tr, PowerTransform) or not bool(torch.all(torch.as_tensor(tr.exponent) == 0.5)):
        return None
    if not isinstance(d.base_dist, torch.distributions.InverseGamma):
        return None
    shape = prior.batch_shape + prior.event_shape
    return (d.base_dist.concentration.double().expand(shape), d.base_dist.rate.double().expand(shape))


def _role_terms(model, role: str, path: torch.Tensor, data: Data):
    r"""``(loc, scale, x, mask)`` of the diagonal Gaussian conditional that noise ``role`` belongs to, stacked
    over time (``obs``: :math:`y_t\mid h_t`; ``process``: :math:`h_t\mid h_{t-1}`, :math:`t\ge1`; ``initial``:
    :math:`h_0`), or None when that conditional is not ``Normal(loc, scale).to_event(1)``."""
    y, mask, u = data.observations, data.mask, data.inputs
    h = path.to(model.dtype).transpose(0, 1)  # (T,B,H)
    uT = None if u is None else u.transpose(0, 1)
    if role == "obs":
        d, x, m = model.emission(0, h, uT), y.transpose(0, 1), mask.transpose(0, 1)
    elif role == "process":
        if h.shape[0] < 2:
            return None
        d, x, m = model.transition(1, h[:-1], None if uT is None else uT[1:]), h[1:], None
    elif role == "initial":
        d, x, m = model.initial_batched(input_at(u, 0), (h.shape[1],)), h[0], None
    else:
        return None
    g = diag_normal(d)
    if g is None:
        return None
    loc, scale = g
    return loc, scale, x, (torch.ones_like(x, dtype=torch.bool) if m is None else m)


def conjugate_noise_sites(space: ParameterSpace, work, z: torch.Tensor, path: torch.Tensor, data: Data) -> dict:
    r"""``{site: role}`` of the prior sites :class:`ParticleGibbs` draws in closed form: the site's prior is
    :func:`inverse_gamma_scale`, the model declares ``noise_scales``, and a probe shows the site *is* that role's
    noise: doubling the site's value doubles ``noise_scales()[role]`` (and no other role) and the scale of the
    role's diagonal Gaussian conditional, and leaves that conditional's mean unchanged. ``work`` is restored to
    ``z``. No parameter is identified by its name."""
    if capability(work, "noise_scales") is None:
        return {}
    out = {}
    vals = {n: v.detach() for n, v in space.values(z).items()}
    with torch.no_grad():
        for name in space.names:
            if _inverse_gamma_scale_params(space.priors[name]) is None:
                continue
            space.load(work, z)
            before = {k: v.detach().clone() for k, v in capability(work, "noise_scales")().items()}
            space.load(work, space.unconstrain({**vals, name: 2 * vals[name]}))
            after = capability(work, "noise_scales")()
            roles = [k for k in before if k in after and not torch.equal(before[k], after[k])]
            if len(roles) != 1 or before[roles[0]].shape != vals[name].shape:
                continue
            role = roles[0]
            if not torch.allclose(after[role], 2 * before[role]):
                continue
            t2 = _role_terms(work, role, path, data)
            space.load(work, z)
            t1 = _role_terms(work, role, path, data)
            if t1 is None or t2 is None:
                continue
            if torch.allclose(t1[0], t2[0]) and torch.allclose(t2[1], 2 * t1[1]) and torch.allclose(
                    t1[1], before[role].to(t1[1].dtype).expand_as(t1[1])):
                out[name] = role
    space.load(work, z)
    return out


def conjugate_noise_draw(space: ParameterSpace, work, z: torch.Tensor, sites: dict, path: torch.Tensor,
                         data: Data) -> torch.Tensor:
    r"""``z`` with every conjugate site redrawn from its full conditional: for unit :math:`k` of role noise
    :math:`s` with :math:`s_k^2\sim\text{InverseGamma}(a_k, b_k)`,

    .. math:: s_k^2\mid h, y \sim \text{InverseGamma}\Big(a_k + \tfrac{n_k}{2},\ b_k + \tfrac12\sum (x - \mu)_k^2\Big)

    over the :math:`n_k` observed terms :math:`x` of that conditional (residuals about its mean :math:`\mu`, which
    does not involve :math:`s`)."""
    vals = {n: v.detach() for n, v in space.values(z).items()}
    with torch.no_grad():
        space.load(work, z)
        for name, role in sites.items():
            a, b = _inverse_gamma_scale_params(space.priors[name])
            loc, _, x, m = _role_terms(work, role, path, data)
            r2 = torch.where(m, (x - loc).double().square(), 0.0)
            K = r2.shape[-1]
            ss, n = r2.reshape(-1, K).sum(0), m.double().reshape(-1, K).sum(0)  # per unit (K,)
            if a.shape != (K,):  # one scale shared by every unit
                ss, n = ss.sum().expand(a.shape), n.sum().expand(a.shape)
            v = 1.0 / torch.distributions.Gamma(a + 0.5 * n, b + 0.5 * ss).sample()
            vals[name] = v.sqrt().to(vals[name].dtype)
    return space.unconstrain(vals)


class ParticleGibbs(ParameterSamplingMethod):
    r"""Particle Gibbs with ancestor sampling over a Bayesian model's parameters and hidden paths (module
    docstring). ``pr.infer(model, y, method=ParticleGibbs(...), seed=0)`` returns a
    :class:`~ppl_rnn.results.ParameterPosterior` (``pr.fit`` a FitResult holding it, as for
    :class:`~ppl_rnn.inference.pmmh.PMMH`, so it sits in ``pr.compare``).

    Args:
        num_samples: draws kept per chain (after warm-up).
        num_chains: chains (run one after the other; chain ``c`` starts at the model's start values plus
            ``init_jitter`` times a standard normal in the unconstrained space, chain 0 without jitter).
        num_particles: particles of the conditional SMC (N >= 2).
        warmup: sweeps discarded per chain while the step size adapts (default ``num_samples // 2``).
        ancestor_sampling: redraw the reference's ancestor at every step (else plain conditional SMC).
        proposal: ``"auto"`` (fully adapted where the model declares it, else bootstrap), ``"bootstrap"`` or
            ``"adapted"``.
        path_sampling: ``"ancestor"`` (trace the drawn final particle back) or ``"backward"`` (backward
            simulation).
        theta_step: the θ | path move, an :class:`HMCStep` (default ``HMCStep()``).
        keep_paths: keep every draw's path in the result (``paths``, ``(C, S, B, T, H)``).
        init_jitter: spread of the chains' starts (unconstrained space).

    ``sample_stats``: ``accept_prob`` and ``accepted`` (θ-step), ``step_size``, ``log_likelihood_estimate``
    (the conditional filter's :math:`\log\hat p(y\mid\theta)` at the draw's θ: its particle system contains the
    reference, so it is not PMMH's unbiased estimate), ``lp`` (:math:`\log p(\theta) + \log p_\theta(h, y)` at the
    draw's θ and the path its θ-step was conditioned on), and ``pg_update`` ``(C, S, T)``: the fraction of sequences whose path at :math:`t` changed in that
    sweep; its mean over draws is the PG update rate per time step (``diagnostics["pg_update_rate"]``,
    ``(T,)``). ``log_likelihood`` holds the conditional filter's increments. ``diagnostics``:
    ``conjugate_sites`` (``{site: noise role}`` drawn in closed form), ``log_joint`` (``"time-stacked"`` or
    ``"step-by-step"`` evaluation of :math:`\log p_\theta(h, y)`), ``sweep_seconds`` ``(C, warmup + S)``.
    """

    name = "particle_gibbs"

    def __init__(self, num_samples: int = 500, *, num_chains: int = 4, num_particles: int = 100,
                 warmup: int | None = None, ancestor_sampling: bool = True, proposal="auto",
                 path_sampling: str = "ancestor", theta_step: HMCStep | None = None, keep_paths: bool = False,
                 init_jitter: float = 0.5):
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.num_particles = check_positive_int(num_particles, "num_particles", minimum=2)
        self.warmup = self.num_samples // 2 if warmup is None else check_positive_int(warmup, "warmup", minimum=0)
        if not isinstance(ancestor_sampling, bool):
            raise ConfigurationError(f"ancestor_sampling must be True or False; found {ancestor_sampling!r}.")
        self.ancestor_sampling = ancestor_sampling
        prop = as_proposal(proposal)
        if getattr(prop, "name", None) not in ("auto", "bootstrap", "adapted"):
            raise ConfigurationError(
                f"proposal must be 'auto', 'bootstrap' or 'adapted' (conditional SMC pins a particle, so its weight "
                f"may not involve a proposal density); found {proposal!r}.")
        self.proposal = prop
        self.path_sampling = check_choice(path_sampling, "path_sampling", _PATH_SAMPLING)
        if theta_step is not None and not isinstance(theta_step, HMCStep):
            raise ConfigurationError(f"theta_step must be an HMCStep(...) or None; found {theta_step!r}.")
        self.theta_step = HMCStep() if theta_step is None else theta_step
        self.keep_paths = bool(keep_paths)
        self.init_jitter = check_positive_float(init_jitter, "init_jitter", allow_zero=True)

    def _infer(self, model, data, seed):
        t_start = time.perf_counter()
        space = ParameterSpace(model)
        with seeded(seed):
            chains = [self._chain(model, data, space, c) for c in range(self.num_chains)]
        draws = {n: torch.stack([ch["draws"][n] for ch in chains]) for n in space.names}
        stats = {k: torch.stack([ch["stats"][k] for ch in chains]) for k in chains[0]["stats"]}
        paths = torch.stack([ch["paths"] for ch in chains]) if self.keep_paths else None
        loglik = torch.stack([ch["log_lik"] for ch in chains])
        return ParameterPosterior(
            draws=draws, sample_stats=stats, method=self.name, model=model, paths=paths, log_likelihood=loglik,
            diagnostics={"pg_update_rate": stats["pg_update"].mean((0, 1)), "warmup": self.warmup,
                         "num_particles": self.num_particles, "proposal": chains[0]["proposal"],
                         "log_joint": chains[0]["log_joint"], "chains": "sequential",
                         "conjugate_sites": chains[0]["conjugate_sites"],
                         "sweep_seconds": torch.stack([ch["sweep_seconds"] for ch in chains])},
            wall_time_s=time.perf_counter() - t_start, evidence_kind="estimate")

    def _chain(self, model, data: Data, space: ParameterSpace, c: int) -> dict:
        z = space.to_unconstrained(model)
        if c > 0 and self.init_jitter > 0:
            z = z + self.init_jitter * torch.randn(z.shape, dtype=z.dtype)
        work = space.fixed(model, z)
        data = Data(data.observations.to(work.dtype), data.mask,
                    None if data.inputs is None else data.inputs.to(work.dtype))
        N, S, W = self.num_particles, self.num_samples, self.warmup
        path, rec = csmc_sweep(work, data, None, N, proposal=self.proposal, path_sampling=self.path_sampling)
        log_joint = log_joint_function(work, path, data)
        # noise scales with their conjugate prior are drawn in closed form (needs the time-stacked conditionals)
        conj = conjugate_noise_sites(space, work, z, path, data) if log_joint is _stacked_log_joint else {}
        in_conj = torch.zeros(space.dim, dtype=torch.bool)
        vals0 = {n: v.detach() for n, v in space.values(z).items()}
        for name in conj:
            in_conj |= space.unconstrain({**vals0, name: 2 * vals0[name]}) != z
        free = torch.nonzero(~in_conj).flatten()

        def log_density(zz):
            zz = zz.detach().requires_grad_(True)
            with torch.enable_grad(), pyro.validation_enabled(False):
                try:
                    lp = space.log_prior(zz) + log_joint(space.load(work, zz), path, data).to(zz.dtype)
                except ValueError as err:  # parameters off the support in float (e.g. a scale underflowing to 0)
                    if isinstance(err, PplRnnError):  # the library's own errors are not a rejection
                        raise
                    lp = torch.tensor(-math.inf, dtype=zz.dtype)
                if not bool(torch.isfinite(lp)):
                    return lp.detach(), torch.zeros_like(zz)
                (g,) = torch.autograd.grad(lp, zz)
            return lp.detach(), g

        hmc = self.theta_step
        state = hmc.init_state()
        B, T = data.observations.shape[:2]
        keep = {n: [] for n in space.names}
        stats = {k: [] for k in ("accept_prob", "accepted", "step_size", "log_likelihood_estimate", "lp",
                                 "pg_update")}
        paths, log_liks = [], []
        sweep_seconds = []
        # warm-up windows: [0, W/4) step size; [W/4, 3W/4) also collect draws for the mass matrix; at 3W/4 set
        # it and restart the step size's dual averaging; W: freeze both
        mass_from, mass_at = (W // 4, (3 * W) // 4) if hmc.adapt_mass and W >= 20 else (W, W)
        mass_draws = []
        for i in range(W + S):
            t_sweep = time.perf_counter()
            if i == mass_at and mass_draws:
                hmc.set_mass(state, torch.stack(mass_draws))
            if i == W:
                hmc.freeze(state)
            if conj:
                z = conjugate_noise_draw(space, work, z, conj, path, data)
            if free.numel() == space.dim:
                z, info = hmc.step(z, log_density, state)
            elif free.numel() > 0:  # HMC on the other coordinates, the conjugate ones held at their new draw

                def log_density_free(zf, base=z):
                    full = base.clone()
                    full[free] = zf
                    lp, g = log_density(full)
                    return lp, g[free]

                zf, info = hmc.step(z[free], log_density_free, state)
                z = z.clone()
                z[free] = zf
            else:
                with torch.no_grad():
                    lp = space.log_prior(z) + log_joint(space.load(work, z), path, data).to(z.dtype)
                info = {"accept_prob": 1.0, "accepted": True, "step_size": 0.0, "lp": float(lp)}
            if i < W and free.numel() > 0:
                hmc.adapt(state, info["accept_prob"])
                if mass_from <= i < mass_at:
                    mass_draws.append(z[free].detach().clone())
            with torch.no_grad():
                space.load(work, z)
            if not all(bool(torch.isfinite(v).all()) for v in space.values(z).values()):
                raise DivergenceError(f"particle Gibbs chain {c}: the parameters became non-finite at sweep {i}; "
                                      "lower HMCStep(step_size=...) or check the priors.")
            new_path, rec = csmc_sweep(work, data, path, N, proposal=self.proposal,
                                       ancestor_sampling=self.ancestor_sampling, path_sampling=self.path_sampling)
            changed = (new_path != path).any(-1).to(torch.float64).mean(0)  # (T,)
            path = new_path
            if i >= W:
                for n, v in space.values(z).items():
                    keep[n].append(v.detach())
                stats["accept_prob"].append(info["accept_prob"])
                stats["accepted"].append(float(info["accepted"]))
                stats["step_size"].append(info["step_size"])
                stats["log_likelihood_estimate"].append(float(rec.log_evidence.sum()))
                stats["lp"].append(info["lp"])
                stats["pg_update"].append(changed)
                log_liks.append(rec.log_lik.detach().clone())
                if self.keep_paths:
                    paths.append(path.clone())
            sweep_seconds.append(time.perf_counter() - t_sweep)
        out_stats = {k: (torch.stack(v) if k == "pg_update" else torch.tensor(v, dtype=torch.float64))
                     for k, v in stats.items()}
        return {"draws": {n: torch.stack(v) for n, v in keep.items()}, "stats": out_stats,
                "paths": torch.stack(paths) if self.keep_paths else None, "log_lik": torch.stack(log_liks),
                "proposal": rec.proposal, "sweep_seconds": torch.tensor(sweep_seconds, dtype=torch.float64),
                "log_joint": "time-stacked" if log_joint is _stacked_log_joint else "step-by-step",
                "conjugate_sites": conj}


__all__ = ["ParticleGibbs", "HMCStep", "trace_path", "backward_path", "csmc_sweep", "log_joint_function",
           "inverse_gamma_scale", "conjugate_noise_sites", "conjugate_noise_draw"]
