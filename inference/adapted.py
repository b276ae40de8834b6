r"""The fully adapted auxiliary particle filter's proposal, and ``proposal="auto"``.

**Model structure used.** A Gaussian transition and a linear-Gaussian emission (declared capability
``linear_gaussian_emission``; given :math:`u_t`):

.. math::
    h_t\mid h_{t-1} \sim N(\mu, Q),\ \mu = f_t(h_{t-1}),\ Q = L L^\top, \qquad
    y_t\mid h_t \sim N(C h_t + d, R)

(:math:`f_t` may be any nonlinear function; :math:`Q` may depend on :math:`h_{t-1}`; at :math:`t = 0`,
:math:`p(h_0) = N(m_0, P_0)` plays the part of the transition). Let :math:`M = \operatorname{diag}(m_t)`
select the observed entries, :math:`\tilde C = M C` and

.. math::
    \tilde S = \tilde C Q \tilde C^\top + M R M + (I - M),\qquad e = M (y_t - C\mu - d).

:math:`\tilde S` equals the innovation covariance :math:`C_o Q C_o^\top + R_{oo}` on the observed block and the
identity on the missing one, so with its Cholesky factor :math:`\Lambda` (scalar formulas when ``D = 1``):

* **predictive likelihood** (exact, closed form, conditions only on observed entries; 0 for a fully missing
  step): :math:`\log p(y_{t,o}\mid h_{t-1}) = -\tfrac12\lVert\Lambda^{-1}e\rVert^2 - \sum_i\log\Lambda_{ii}
  - \tfrac{n_o}2\log 2\pi`;
* **exact conditional draw** :math:`h_t\sim p(h_t\mid h_{t-1}, y_{t,o}) = N\big(\mu + K e,\ Q - K\tilde C Q\big)`,
  :math:`K = Q\tilde C^\top\tilde S^{-1}`, by Matheron's rule (pathwise conditioning): draw
  :math:`h' = \mu + L\varepsilon`, :math:`y' = C h' + d + R^{1/2}\varepsilon'` and set
  :math:`h_t = h' + K M (y_t - y')`. Its covariance is :math:`Q - 2K\tilde CQ + K(\tilde C Q\tilde C^\top + MRM)K^\top
  = Q - K\tilde C Q` exactly (the missing block contributes nothing since :math:`\tilde S^{-1}\tilde C` has zero
  rows there). No covariance is ever formed by subtraction and no :math:`H\times H` matrix is factorised: only
  the :math:`D\times D` :math:`\tilde S = G G^\top + \dots` (:math:`G = \tilde C L`, a Gram matrix plus a positive
  definite :math:`R`, so positive definite in float32 too), which is why it is sound at
  :math:`r = 0.003`.

**The filter** (:func:`~ppl_rnn.inference.smc.run_particle_filter` with this proposal; normalised
:math:`\ell^n_{t-1}`): :math:`\hat\ell^n = \ell^n_{t-1} + \log p(y_t\mid h^n_{t-1})`; evidence increment
:math:`\log\hat p(y_t\mid y_{0:t-1}) = \operatorname{logsumexp}_n\hat\ell^n` (so :math:`\hat Z = \prod_t\sum_n
W^n_{t-1}p(y_t\mid h^n_{t-1})` is unbiased, Pitt & Shephard 1999; Chopin & Papaspiliopoulos 2020, ch. 10);
normalise; if :math:`\mathrm{ESS}(\hat\ell) < \tau N` resample ancestors on :math:`\hat\ell` (weights become
uniform), else keep them; draw :math:`h^n_t\sim p(h_t\mid h^{a^n}_{t-1}, y_t)`. The weighted cloud
:math:`(h^n_t, \ell^n_t)` targets :math:`p(h_t\mid y_{0:t})` and the pair (ancestor, particle) has the joint
weight :math:`W^{a}_{t-1} p(h_t\mid h^a_{t-1}) p(y_t\mid h_t)`, so FFBSi, backward MCMC (started at the
genealogy's ancestor) and FFBSm read the history exactly as they read the bootstrap filter's.

**proposal="auto"**: :func:`~ppl_rnn.inference.smc.best_proposal` chooses this proposal whenever the
transition and initial law are Gaussian and the emission is declared linear-Gaussian (and
``observation_log_prob`` is not overridden): its weights are exact and its draws exact, so no proposal has a
lower variance per particle, and its step costs little more than the bootstrap filter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from torch.distributions import MultivariateNormal

from ppl_rnn.capabilities import capability, require
from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.gaussian import psd_cholesky

from .resampling import take

_NORMAL_TYPES = (torch.distributions.Normal, pyro.distributions.Normal)
_INDEPENDENT_TYPES = (torch.distributions.Independent, pyro.distributions.Independent)
_LOG_2PI = math.log(2 * math.pi)


def _shared(x: torch.Tensor, lead: int) -> torch.Tensor:
    """Drop the leading (particle) dim of ``x`` when it is a broadcast view (stride 0) and ``x`` has more than
    ``lead`` dims: a scale shared by all particles is then factorised once, not once per particle."""
    if x.dim() > lead and x.shape[0] > 1 and x.stride(0) == 0:
        return x[:1]
    return x


def gaussian_factor(d) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(loc, factor, diagonal)`` of a Gaussian ``d``: ``Normal(loc, scale).to_event(1)`` gives the scale vector
    (``diagonal=True``), ``MultivariateNormal`` its ``scale_tril``; anything else None."""
    if isinstance(d, _INDEPENDENT_TYPES) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist,
                                                                                              _NORMAL_TYPES):
        return d.base_dist.loc, d.base_dist.scale, True
    if isinstance(d, MultivariateNormal):
        return d.loc, d._unbroadcasted_scale_tril, False
    return None


