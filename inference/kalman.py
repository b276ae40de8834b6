r"""Exact Kalman filtering and Rauch-Tung-Striebel smoothing: the oracle for every approximate method.

For the linear-Gaussian model (:class:`ppl_rnn.model.LinearGaussianParams`)

.. math::
    h_0 \sim N(m_0,P_0),\quad h_t = A h_{t-1} + c_t + e_t,\ e_t\sim N(0,Q),\quad y_t = C h_t + e'_t + v_t,\ v_t\sim N(0,R)

with offsets :math:`c_t = B u_t + b`, :math:`e'_t = D u_t + d`:

* predict: :math:`m^-_t = A m_{t-1} + c_t`, :math:`P^-_t = A P_{t-1} A^\top + Q` (and :math:`m^-_0=m_0, P^-_0=P_0`)
* update: :math:`S_t = C P^-_t C^\top + R`, :math:`K_t = P^-_t C^\top S_t^{-1}`,
  :math:`m_t = m^-_t + K_t (y_t - C m^-_t - e'_t)`, :math:`P_t = (I-K_tC)P^-_t(I-K_tC)^\top + K_t R K_t^\top` (Joseph)
* evidence: :math:`\log p(y_{0:T-1}) = \sum_t \log N(y_t; C m^-_t + e'_t, S_t)`
* RTS: :math:`J_t = P_t A^\top (P^-_{t+1})^{-1}`, :math:`m^s_t = m_t + J_t(m^s_{t+1}-m^-_{t+1})`,
  :math:`P^s_t = P_t + J_t(P^s_{t+1}-P^-_{t+1})J_t^\top`, lag-one :math:`\operatorname{Cov}(h_{t+1},h_t\mid y) = P^s_{t+1}J_t^\top`
* FFBS: :math:`h_{T-1}\sim N(m_{T-1},P_{T-1})`, :math:`h_t\mid h_{t+1} \sim N(m_t + J_t(h_{t+1}-m^-_{t+1}),\ P_t - J_t P^-_{t+1} J_t^\top)`.

Missing entries (mask False) are handled exactly and batched: with :math:`M=\operatorname{diag}(m_t)`,
:math:`C\to MC`, :math:`R\to MRM + (I-M)` and the residual zeroed on missing entries, the update and the
evidence equal those of the observed sub-vector (the evidence gains :math:`\tfrac{|\bar o|}{2}\log 2\pi`,
which is removed). Everything is batched over sequences; cost :math:`O(T(H^3+D^3))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppl_rnn.capabilities import require
from ppl_rnn.method import InferenceMethod
from ppl_rnn.model import LinearGaussianParams
from ppl_rnn.results import Posterior

_LOG2PI = math.log(2 * math.pi)


def _sym(P: torch.Tensor) -> torch.Tensor:
    return 0.5 * (P + P.transpose(-1, -2))


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def kalman_update(m_pred, P_pred, y, mask, C, offset, R):
    r"""One measurement update with element mask, batched. Returns ``(m, P, log_lik)``.

    ``C``: ``(D,H)`` or ``(B,D,H)``; ``offset``: ``(B,D)`` or ``(D,)`` (the predicted observation is
    :math:`C m^- + \text{offset}`); ``R``: ``(D,D)``.
    """
    mf = mask.to(m_pred.dtype)  # (B,D)
    Cm = mf.unsqueeze(-1) * C  # rows of missing entries zeroed
    mm = mf.unsqueeze(-1) * mf.unsqueeze(-2)
    eye_d = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    Rm = R * mm + torch.diag_embed(1.0 - mf) * eye_d
    resid = (y - _mv(C, m_pred) - offset) * mf
    PCt = P_pred @ Cm.transpose(-1, -2)
    S = _sym(Cm @ PCt + Rm)
    L = torch.linalg.cholesky(S)
    K = torch.cholesky_solve(PCt.transpose(-1, -2), L).transpose(-1, -2)  # (B,H,D)
    m = m_pred + _mv(K, resid)
    eye_h = torch.eye(P_pred.shape[-1], dtype=P_pred.dtype, device=P_pred.device)
    IKC = eye_h - K @ Cm
    P = _sym(IKC @ P_pred @ IKC.transpose(-1, -2) + K @ Rm @ K.transpose(-1, -2))
    z = torch.linalg.solve_triangular(L, resid.unsqueeze(-1), upper=False).squeeze(-1)
    n_obs = mf.sum(-1)
    ll = -0.5 * (z**2).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) - 0.5 * n_obs * _LOG2PI
    return m, P, ll


@dataclass(frozen=True)
class KalmanFilterResult:
    r"""Output of :func:`kalman_filter` (all batched over sequences ``B``).

    pred_mean, pred_cov: :math:`m^-_t, P^-_t` ``(B,T,H)``, ``(B,T,H,H)``
    filt_mean, filt_cov: :math:`m_t, P_t`
    log_lik: ``(B,T)`` :math:`\log p(y_t\mid y_{0:t-1})`
    log_evidence: ``(B,)`` :math:`\sum_t \log p(y_t\mid y_{0:t-1})`
    """

    pred_mean: torch.Tensor
    pred_cov: torch.Tensor
    filt_mean: torch.Tensor
    filt_cov: torch.Tensor
    log_lik: torch.Tensor

    @property
    def log_evidence(self) -> torch.Tensor:
        return self.log_lik.sum(-1)


def _offsets(p: LinearGaussianParams, inputs, B, T, dtype):
    c = p.b.expand(B, T, -1)
    e = p.d.expand(B, T, -1)
    if inputs is not None and p.B is not None:
        c = c + inputs[:, :T] @ p.B.T
    if inputs is not None and p.D is not None:
        e = e + inputs[:, :T] @ p.D.T
    return c.to(dtype), e.to(dtype)


def kalman_filter(p: LinearGaussianParams, y, mask, inputs=None) -> KalmanFilterResult:
    """Batched Kalman filter with per-element missing entries. ``y``, ``mask``: ``(B,T,D)``."""
    B, T, _ = y.shape
    H = p.A.shape[0]
    c, e = _offsets(p, inputs, B, T, y.dtype)
    m = p.m0.expand(B, H)
    P = p.P0.expand(B, H, H)
    pm, pP, fm, fP, ll = [], [], [], [], []
    for t in range(T):
        if t > 0:
            m = _mv(p.A, m) + c[:, t]
            P = _sym(p.A @ P @ p.A.T + p.Q)
        pm.append(m)
        pP.append(P)
        m, P, l = kalman_update(m, P, y[:, t], mask[:, t], p.C, e[:, t], p.R)
        fm.append(m)
        fP.append(P)
        ll.append(l)
    st = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return KalmanFilterResult(st(pm), st(pP), st(fm), st(fP), st(ll))


@dataclass(frozen=True)
class KalmanSmootherResult:
    r"""RTS smoother output.

    mean, cov: :math:`m^s_t, P^s_t`
    cross_cov: :math:`\operatorname{Cov}(h_t, h_{t-1}\mid y)` ``(B,T,H,H)``; index 0 is zero
    gain: :math:`J_t` ``(B,T,H,H)`` (index T-1 is zero)
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross_cov: torch.Tensor
    gain: torch.Tensor


