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
  :math:`g_t(m^-_t)-G_tm^-_t`, noise :math:`R_t(m^-_t)`, then :func:`~ppl_rnn.gaussian.kalman_update`
  (Joseph form, per-element missing entries)
* EKF log-likelihood :math:`\sum_t\log N(y_{t,o};\,g_t(m^-_t)_o,\,(G_tP^-_tG_t^\top+R_t)_{oo})`, an
  *approximation* of :math:`\log p(y_{0:T-1})` (exact for linear-Gaussian models)
* smoother: Rauch-Tung-Striebel with the per-step Jacobians :math:`F_t` (:func:`~ppl_rnn.inference.kalman.rts_smoother`),
  giving smoothed means, covariances and lag-one cross-covariances; forward-filter backward-sample draws
  (:func:`~ppl_rnn.inference.kalman.ffbs_sample`, reparameterised, so gradients flow to the model's parameters).

On a linear-Gaussian model every linearisation is exact and the EKF *is* the Kalman filter.

The Gaussian maths (moments, linearisation, the updates, positive-definite repair) is the toolkit
:mod:`ppl_rnn.gaussian`, shared with the Kalman filter, the EKF proposal
(:mod:`ppl_rnn.inference.ekf_proposal`) and the EKF guide. The per-step loop runs single-threaded on small
problems (:func:`ppl_rnn.scope.threads_for`).

Numerical safety: covariances are symmetrised after every step; when a Cholesky factorisation fails
(a covariance that lost positive definiteness in finite precision), a growing multiple of the identity is
added and a :class:`~ppl_rnn.gaussian.NumericalJitterWarning` is issued. A non-finite log-likelihood raises
(:func:`~ppl_rnn.inference.kalman.check_log_lik`: data too large for the dtype, or a diverged model) instead
of returning :math:`-\infty`.

Assumption behind the batched Jacobian: a conditional's mean for one sequence (row) depends only on that
row's state, so :math:`\partial \sum_b f(h)_b/\partial h_b = \partial f(h)_b/\partial h_b` — true for any
per-sequence model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppl_rnn.capabilities import capability
from ppl_rnn.gaussian import (
    ensure_pd,
    gaussian_moments,
    linearize,
    matmul,
    matvec,
    safe_update,
    scalar_update,
)
from ppl_rnn.method import InferenceMethod
from ppl_rnn.model import input_at
from ppl_rnn.results import Posterior
from ppl_rnn.scope import threads_for

from .kalman import (
    KalmanFilterResult,
    check_log_lik,
    ffbs_sample,
    final_state_sampler,
    rts_smoother,
    step_work,
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
    with threads_for(step_work(B, H, D)):
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
                P = ensure_pd(matmul(matmul(F, P), F.transpose(-1, -2)) + Q, what="predicted covariance", t=t)
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
                out = scalar_update(m, P, resid, mfs[t], G, R[..., 0], full=fulls[t])
            if out is None:
                out = safe_update(m, P, ys[t], masks[t], G, g - matvec(G, m), R, t=t)
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
        check_log_lik(f.log_lik, data.observations, data.mask, method="ExtendedKalmanFilter")
        return Posterior(
            kind="filtering", mean=f.filt_mean, var=torch.diagonal(f.filt_cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="approximation", method=self.name, cov=f.filt_cov,
            diagnostics={"pred_mean": f.pred_mean, "pred_cov": f.pred_cov, "log_lik": f.log_lik,
                         "transition_jacobian": f.transition_jacobian},
            final_sampler=final_state_sampler(f),
        )


class ExtendedKalmanSmoother(InferenceMethod):
    """Extended Kalman (RTS) smoother: smoothed means, covariances, lag-one cross-covariances, the EKF
    log-likelihood (``evidence_kind="approximation"``) and forward-filter backward-sample trajectories
    (``Posterior.sample``) from the smoother's Gaussian."""

    name = "extended_kalman_smoother"
    smooths = True

    def _infer(self, model, data, seed):
        with torch.no_grad():
            f = extended_kalman_filter(model, data.observations, data.mask, data.inputs,
                                       method="ExtendedKalmanSmoother")
            check_log_lik(f.log_lik, data.observations, data.mask, method="ExtendedKalmanSmoother")
            s = rts_smoother(f.transition_jacobian, f)
        F = f.transition_jacobian
        return Posterior(
            kind="smoothing", mean=s.mean, var=torch.diagonal(s.cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="approximation", method=self.name, cov=s.cov,
            cross_cov=s.cross_cov, diagnostics={"filter": f, "log_lik": f.log_lik, "gain": s.gain},
            sampler=lambda num: ffbs_sample(F, f, num), final_sampler=final_state_sampler(f),
        )


__all__ = [
    "ExtendedKalmanFilter", "ExtendedKalmanSmoother", "ExtendedKalmanFilterResult", "extended_kalman_filter",
    "extended_kalman_smoother",
]
