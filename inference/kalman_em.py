r"""Exact EM for linear-Gaussian state-space models (the oracle for Monte Carlo EM).

E-step: the Kalman filter and RTS smoother give, for every sequence and step, the smoothed moments
:math:`m_t = E[h_t\mid y]`, :math:`P_t = \operatorname{Cov}[h_t\mid y]` and the lag-one cross-covariance
:math:`X_t = \operatorname{Cov}[h_t, h_{t-1}\mid y]`, hence :math:`E[h_th_t^\top] = P_t + m_tm_t^\top` and
:math:`E[h_th_{t-1}^\top] = X_t + m_tm_{t-1}^\top`.

M-step (closed form; every sum over sequences ``b`` and steps ``t``):

* transition, regressors :math:`x_t = (h_{t-1}, u_t, 1)`, :math:`t\ge1`, :math:`N = B(T-1)`:
  :math:`[A\ B\ b] = S_{hx}S_{xx}^{-1}`, :math:`Q = (S_{hh} - [A\ B\ b] S_{hx}^\top)/N` with
  :math:`S_{xx} = \sum E[x_tx_t^\top]`, :math:`S_{hx} = \sum E[h_tx_t^\top]`, :math:`S_{hh} = \sum_{t\ge1} E[h_th_t^\top]`;
  a diagonal-noise model (``ElmanSSM``) keeps :math:`\operatorname{diag} Q` (the regression coefficients are
  the same: every row has the same regressors).
* emission, regressors :math:`z_t = (h_t, u_t, 1)` (``ElmanSSM``: :math:`(h_t, 1)`):

  - diagonal :math:`R` (``ElmanSSM``): one regression per output dimension :math:`k` over the steps where
    :math:`y_{t,k}` is observed, :math:`[C_k\ d_k] = S^{(k)}_{yz}(S^{(k)}_{zz})^{-1}`,
    :math:`r_k^2 = (S^{(k)}_{yy} - [C_k\ d_k]S^{(k)\top}_{yz})/n_k` (this maximises
    :math:`E[\log p(h, y_{obs})]`, a valid EM because :math:`p(y_{obs}\mid h)` is available in closed form);
  - full :math:`R` (``LinearGaussianSSM``): missing entries are treated as latent too — given :math:`h_t` and
    the observed block, :math:`y_{t,m} = C_m h_t + e_m + R_{mo}R_{oo}^{-1}(y_{t,o} - C_oh_t - e_o) + \varepsilon`,
    :math:`\varepsilon\sim N(0, R_{mm} - R_{mo}R_{oo}^{-1}R_{om})` at the current parameters — so
    :math:`y_t = G_th_t + g_t + \varepsilon_t` is linear in :math:`h_t` and :math:`E[y_ty_t^\top]`,
    :math:`E[y_tz_t^\top]` follow; then :math:`[C\ D\ d] = S_{yz}S_{zz}^{-1}`,
    :math:`R = (S_{yy} - [C\ D\ d]S_{yz}^\top)/(BT)`.
* initial state: :math:`m_0 = \bar m_{b,0}`, :math:`P_0 = \overline{P_{b,0} + (m_{b,0}-m_0)(m_{b,0}-m_0)^\top}`
  (diagonal for ``ElmanSSM``). With a single sequence :math:`P_0` shrinks towards the smoothed covariance of
  :math:`h_0` (the MLE); pass ``learn_initial=False`` to keep :math:`m_0, P_0` fixed.

Every step maximises the expected complete-data log-likelihood exactly, so the exact log-evidence
:math:`\log p(y\mid\theta_k)` in the trace is non-decreasing (up to floating-point round-off; use float64).

**AR start** (``init="ar"``): before the first iteration the model is set (capability
``set_linear_gaussian``) to least-squares AR(:math:`\lfloor H/D\rfloor`) fits in companion form
(:func:`~ppl_rnn.inference.reference.ar_start`): EM then begins at the AR reference's likelihood and only
climbs (measured on breathing against random starts: ``benchmarks/README.md``, ``real_tables.py`` section).

Supported models (by the parameters they expose, not their class): ``ElmanSSM(activation="identity")``
(``W, b, U, C, d, q, r, m0, s0``) and ``LinearGaussianSSM`` (``A, B, b, C, D, d, Q_tril, R_tril, m0, P0_tril``).
"""

