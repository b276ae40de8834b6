r"""Extended Kalman filtering and smoothing for any model with Gaussian conditionals.

The model's conditionals must be Gaussian (``Normal(...).to_event(1)`` or ``MultivariateNormal``):

.. math::
    h_0\sim N(m_0,P_0),\qquad h_t\mid h_{t-1}\sim N\big(f_t(h_{t-1}),\,Q_t(h_{t-1})\big),\qquad
    y_t\mid h_t\sim N\big(g_t(h_t),\,R_t(h_t)\big).

The EKF linearises the means at the current estimate and then runs the exact Kalman recursions of
:mod:`ppl_rnn.inference.kalman` on the linearised model. Jacobians come from the model when it declares the
optional capabilities

* ``transition_jacobian(t, h_prev, u_t[, mean=None]) -> (..., H, H)`` (:math:`\partial f_t/\partial h_{t-1}`; the EKF
  passes ``mean=f_t(h_{t-1})`` when the signature has that keyword, so e.g. a tanh network can reuse it) and
* ``emission_jacobian(t, h, u_t) -> (..., D, H)`` (:math:`\partial g_t/\partial h_t`),

(:class:`~ppl_rnn.models.ElmanSSM`: :math:`\operatorname{diag}(1-\tanh^2(a_t))W` and :math:`C`); a capability that is
absent or returns None falls back to autograd (batched over sequences: one vector-Jacobian product per output
dimension, :func:`torch.func.jacrev` for large outputs). Both give the same numbers (tested to 1e-10); the
analytic path avoids a double-backward graph, which is what makes SVI with the EKF guide affordable. Scalar
observations (``D=1``) take an update without a matrix factorisation (the same formulas with :math:`S_t` a
scalar, falling back to the Cholesky path with its jitter when :math:`S_t\le 0`), so its autograd graph holds
only element-wise ops and small products. The recursions:

* predict (linearised at the filtered mean :math:`m_{t-1}`): :math:`F_t=\partial f_t/\partial h\,(m_{t-1})`,
  :math:`m^-_t=f_t(m_{t-1})`, :math:`P^-_t=F_tP_{t-1}F_t^\top+Q_t(m_{t-1})`
* update (linearised at the predicted mean): :math:`G_t=\partial g_t/\partial h\,(m^-_t)`, offset
  :math:`g_t(m^-_t)-G_tm^-_t`, noise :math:`R_t(m^-_t)`, then :func:`~ppl_rnn.inference.kalman.kalman_update`
  (Joseph form, per-element missing entries)
* EKF log-likelihood :math:`\sum_t\log N(y_{t,o};\,g_t(m^-_t)_o,\,(G_tP^-_tG_t^\top+R_t)_{oo})`, an
  *approximation* of :math:`\log p(y_{0:T-1})` (exact for linear-Gaussian models)
* smoother: Rauch-Tung-Striebel with the per-step Jacobians :math:`F_t` (:func:`~ppl_rnn.inference.kalman.rts_smoother`),
  giving smoothed means, covariances and lag-one cross-covariances; forward-filter backward-sample draws
  (:func:`~ppl_rnn.inference.kalman.ffbs_sample`, reparameterised, so gradients flow to the model's parameters).

On a linear-Gaussian model every linearisation is exact and the EKF *is* the Kalman filter.

Numerical safety: covariances are symmetrised after every step; when a Cholesky factorisation fails
(a covariance that lost positive definiteness in finite precision), a growing multiple of the identity is
added and a :class:`NumericalJitterWarning` is issued.

Assumption behind the batched Jacobian: a conditional's mean for one sequence (row) depends only on that
row's state, so :math:`\partial \sum_b f(h)_b/\partial h_b = \partial f(h)_b/\partial h_b` — true for any
per-sequence model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

from ppl_rnn.capabilities import capability
from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.method import InferenceMethod
from ppl_rnn.model import input_at
from ppl_rnn.results import Posterior

from .kalman import (
    KalmanFilterResult,
    _gaussian_final_sampler,
    _mv,
    _sym,
    ffbs_sample,
    kalman_update,
    rts_smoother,
)

_LOG2PI = math.log(2 * math.pi)


class NumericalJitterWarning(RuntimeWarning):
    """A covariance needed diagonal jitter to stay positive definite."""


def gaussian_moments(d, *, role: str = "distribution", model=None, method: str = "the EKF"):
    r"""Mean ``(..., K)`` and covariance ``(..., K, K)`` of a Gaussian distribution.

    Accepted: ``Independent(Normal, 1)`` (``Normal(loc, scale).to_event(1)``: covariance
    :math:`\operatorname{diag}(\text{scale}^2)`), ``MultivariateNormal``, ``LowRankMultivariateNormal``.
    Anything else raises :class:`~ppl_rnn.errors.ModelCapabilityError` naming the requirement.
    """
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, Normal):
        scale = d.base_dist.scale
        loc = d.base_dist.loc
        loc, scale = torch.broadcast_tensors(loc, scale)
        return loc, torch.diag_embed(scale**2)
    if isinstance(d, (MultivariateNormal, LowRankMultivariateNormal)):
        return d.loc, d.covariance_matrix
    who = f"{type(model).__name__}.{role}()" if model is not None else role
    raise ModelCapabilityError(
        f"{method} needs Gaussian conditionals with a differentiable mean: every {role} must be "
        f"Normal(loc, scale).to_event(1) or MultivariateNormal; {who} returned {type(d).__name__}"
        f"{'' if not hasattr(d, 'event_shape') else f' with event_shape {tuple(d.event_shape)}'}. "
        "Use ParticleFilter / ParticleSmoother (any distributions), or return a Gaussian from that method."
    )


def linearize(fn, x: torch.Tensor, *, role: str = "conditional", model=None, method: str = "the EKF",
              jacobian=None):
    r"""Linearise a Gaussian conditional ``fn(x)`` around ``x`` (``(..., H)``, any leading dims).

    Returns ``(mean, jacobian, cov)``: :math:`\mu(x)` ``(..., K)``, :math:`\partial\mu/\partial x`
    ``(..., K, H)`` and the covariance at ``x`` ``(..., K, K)``. The Jacobian rows are vector-Jacobian
    products of the mean summed over the leading dims (exact when rows do not interact): one backward
    pass per output dimension for small ``K``, :func:`torch.func.jacrev` otherwise. Under grad mode the
    result is differentiable with respect to the model's parameters (``create_graph``); under
    ``torch.no_grad()`` it is detached. ``jacobian``: optional analytic Jacobian ``x -> (..., K, H)`` (a model
    capability, see the module docstring); used instead of autograd unless it returns None.
    """
    lead = tuple(range(x.dim() - 1))

    def moments(z):
        mu, cov = gaussian_moments(fn(z), role=role, model=model, method=method)
        if mu.shape[:-1] != z.shape[:-1]:
            mu = mu.expand(z.shape[:-1] + mu.shape[-1:])
        if cov.shape[:-2] != z.shape[:-1]:
            cov = cov.expand(z.shape[:-1] + cov.shape[-2:])
        return mu, cov

    if jacobian is not None:
        J = jacobian(x)
        if J is not None:
            mu, cov = moments(x)
            return mu, J.expand(mu.shape + x.shape[-1:]), cov
    graph = torch.is_grad_enabled()
    with torch.enable_grad():
        z = x if (graph and x.requires_grad) else x.detach().requires_grad_(True)
        mu, cov = moments(z)
        K = mu.shape[-1]
        if K <= 8:
            rows = []
            for k in range(K):
                (r,) = torch.autograd.grad(mu[..., k].sum(), z, retain_graph=True, create_graph=graph,
                                           allow_unused=True)
                rows.append(torch.zeros_like(z) if r is None else r)
            J = torch.stack(rows, -2)
        else:
            def g(w):
                m_, c_ = moments(w)
                return m_.sum(lead), (m_, c_)

            J, _ = torch.func.jacrev(g, has_aux=True)(z if graph else z.detach())
            J = J.movedim(0, -2)
    if not graph:
        return mu.detach(), J.detach(), cov.detach()
    return mu, J, cov


def _jitter_scale(M: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(M, dim1=-2, dim2=-1).abs()
    return d.mean(-1).clamp_min(torch.finfo(M.dtype).tiny)[..., None, None]


def ensure_pd(P: torch.Tensor, *, what: str = "covariance", t: int | None = None) -> torch.Tensor:
    """Return ``P`` (symmetrised); if its Cholesky fails, add growing diagonal jitter with a warning."""
    P = _sym(P)
    _, info = torch.linalg.cholesky_ex(P.detach())
    if not bool((info > 0).any()):
        return P
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    base = _jitter_scale(P.detach())
    eps = torch.finfo(P.dtype).eps
    for k in range(12):
        jit = base * eps * 10.0 ** (k + 2)
        Pj = P + jit * eye
        _, info = torch.linalg.cholesky_ex(Pj.detach())
        if not bool((info > 0).any()):
            warnings.warn(
                f"EKF: {what}{'' if t is None else f' at step t={t}'} was not positive definite; added diagonal "
                f"jitter {float(jit.max()):.3g}. Results are approximate there; consider float64 or larger noise.",
                NumericalJitterWarning, stacklevel=3,
            )
            return Pj
    raise ModelCapabilityError(
        f"EKF: {what}{'' if t is None else f' at step t={t}'} is not positive definite even after jitter "
        "(non-finite or degenerate values). Check the model's noise scales, or use float64."
    )


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; :func:`torch.bmm` for two 3-d tensors of equal shape (one autograd node instead of four)."""
    if a.dim() == 3 and a.shape == b.shape:
        return torch.bmm(a, b)
    return a @ b