def rts_smoother(A: torch.Tensor, f: KalmanFilterResult) -> KalmanSmootherResult:
    """Rauch-Tung-Striebel smoother. ``A``: ``(H,H)`` or per-step ``(B,T,H,H)`` (the EKF's Jacobians,
    where ``A[:, t]`` maps ``h_{t-1}`` to ``h_t``)."""
    B, T, H = f.filt_mean.shape
    per_step = A.dim() == 4
    ms = [None] * T
    Ps = [None] * T
    Js = [torch.zeros(B, H, H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)] * T
    cross = [torch.zeros(B, H, H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)] * T
    ms[-1], Ps[-1] = f.filt_mean[:, -1], f.filt_cov[:, -1]
    for t in range(T - 2, -1, -1):
        At = A[:, t + 1] if per_step else A
        Pf = f.filt_cov[:, t]
        Pp = f.pred_cov[:, t + 1]
        # J = Pf A^T Pp^{-1}  (solve with the Cholesky of Pp)
        Lp = torch.linalg.cholesky(Pp)
        J = torch.cholesky_solve((Pf @ At.transpose(-1, -2)).transpose(-1, -2), Lp).transpose(-1, -2)
        ms[t] = f.filt_mean[:, t] + _mv(J, ms[t + 1] - f.pred_mean[:, t + 1])
        Ps[t] = _sym(Pf + J @ (Ps[t + 1] - Pp) @ J.transpose(-1, -2))
        Js[t] = J
        cross[t + 1] = Ps[t + 1] @ J.transpose(-1, -2)
    st = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return KalmanSmootherResult(st(ms), st(Ps), st(cross), st(Js))


