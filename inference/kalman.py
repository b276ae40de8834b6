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
which is removed; :func:`ppl_rnn.gaussian.masked_observation`). The measurement update itself,
:func:`~ppl_rnn.gaussian.kalman_update`, lives in the Gaussian toolkit :mod:`ppl_rnn.gaussian` (shared with the
EKF, the EKF proposal and guide, the fully adapted particle filter) and is re-exported here. Everything is
batched over sequences; cost :math:`O(T(H^3+D^3))`; the per-step loops run single-threaded on small problems
(:func:`ppl_rnn.scope.threads_for`).

Non-finite evidence: the methods (:class:`KalmanFilter`, :class:`KalmanSmoother` and the EKF/EKS) raise
instead of returning :math:`-\infty` (:func:`check_log_lik`): a :class:`~ppl_rnn.errors.DataError` when the
observations are so large that their squares overflow the dtype (about :math:`|y|\gtrsim 10^{19}` in float32),
naming the scale and the fix (standardise the data or use float64), else a
:class:`~ppl_rnn.errors.DivergenceError` naming the sequence and step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppl_rnn.capabilities import require
from ppl_rnn.errors import DataError, DivergenceError
from ppl_rnn.gaussian import gaussian_sampler, kalman_update, matvec, smoother_gain, symmetrize
from ppl_rnn.method import InferenceMethod
from ppl_rnn.model import LinearGaussianParams
from ppl_rnn.results import Posterior
from ppl_rnn.scope import threads_for


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


def step_work(B: int, H: int, D: int = 0) -> int:
    """Elements of one per-step matrix operation of a Kalman-type recursion (for :func:`threads_for`)."""
    return B * max(H, D) ** 2


def _stack(xs):
    return torch.stack(xs, 1)


def kalman_filter(p: LinearGaussianParams, y, mask, inputs=None) -> KalmanFilterResult:
    """Batched Kalman filter with per-element missing entries. ``y``, ``mask``: ``(B,T,D)``."""
    B, T, D = y.shape
    H = p.A.shape[0]
    c, e = _offsets(p, inputs, B, T, y.dtype)
    m = p.m0.expand(B, H)
    P = p.P0.expand(B, H, H)
    pm, pP, fm, fP, ll = [], [], [], [], []
    ys, masks, cs, es = y.unbind(1), mask.unbind(1), c.unbind(1), e.unbind(1)
    with threads_for(step_work(B, H, D)):
        for t in range(T):
            if t > 0:
                m = matvec(p.A, m) + cs[t]
                P = symmetrize(p.A @ P @ p.A.T + p.Q)
            pm.append(m)
            pP.append(P)
            m, P, l = kalman_update(m, P, ys[t], masks[t], p.C, es[t], p.R)
            fm.append(m)
            fP.append(P)
            ll.append(l)
    return KalmanFilterResult(_stack(pm), _stack(pP), _stack(fm), _stack(fP), _stack(ll))


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
    As = A.unbind(1) if A.dim() == 4 else [A] * T
    fms, fPs, pms, pPs = f.filt_mean.unbind(1), f.filt_cov.unbind(1), f.pred_mean.unbind(1), f.pred_cov.unbind(1)
    ms = [None] * T
    Ps = [None] * T
    Js = [torch.zeros(B, H, H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)] * T
    cross = [torch.zeros(B, H, H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)] * T
    ms[-1], Ps[-1] = fms[-1], fPs[-1]
    with threads_for(step_work(B, H)):
        for t in range(T - 2, -1, -1):
            Pf, Pp = fPs[t], pPs[t + 1]
            J = smoother_gain(As[t + 1], Pf, Pp)
            ms[t] = fms[t] + matvec(J, ms[t + 1] - pms[t + 1])
            Ps[t] = symmetrize(Pf + J @ (Ps[t + 1] - Pp) @ J.transpose(-1, -2))
            Js[t] = J
            cross[t + 1] = Ps[t + 1] @ J.transpose(-1, -2)
    return KalmanSmootherResult(_stack(ms), _stack(Ps), _stack(cross), _stack(Js))