def _scalar_update(m_pred, P_pred, y, mask, C, offset, R):
    r""":func:`kalman_update` for a scalar observation (``D=1``): the same maths (masking, Joseph form,
    log-likelihood) with :math:`S` a scalar, so no factorisation and an autograd graph of cheap element-wise
    ops. Returns None when :math:`S` is not positive and finite (the caller then takes the general path)."""
    mf = mask.to(m_pred.dtype)  # (B,1)
    resid = (y - _mv(C, m_pred) - offset) * mf
    return _scalar_core(m_pred, P_pred, resid, mf, C, R[..., 0], full=False)


def _scalar_core(m_pred, P_pred, resid, mf, C, r2, *, full: bool):
    """Scalar-observation update given the (masked) residual ``(..., 1)``, observation noise variance ``r2``
    ``(..., 1)`` and ``C`` ``(..., 1, H)``; ``full``: the entry is observed in every sequence (no masking ops)."""
    if not full:
        C = C * mf.unsqueeze(-1)  # the row of a missing entry zeroed
        r2 = r2 * mf + (1.0 - mf)  # R on observed entries, 1 on missing ones (then K = 0 there)
    v = (P_pred * C).sum(-1)  # P C^T (P symmetric), (..., H)
    S = (C.squeeze(-2) * v).sum(-1, keepdim=True) + r2  # (..., 1)
    Sd = S.detach()
    if not bool(((Sd > 0) & torch.isfinite(Sd)).all()):
        return None
    K = v / S  # (..., H)
    m = m_pred + K * resid
    eye_h = torch.eye(P_pred.shape[-1], dtype=P_pred.dtype, device=P_pred.device)
    Kc = K.unsqueeze(-1)
    IKC = eye_h - Kc * C
    P = _sym(_mm(_mm(IKC, P_pred), IKC.transpose(-1, -2)) + r2.unsqueeze(-1) * (Kc * Kc.transpose(-1, -2)))
    if full:
        ll = -0.5 * (resid * resid / S + torch.log(S) + _LOG2PI)
    else:
        ll = -0.5 * (resid * resid / S + torch.log(S) + _LOG2PI * mf)
    return m, P, ll.squeeze(-1)