def _apply(C: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``C h`` for ``C (D,H)`` (one matrix product) or ``C (..., D, H)`` (batched) and ``h (..., H)``."""
    if C.dim() == 2:
        return h @ C.T
    return (C @ h.unsqueeze(-1)).squeeze(-1)


@dataclass
class _Step:
    """What the draw needs from :meth:`FullyAdaptedProposal.predictive` (shapes in its docstring)."""

    mu: torch.Tensor  # (P,B,H)
    factor: torch.Tensor  # diag (...,H) or full (...,H,H)
    diagonal: bool
    G: torch.Tensor  # (...,B,D,H) = M C L
    chol: torch.Tensor | None  # (...,B,D,D) Cholesky of S~ (D > 1)
    s: torch.Tensor | None  # (...,B) S~ (D == 1)
    C: torch.Tensor  # (...,D,H)
    y_off: torch.Tensor  # (B,D) y - d (masked entries 0)
    R_chol: torch.Tensor  # (D,D)
    mf: torch.Tensor  # (B,D) mask as 0/1
    per_particle: bool  # whether factor/G/chol/s carry the particle dim


class FullyAdapted:
    r"""Exact predictive weights :math:`p(y_t\mid h_{t-1})` and exact draws from :math:`p(h_t\mid h_{t-1}, y_t)`
    (module docstring). Needs the model capability ``linear_gaussian_emission`` and Gaussian
    ``initial``/``transition`` laws (``transition_loc_scale`` or a ``Normal(...).to_event(1)`` /
    ``MultivariateNormal`` distribution). Use ``ParticleFilter(proposal=FullyAdapted())`` (or ``"auto"``)."""

    name = "adapted"
    #: the filter resamples on the predictive weights before propagating (see smc.run_particle_filter)
    adapted = True

    def __init__(self, num_particles: int | None = None):
        self.num_particles = num_particles
        self._lge = self._tr_ls = None

    def setup(self, model, data, num_particles):
        self.num_particles = num_particles
        self._lge = require(model, "linear_gaussian_emission", needed_by="the fully adapted particle filter",
                            alternative="use proposal='ekf' or 'bootstrap' (or 'auto', which picks one)")
        self._tr_ls = capability(model, "transition_loc_scale")

    def _prior(self, model, t, h_prev, u_t, B):
        if h_prev is None:
            d = model.initial_batched(u_t, (B,))
            g = gaussian_factor(d)
            role = "initial"
        elif self._tr_ls is not None:
            loc, scale = self._tr_ls(t, h_prev, u_t)
            g = (loc, scale, True)
            role = "transition"
        else:
            d = model.transition(t, h_prev, u_t)
            g = gaussian_factor(d)
            role = "transition"
        if g is None:
            raise ModelCapabilityError(
                f"the fully adapted particle filter needs a Gaussian {role} law (Normal(loc, scale).to_event(1) or "
                f"MultivariateNormal); {type(model).__name__}.{role}() returned {type(d).__name__} at step {t}. "
                "Use proposal='bootstrap' (any distributions).")
        loc, factor, diagonal = g
        if h_prev is None:
            loc = loc.unsqueeze(0)  # (1,B,H): every particle shares p(h_0)
        elif loc.shape != h_prev.shape:
            loc = loc.expand(h_prev.shape)
        factor = _shared(factor, 2 if diagonal else 3)
        return loc, factor, diagonal

    def predictive(self, model, t, h_prev, y_t, mask_t, u_t):
        r"""``(log_pred, step)``: :math:`\log p(y_{t,o}\mid h^n_{t-1})` ``(P,B)`` (``P = 1`` at t = 0, where every
        particle shares :math:`p(h_0)`; ``P = N`` after) and what :meth:`sample` needs."""
        B, D = y_t.shape
        mu, factor, diagonal = self._prior(model, t, h_prev, u_t, B)
        C, off, R = self._lge(t, u_t)
        mf = mask_t.to(mu.dtype)
        y_off = torch.where(mask_t, y_t - off, 0.0)  # (B,D)
        Ct = C * mf.unsqueeze(-1)  # (B,D,H) observed rows only
        G = Ct * factor.unsqueeze(-2) if diagonal else Ct @ factor  # (...,B,D,H)
        e = (y_off - _apply(C, mu)) * mf  # (P,B,D)
        n_obs = mf.sum(-1)  # (B,)
        R = R.to(mu.dtype)
        if D == 1:
            s = G.square().sum(-1)[..., 0] + mf[:, 0] * R[0, 0] + (1.0 - mf[:, 0])  # (...,B)
            log_pred = -0.5 * (e[..., 0].square() / s + s.log() + n_obs * _LOG_2PI)
            chol = None
        else:
            S = G @ G.transpose(-1, -2) + R * (mf.unsqueeze(-1) * mf.unsqueeze(-2)) + torch.diag_embed(1.0 - mf)
            chol, info = torch.linalg.cholesky_ex(S)
            if bool((info > 0).any()):
                chol = psd_cholesky(S)
            z = torch.linalg.solve_triangular(chol, e.unsqueeze(-1), upper=False).squeeze(-1)
            logdet = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
            log_pred = -0.5 * z.square().sum(-1) - logdet - 0.5 * n_obs * _LOG_2PI
            s = None
        if log_pred.dim() == 1:
            log_pred = log_pred.unsqueeze(0)
        R_chol = torch.linalg.cholesky(R) if D > 1 else R.clamp_min(0).sqrt()
        per_particle = factor.dim() > (2 if diagonal else 3) and factor.shape[0] > 1
        return log_pred, _Step(mu, factor, diagonal, G, chol, s, C, y_off, R_chol, mf, per_particle)

    def sample(self, step: _Step, anc: torch.Tensor | None, num: int, out: torch.Tensor | None = None) -> torch.Tensor:
        r"""``(N,B,H)`` draws :math:`h^n_t\sim p(h_t\mid h^{a^n}_{t-1}, y_{t,o})` (Matheron's rule, module docstring);
        ``anc (N,B)``: ancestor indices into the predictive's particles (None: identity, or all particles at
        t = 0)."""
        mu, factor, G, chol, s = step.mu, step.factor, step.G, step.chol, step.s
        if anc is not None:
            mu = take(mu, anc)
            if step.per_particle:
                factor = take(factor, anc)
                G = take(G, anc)
                if chol is not None:
                    chol = take(chol, anc)
                else:
                    s = take(s.unsqueeze(-1), anc).squeeze(-1)
        B, H = mu.shape[-2], mu.shape[-1]
        D = step.y_off.shape[-1]
        shape = (num, B, H)
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
        noise = eps * factor if step.diagonal else (factor @ eps.unsqueeze(-1)).squeeze(-1)
        hp = torch.add(mu, noise, out=out) if out is not None and mu.shape == shape else mu + noise  # h'
        v = torch.randn((num, B, D), dtype=mu.dtype, device=mu.device)
        v = v * step.R_chol[0, 0] if D == 1 else v @ step.R_chol.T
        delta = (step.y_off - _apply(step.C, hp) - v) * step.mf  # M (y - y')
        if D == 1:
            x = G[..., 0, :] * (delta / s.unsqueeze(-1))  # G^T S~^{-1} delta, (N,B,H)
        else:
            z = torch.linalg.solve_triangular(chol, delta.unsqueeze(-1), upper=False)
            w = torch.linalg.solve_triangular(chol.transpose(-1, -2), z, upper=True)
            x = (G.transpose(-1, -2) @ w).squeeze(-1)
        gain = x * factor if step.diagonal else (factor @ x.unsqueeze(-1)).squeeze(-1)  # K M (y - y')
        return hp.add_(gain) if hp is out else hp + gain

    def __repr__(self) -> str:
        return "FullyAdapted()"


def is_gaussian(d) -> bool:
    """Whether ``d`` is a Gaussian law the EKF can linearise (diagonal, full or low-rank covariance)."""
    return gaussian_factor(d) is not None or type(d).__name__ == "LowRankMultivariateNormal"


#: the older name of :class:`FullyAdapted`
FullyAdaptedProposal = FullyAdapted

__all__ = ["FullyAdapted", "FullyAdaptedProposal", "gaussian_factor", "is_gaussian"]