def ffbs_sample(A, f: KalmanFilterResult, num: int, jitter: float = 0.0) -> torch.Tensor:
    """Forward-filter backward-sample ``num`` trajectories ``(num,B,T,H)``; reparameterised (``rsample``)."""
    B, T, H = f.filt_mean.shape
    per_step = A.dim() == 4
    eye = torch.eye(H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)

    def draw(mean, cov):
        L = torch.linalg.cholesky(_sym(cov) + jitter * eye)
        eps = torch.randn((num, B, H), dtype=mean.dtype, device=mean.device)
        return mean + _mv(L, eps)

    h = draw(f.filt_mean[:, -1], f.filt_cov[:, -1])
    out = [None] * T
    out[-1] = h
    for t in range(T - 2, -1, -1):
        At = A[:, t + 1] if per_step else A
        Pf = f.filt_cov[:, t]
        Pp = f.pred_cov[:, t + 1]
        Lp = torch.linalg.cholesky(Pp)
        J = torch.cholesky_solve((Pf @ At.transpose(-1, -2)).transpose(-1, -2), Lp).transpose(-1, -2)
        mean = f.filt_mean[:, t] + _mv(J, h - f.pred_mean[:, t + 1])
        cov = Pf - J @ Pp @ J.transpose(-1, -2)
        # tiny floor keeps the Cholesky defined when the conditional is (numerically) degenerate
        h = draw(mean, cov + 1e-12 * eye)
        out[t] = h
    return torch.stack(out, 2)


def _gaussian_final_sampler(f: KalmanFilterResult):
    def sample(num):
        L = torch.linalg.cholesky(f.filt_cov[:, -1])
        eps = torch.randn((num,) + f.filt_mean[:, -1].shape, dtype=L.dtype)
        return f.filt_mean[:, -1] + _mv(L, eps)

    return sample


_ALT = "use ParticleFilter / ParticleSmoother or ExtendedKalmanSmoother for a nonlinear model"


class KalmanFilter(InferenceMethod):
    """Exact Kalman filter (filtering marginals and exact log-evidence) for linear-Gaussian models."""

    name = "kalman_filter"

    def _infer(self, model, data, seed):
        with torch.no_grad():
            p = require(model, "linear_gaussian", needed_by=type(self).__name__, alternative=_ALT)()
            f = kalman_filter(p, data.observations, data.mask, data.inputs)
        return Posterior(
            kind="filtering", mean=f.filt_mean, var=torch.diagonal(f.filt_cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="exact", method=self.name, cov=f.filt_cov,
            diagnostics={"pred_mean": f.pred_mean, "pred_cov": f.pred_cov, "log_lik": f.log_lik},
            final_sampler=_gaussian_final_sampler(f),
        )


class KalmanSmoother(InferenceMethod):
    """Exact RTS smoother: smoothed means, covariances, lag-one cross-covariances, exact log-evidence and
    forward-filter backward-sample trajectories (``Posterior.sample``)."""

    name = "kalman_smoother"
    smooths = True

    def _infer(self, model, data, seed):
        with torch.no_grad():
            p = require(model, "linear_gaussian", needed_by=type(self).__name__, alternative=_ALT)()
            f = kalman_filter(p, data.observations, data.mask, data.inputs)
            s = rts_smoother(p.A, f)
        A = p.A.detach()
        return Posterior(
            kind="smoothing", mean=s.mean, var=torch.diagonal(s.cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="exact", method=self.name, cov=s.cov,
            cross_cov=s.cross_cov,
            diagnostics={"filter": f, "log_lik": f.log_lik},
            sampler=lambda num: ffbs_sample(A, f, num),
            final_sampler=_gaussian_final_sampler(f),
        )