def safe_update(m_pred, P_pred, y, mask, C, offset, R, *, t: int | None = None):
    """:func:`kalman_update` with diagonal jitter on ``R`` (and a warning) if the innovation Cholesky fails
    (scalar observations take the equivalent :func:`_scalar_update`)."""
    if R.shape[-1] == 1:
        out = _scalar_update(m_pred, P_pred, y, mask, C, offset, R)
        if out is not None:
            return out
    try:
        return kalman_update(m_pred, P_pred, y, mask, C, offset, R)
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    base = _jitter_scale(R.detach() + (C @ P_pred @ C.transpose(-1, -2)).detach())
    eps = torch.finfo(R.dtype).eps
    for k in range(12):
        jit = base * eps * 10.0 ** (k + 2)
        try:
            out = kalman_update(m_pred, P_pred, y, mask, C, offset, R + jit * eye)
        except torch.linalg.LinAlgError:
            continue
        warnings.warn(
            f"EKF: innovation covariance{'' if t is None else f' at step t={t}'} was not positive definite; added "
            f"jitter {float(jit.max()):.3g} to the observation noise.", NumericalJitterWarning, stacklevel=3,
        )
        return out
    raise ModelCapabilityError(
        f"EKF: innovation covariance{'' if t is None else f' at step t={t}'} is not positive definite even after "
        "jitter. Check the model's observation noise (it must be > 0) and the data."
    )