from __future__ import annotations

import torch

from ppl_rnn.capabilities import require
from ppl_rnn.method import check_choice
from ppl_rnn.model import LinearGaussianParams

from .em_common import ClosedFormEM, ConvergenceRule, EMLoop, EMStep, load_resumed_parameters
from .kalman import KalmanSmoother, kalman_filter, rts_smoother
from .reference import ar_start


def _ones(B, T, dtype):
    return torch.ones(B, T, 1, dtype=dtype)


def _aug_moments(m, P, extra):
    """Mean ``(B,T,H+E)`` and second moment ``(B,T,H+E,H+E)`` of ``z = (h, extra)`` where ``h ~ (m, P)`` and
    ``extra`` ``(B,T,E)`` is deterministic."""
    Ez = torch.cat([m, extra], -1)
    Ezz = Ez.unsqueeze(-1) * Ez.unsqueeze(-2)
    H = m.shape[-1]
    Ezz = Ezz.clone()
    Ezz[..., :H, :H] = Ezz[..., :H, :H] + P
    return Ez, Ezz


def _solve_sym(S, rhs_t):
    """``rhs_t @ S^{-1}`` for symmetric PSD ``S`` (with a tiny relative ridge for collinear regressors)."""
    n = S.shape[-1]
    ridge = 1e-10 * torch.diagonal(S, dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
    S = S + ridge * torch.eye(n, dtype=S.dtype)
    return torch.linalg.solve(S, rhs_t.transpose(-1, -2)).transpose(-1, -2)


def transition_mstep(m, P, X, inputs):
    """Closed-form transition update. Returns ``(A, B or None, b, Q_full)``."""
    B_, T, H = m.shape
    dt = m.dtype
    ones = _ones(B_, T - 1, dt)
    extra = ones if inputs is None else torch.cat([inputs[:, 1:T], ones], -1)
    Ex, Exx = _aug_moments(m[:, :-1], P[:, :-1], extra)
    Ehh_cross = X[:, 1:] + m[:, 1:].unsqueeze(-1) * m[:, :-1].unsqueeze(-2)  # E[h_t h_{t-1}^T]
    Ehx = torch.cat([Ehh_cross, m[:, 1:].unsqueeze(-1) * extra.unsqueeze(-2)], -1)
    Sxx = Exx.sum((0, 1))
    Shx = Ehx.sum((0, 1))
    Shh = (P[:, 1:] + m[:, 1:].unsqueeze(-1) * m[:, 1:].unsqueeze(-2)).sum((0, 1))
    N = B_ * (T - 1)
    theta = _solve_sym(Sxx, Shx)
    Q = (Shh - theta @ Shx.T) / N
    Q = 0.5 * (Q + Q.T)
    A = theta[:, :H]
    Bm = None if inputs is None else theta[:, H:-1]
    return A, Bm, theta[:, -1], Q


def initial_mstep(m, P):
    m0 = m[:, 0].mean(0)
    dev = m[:, 0] - m0
    P0 = (P[:, 0] + dev.unsqueeze(-1) * dev.unsqueeze(-2)).mean(0)
    return m0, 0.5 * (P0 + P0.T)


def emission_mstep_diag(m, P, y, mask, old_C, old_d, old_r):
    """Per-output-dimension regression of observed ``y_k`` on ``(h, 1)``. Returns ``(C, d, r2)``."""
    B_, T, H = m.shape
    dt = m.dtype
    Ez, Ezz = _aug_moments(m, P, _ones(B_, T, dt))
    mf = mask.to(dt)
    Szz = torch.einsum("btk,btpq->kpq", mf, Ezz)
    Syz = torch.einsum("btk,btp->kp", mf * y, Ez)
    Syy = (mf * y * y).sum((0, 1))
    n = mf.sum((0, 1))
    theta = _solve_sym(Szz, Syz.unsqueeze(1)).squeeze(1)  # (D, H+1)
    r2 = (Syy - (theta * Syz).sum(-1)) / n.clamp_min(1)
    seen = n > 0
    C = torch.where(seen.unsqueeze(-1), theta[:, :H], old_C)
    d = torch.where(seen, theta[:, H], old_d)
    r2 = torch.where(seen, r2.clamp_min(1e-12), old_r**2)
    return C, d, r2


def emission_mstep_full(m, P, y, mask, inputs, p):
    """Full-``R`` emission update with missing entries imputed (see module docstring). Returns ``(C, D, d, R)``."""
    B_, T, H = m.shape
    dt = m.dtype
    Dd = y.shape[-1]
    ones = _ones(B_, T, dt)
    extra = ones if inputs is None else torch.cat([inputs[:, :T], ones], -1)
    Ez, Ezz = _aug_moments(m, P, extra)
    Ehh = Ezz[..., :H, :H]
    e = p.d.expand(B_, T, Dd)
    if inputs is not None and p.D is not None:
        e = e + inputs[:, :T] @ p.D.T
    mo = mask.to(dt)
    Mo = torch.diag_embed(mo)
    Mm = torch.diag_embed(1.0 - mo)
    eye = torch.eye(Dd, dtype=dt)
    Rt = p.R * (mo.unsqueeze(-1) * mo.unsqueeze(-2)) + Mm * eye  # blockdiag(R_oo, I)
    Rt_inv = torch.linalg.inv(Rt)
    K = Mm @ p.R @ Mo @ Rt_inv @ Mo  # (B,T,D,D): K[m,o] = R_mo R_oo^{-1}
    G = Mm @ p.C - K @ p.C  # y = G h + g + eps
    yo = y * mo
    g = yo + (1.0 - mo) * e + (K @ (yo - e * mo).unsqueeze(-1)).squeeze(-1)
    Seps = Mm @ (p.R - p.R @ Mo @ Rt_inv @ Mo @ p.R) @ Mm
    mh = m
    Ey = (G @ mh.unsqueeze(-1)).squeeze(-1) + g
    GEhh = G @ Ehh
    Eyy = GEhh @ G.transpose(-1, -2) + (G @ mh.unsqueeze(-1)) * g.unsqueeze(-2) \
        + g.unsqueeze(-1) * (G @ mh.unsqueeze(-1)).transpose(-1, -2) + g.unsqueeze(-1) * g.unsqueeze(-2) + Seps
    # E[y z^T] = [G E[hh^T] + g m^T,  (G m + g) extra^T]
    Eyz = torch.cat([GEhh + g.unsqueeze(-1) * mh.unsqueeze(-2), Ey.unsqueeze(-1) * extra.unsqueeze(-2)], -1)
    Szz = Ezz.sum((0, 1))
    Syz = Eyz.sum((0, 1))
    Syy = Eyy.sum((0, 1))
    theta = _solve_sym(Szz, Syz)
    R = (Syy - theta @ Syz.T) / (B_ * T)
    R = 0.5 * (R + R.T)
    C = theta[:, :H]
    D = None if inputs is None else theta[:, H:-1]
    return C, D, theta[:, -1], R


@torch.no_grad()
def kalman_estep(model, data):
    """The exact E-step at the model's parameters: ``(params, filter, smoother)`` (Kalman filter + RTS)."""
    p = model.linear_gaussian()
    f = kalman_filter(p, data.observations, data.mask, data.inputs if model.input_dim else None)
    return p, f, rts_smoother(p.A, f)


@torch.no_grad()
def kalman_mstep(model, data, p, s, *, learn_initial: bool = True) -> None:
    """The closed-form M-step (module docstring) from the smoother output ``s`` at parameters ``p``; writes
    the new parameters through the model's ``set_linear_gaussian``."""
    y, mask = data.observations, data.mask
    u = data.inputs if model.input_dim else None
    m, P, X = s.mean, s.cov, s.cross_cov
    T = y.shape[1]
    A, Bm, b, Q = p.A, p.B, p.b, p.Q
    if T > 1:
        A, Bm, b, Q = transition_mstep(m, P, X, u if p.B is not None else None)
    if p.diagonal_noise:
        C, d, r2 = emission_mstep_diag(m, P, y, mask, p.C, p.d, torch.diagonal(p.R).sqrt())
        Dm, R = p.D, torch.diag(r2)
        Q = torch.diag(torch.diagonal(Q).clamp_min(1e-12))
    else:
        C, Dm, d, R = emission_mstep_full(m, P, y, mask, u if p.D is not None else None, p)
    m0, P0 = initial_mstep(m, P) if learn_initial else (p.m0, p.P0)
    if p.diagonal_noise:
        P0 = torch.diag(torch.diagonal(P0).clamp_min(1e-12))
    model.set_linear_gaussian(LinearGaussianParams(A=A, b=b, Q=Q, C=C, d=d, R=R, m0=m0, P0=P0, B=Bm, D=Dm,
                                                   diagonal_noise=p.diagonal_noise))


def kalman_em_step(model, data, *, learn_initial: bool = True):
    """One exact EM iteration on ``model`` in place, through its ``linear_gaussian`` / ``set_linear_gaussian``
    capabilities. Returns the exact log-evidence *before* the update and the smoother output (at the old
    parameters)."""
    p, f, s = kalman_estep(model, data)
    kalman_mstep(model, data, p, s, learn_initial=learn_initial)
    return f.log_evidence.sum(), s


_ALT = "use MonteCarloEM (or EKFEM) for a nonlinear model"
INITS = ("model", "ar")


class KalmanEM(ClosedFormEM):
    """Exact EM (Kalman smoother E-step, closed-form M-step) for linear-Gaussian models; see module docstring.

    Args:
        num_iterations: maximum number of EM iterations.
        tol: relative tolerance of the convergence rule of :mod:`~ppl_rnn.inference.em_common` (with an exact
            objective: stop when the exact log-evidence changes by at most ``tol * max(|log p(y)|, n_obs)``
            per iteration; ``0``: run all iterations).
        learn_initial: also update the initial-state mean and covariance.
        init: ``"model"`` (start from the model as given) or ``"ar"`` (start from least-squares AR fits in
            companion form; module docstring, "AR start").
        progress: show a progress bar.

    ``pr.fit(model, y, method=KalmanEM(...))`` returns a :class:`ppl_rnn.FitResult` whose ``trace`` has, per
    iteration ``k`` (``k=0`` is the initial model), the parameters :math:`\\theta_k`, ``log_evidence`` =
    ``objective`` = :math:`\\log p(y\\mid\\theta_k)` (exact, non-decreasing) and ``wall_time_s``.
    """

    name = "kalman_em"

    default_tol = 1e-7

    def __init__(self, *, num_iterations: int = 100, tol: float | None = None, learn_initial: bool = True,
                 init: str = "model", progress: bool = False):
        super().__init__(num_iterations=num_iterations, tol=tol, learn_initial=learn_initial, progress=progress)
        self.init = check_choice(init, "init", INITS)

    def _fit(self, model, data, seed, resume=None):
        require(model, "linear_gaussian", needed_by="KalmanEM", alternative=_ALT)
        set_lg = require(model, "set_linear_gaussian", needed_by="KalmanEM", alternative=_ALT)
        if resume is not None:  # pr.fit(..., resume=fit): continue from its parameters, no AR start
            load_resumed_parameters(model, resume, self.name)
        elif self.init == "ar":
            set_lg(ar_start(data, model.hidden_dim, dtype=model.dtype))

        def evaluate(k):
            p, f, s = kalman_estep(model, data)
            ll = float(f.log_evidence.sum())
            return EMStep(value=ll, scalars={"log_evidence": ll, "objective": ll}, state=(p, s))

        def update(k, step):
            kalman_mstep(model, data, *step.state, learn_initial=self.learn_initial)

        loop = EMLoop(method=self.name, evidence_kind="exact", num_iterations=self.num_iterations,
                      rule=ConvergenceRule(self.tol), n_obs=data.num_observed, progress=self.progress,
                      desc="KalmanEM")
        return loop.run(model, evaluate=evaluate, update=update, seed=seed,
                        posterior=lambda step: KalmanSmoother().infer_prepared(model, data, None),
                        resume=resume, data_shape=tuple(data.observations.shape))