def ffbs_sample(A, f: KalmanFilterResult, num: int, jitter: float = 0.0) -> torch.Tensor:
    r"""Forward-filter backward-sample ``num`` trajectories ``(num,B,T,H)``; reparameterised (``rsample``):
    :math:`h_{T-1} = m_{T-1} + L_{T-1}\varepsilon`, :math:`h_t = m_t + J_t(h_{t+1}-m^-_{t+1}) + L_t\varepsilon_t`
    with :math:`L_tL_t^\top = P_t - J_tP^-_{t+1}J_t^\top` (a :math:`10^{-12}` diagonal floor keeps the factor
    defined where the conditional is numerically degenerate)."""
    B, T, H = f.filt_mean.shape
    As = A.unbind(1) if A.dim() == 4 else [A] * T
    fms, fPs, pms, pPs = f.filt_mean.unbind(1), f.filt_cov.unbind(1), f.pred_mean.unbind(1), f.pred_cov.unbind(1)
    eye = torch.eye(H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)

    def draw(mean, cov):
        L = torch.linalg.cholesky(symmetrize(cov) + jitter * eye)
        eps = torch.randn((num, B, H), dtype=mean.dtype, device=mean.device)
        return mean + matvec(L, eps)

    out = [None] * T
    with threads_for(step_work(num * B, H)):
        h = draw(fms[-1], fPs[-1])
        out[-1] = h
        for t in range(T - 2, -1, -1):
            Pf, Pp = fPs[t], pPs[t + 1]
            J = smoother_gain(As[t + 1], Pf, Pp)
            mean = fms[t] + matvec(J, h - pms[t + 1])
            cov = Pf - J @ Pp @ J.transpose(-1, -2)
            h = draw(mean, cov + 1e-12 * eye)
            out[t] = h
    return torch.stack(out, 2)


def final_state_sampler(f: KalmanFilterResult):
    r"""``num -> (num, B, H)`` draws from the final filtering Gaussian :math:`N(m_{T-1}, P_{T-1})` (what a
    forecast starts from; ``Posterior.final_sampler``)."""
    return gaussian_sampler(f.filt_mean[:, -1], f.filt_cov[:, -1])


def check_log_lik(log_lik: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, method: str) -> None:
    r"""Raise unless every per-step log-likelihood ``(B,T)`` is finite (see module docstring): a
    :class:`~ppl_rnn.errors.DataError` naming the data's scale when the observations' squares come within
    :math:`10^6` of the dtype's largest number, else a :class:`~ppl_rnn.errors.DivergenceError`."""
    bad = ~torch.isfinite(log_lik)
    if not bool(bad.any()):
        return
    b, t = (int(i) for i in torch.nonzero(bad)[0])
    val = float(log_lik[b, t])
    fin = torch.finfo(y.dtype)
    ymax = float(y.detach().abs().masked_fill(~mask, 0).max()) if bool(mask.any()) else 0.0
    where = f"{method}: the log-likelihood of sequence {b} at step {t} is {val}, not finite"
    if ymax * ymax > fin.max / 1e6:
        raise DataError(
            f"{where}. The observations reach |y| = {ymax:.3g}, too large for {y.dtype}: squares of such numbers "
            f"overflow its largest number {fin.max:.3g} (at |y| = {math.sqrt(fin.max):.3g}). Rescale the data, e.g. "
            "standardise (y - y.mean()) / y.std() and scale results back, or use float64 (model.double())."
        )
    raise DivergenceError(
        f"{where} (the observations' scale, |y| <= {ymax:.3g}, is not the cause). The model's numbers stopped being "
        "finite: check its parameters and noise scales (they must be finite, the noise > 0), or use float64."
    )


_ALT = "use ParticleFilter / ParticleSmoother or ExtendedKalmanSmoother for a nonlinear model"


class KalmanFilter(InferenceMethod):
    """Exact Kalman filter (filtering marginals and exact log-evidence) for linear-Gaussian models."""

    name = "kalman_filter"

    def _infer(self, model, data, seed):
        with torch.no_grad():
            p = require(model, "linear_gaussian", needed_by=type(self).__name__, alternative=_ALT)()
            f = kalman_filter(p, data.observations, data.mask, data.inputs)
        check_log_lik(f.log_lik, data.observations, data.mask, method=type(self).__name__)
        return Posterior(
            kind="filtering", mean=f.filt_mean, var=torch.diagonal(f.filt_cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="exact", method=self.name, cov=f.filt_cov,
            diagnostics={"pred_mean": f.pred_mean, "pred_cov": f.pred_cov, "log_lik": f.log_lik},
            final_sampler=final_state_sampler(f),
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
            check_log_lik(f.log_lik, data.observations, data.mask, method=type(self).__name__)
            s = rts_smoother(p.A, f)
        A = p.A.detach()
        return Posterior(
            kind="smoothing", mean=s.mean, var=torch.diagonal(s.cov, dim1=-2, dim2=-1),
            log_evidence=f.log_evidence, evidence_kind="exact", method=self.name, cov=s.cov,
            cross_cov=s.cross_cov,
            diagnostics={"filter": f, "log_lik": f.log_lik},
            sampler=lambda num: ffbs_sample(A, f, num),
            final_sampler=final_state_sampler(f),
        )


__all__ = ["KalmanFilterResult", "KalmanSmootherResult", "kalman_filter", "kalman_update", "rts_smoother",
           "ffbs_sample", "final_state_sampler", "check_log_lik", "step_work", "KalmanFilter", "KalmanSmoother"]