def _diag_cov(scale: torch.Tensor, memo: list) -> torch.Tensor:
    """``diag(scale^2)``, reused while ``scale`` is the same tensor object (a parameter read once per run)."""
    if memo[0] is not scale:
        memo[0], memo[1] = scale, torch.diag_embed(scale * scale)
    return memo[1]


@dataclass(frozen=True)
class ExtendedKalmanFilterResult(KalmanFilterResult):
    r"""EKF output: the fields of :class:`~ppl_rnn.inference.kalman.KalmanFilterResult` plus

    transition_jacobian: ``(B,T,H,H)`` :math:`F_t=\partial f_t/\partial h_{t-1}` at :math:`m_{t-1}` (index 0 is zero);
    pass it as ``A`` to :func:`rts_smoother` / :func:`ffbs_sample`.
    """

    transition_jacobian: torch.Tensor = None  # type: ignore[assignment]


def extended_kalman_filter(model, y: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor | None = None,
                           *, method: str = "the EKF") -> ExtendedKalmanFilterResult:
    """Batched EKF (see module docstring). ``y``, ``mask``: ``(B,T,D)`` (missing entries of ``y`` finite).

    Differentiable with respect to the model's parameters; call under ``torch.no_grad()`` when not needed.
    """
    B, T, D = y.shape
    H = model.hidden_dim
    u0 = input_at(inputs, 0)
    m, P = gaussian_moments(model.initial_batched(u0, (B,)), role="initial", model=model, method=method)
    m = m.expand(B, H)
    P = ensure_pd(P.expand(B, H, H), what="initial covariance")
    zeros = torch.zeros(B, H, H, dtype=m.dtype, device=m.device)
    tj, ej = capability(model, "transition_jacobian"), capability(model, "emission_jacobian")
    tj_mean = tj is not None
    # diagonal-Gaussian shortcuts (loc, scale) skip building the distributions (ppl_rnn.capabilities)
    tr_ls = capability(model, "transition_loc_scale") if tj is not None else None
    em_ls = capability(model, "emission_loc_scale") if ej is not None else None
    q_memo, r_memo = [None, None], [None, None]
    ys, masks = y.unbind(1), mask.unbind(1)
    mfs = mask.to(m.dtype).unbind(1)
    fulls = mask.all(-1).all(0).tolist()
    pm, pP, fm, fP, ll, Fs = [], [], [], [], [], [zeros]
    for t in range(T):
        u_t = input_at(inputs, t)
        if t > 0:
            F = None
            if tj is not None:  # analytic Jacobian: the mean and noise from the distribution, no autograd pass
                if tr_ls is not None:
                    mu, q = tr_ls(t, m, u_t)
                    Q = _diag_cov(q, q_memo)
                else:
                    mu, Q = gaussian_moments(model.transition(t, m, u_t), role="transition", model=model,
                                             method=method)
                F = tj(t, m, u_t, mean=mu) if tj_mean else tj(t, m, u_t)
            if F is None:
                mu, F, Q = linearize(lambda z, t=t, u_t=u_t: model.transition(t, z, u_t), m, role="transition",
                                     model=model, method=method)
            m = mu if mu.shape == m.shape else mu.expand(m.shape)
            P = ensure_pd(_mm(_mm(F, P), F.transpose(-1, -2)) + Q, what="predicted covariance", t=t)
            Fs.append(F)
        pm.append(m)
        pP.append(P)
        out = None
        G = None
        if ej is not None:
            if em_ls is not None:
                g, r = em_ls(t, m, u_t)
                R = _diag_cov(r, r_memo)
            else:
                g, R = gaussian_moments(model.emission(t, m, u_t), role="emission", model=model, method=method)
            G = ej(t, m, u_t)
        if G is None:
            g, G, R = linearize(lambda z, t=t, u_t=u_t: model.emission(t, z, u_t), m, role="emission",
                                model=model, method=method)
        if D == 1:
            resid = ys[t] - g if fulls[t] else (ys[t] - g) * mfs[t]
            out = _scalar_core(m, P, resid, mfs[t], G, R[..., 0], full=fulls[t])
        if out is None:
            out = safe_update(m, P, ys[t], masks[t], G, g - _mv(G, m), R, t=t)
        m, P, lt = out
        fm.append(m)
        fP.append(P)
        ll.append(lt)
    st = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return ExtendedKalmanFilterResult(st(pm), st(pP), st(fm), st(fP), st(ll), transition_jacobian=st(Fs))


def extended_kalman_smoother(model, y, mask, inputs=None, *, method: str = "the EKS"):
    """EKF followed by the RTS smoother with the EKF's Jacobians. Returns ``(filter_result, smoother_result)``."""
    f = extended_kalman_filter(model, y, mask, inputs, method=method)
    return f, rts_smoother(f.transition_jacobian, f)


class ExtendedKalmanFilter(InferenceMethod):
    """Extended Kalman filter: Gaussian filtering marginals and the EKF log-likelihood
    (``evidence_kind="approximation"``; exact on linear-Gaussian models). Needs Gaussian conditionals."""

    name = "extended_kalman_filter"

    def _infer(self, model, data, seed):
        with torch.no_grad():
            f = extended_kalman_filter(model, data.observations, data.mask, data.inputs, method="ExtendedKalmanFilter")
        return Posterior(
            kind="filtering", mean=f.filt_mean, var=torch.diagonal(f.filt_cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="approximation", method=self.name, cov=f.filt_cov,
            diagnostics={"pred_mean": f.pred_mean, "pred_cov": f.pred_cov, "log_lik": f.log_lik,
                         "transition_jacobian": f.transition_jacobian},
            final_sampler=_gaussian_final_sampler(f),
        )


class ExtendedKalmanSmoother(InferenceMethod):
    """Extended Kalman (RTS) smoother: smoothed means, covariances, lag-one cross-covariances, the EKF
    log-likelihood (``evidence_kind="approximation"``) and forward-filter backward-sample trajectories
    (``Posterior.sample``) from the smoother's Gaussian."""

    name = "extended_kalman_smoother"
    smooths = True

    def _infer(self, model, data, seed):
        with torch.no_grad():
            f, s = extended_kalman_smoother(model, data.observations, data.mask, data.inputs,
                                            method="ExtendedKalmanSmoother")
        F = f.transition_jacobian
        return Posterior(
            kind="smoothing", mean=s.mean, var=torch.diagonal(s.cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="approximation", method=self.name, cov=s.cov,
            cross_cov=s.cross_cov, diagnostics={"filter": f, "log_lik": f.log_lik, "gain": s.gain},
            sampler=lambda num: ffbs_sample(F, f, num), final_sampler=_gaussian_final_sampler(f),
        )


from .ekf_em import EKFEM  # noqa: E402  (re-exported: EKFEM lives in its own module)
from .ekf_proposal import EKFProposal  # noqa: E402  (importing it registers ParticleFilter(proposal="ekf"))

__all__ = [
    "ExtendedKalmanFilter", "ExtendedKalmanSmoother", "EKFEM", "EKFProposal", "extended_kalman_filter",
    "extended_kalman_smoother", "gaussian_moments", "linearize", "NumericalJitterWarning",
]
