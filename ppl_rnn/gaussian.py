r"""The Gaussian toolkit: the one home of the Gaussian maths shared by the models and by every Gaussian method
(exact Kalman, EKF/EKS, the EKF proposal, the EKF guide, the fully adapted particle filter). Everything is
batched over leading dims; covariances are ``(..., K, K)``.

**Factorisation and positive-definite repair.**

* :func:`symmetrize`: :math:`\tfrac12(P+P^\top)`.
* :func:`psd_cholesky`: :math:`L` with :math:`LL^\top = \tfrac12(S+S^\top) + \epsilon I`, the smallest jitter
  :math:`\epsilon \in \{0, 10^{-12}\bar s, 10^{-11}\bar s, \dots\}` (:math:`\bar s` the mean diagonal magnitude;
  up to :math:`10^{-7}\bar s` in float64, and in float32 on up to :math:`10^6\varepsilon_{\text{mach}}\bar s\approx0.1\bar s`)
  for which the factorisation succeeds (silent; for parameters built from a model's own factors).
* :func:`ensure_pd`: :math:`\tfrac12(P+P^\top)`, and where its Cholesky fails
  :math:`P + \epsilon_k I`, :math:`\epsilon_k = \bar p\,\varepsilon_{\text{mach}}10^{k+2}` for the first
  :math:`k=0,1,\dots,11` that factorises, with a :class:`NumericalJitterWarning` (a covariance of an
  inference method that lost definiteness in finite precision); non-finite or hopeless covariances raise
  :class:`~ppl_rnn.errors.ModelCapabilityError`. :func:`cholesky_pd` is its Cholesky factor.

**Moments and linearisation.**

* :func:`gaussian_moments`: :math:`(\mu,\Sigma)` of ``Normal(loc, scale).to_event(1)``
  (:math:`\Sigma=\operatorname{diag}\text{scale}^2`), ``MultivariateNormal`` or ``LowRankMultivariateNormal``.
* :func:`linearize`: for a Gaussian conditional :math:`x\mapsto N(\mu(x),\Sigma(x))`, the triple
  :math:`(\mu(x),\ \partial\mu/\partial x,\ \Sigma(x))`; the Jacobian from an analytic capability
  (``transition_jacobian`` / ``emission_jacobian``, :mod:`ppl_rnn.capabilities`) or by autograd.

**Conditioning on the observed entries** (:func:`masked_observation`). For :math:`y = Ch + e + v`,
:math:`v\sim N(0,R)`, with an element mask :math:`o` and :math:`M=\operatorname{diag}(o)`, replace

.. math:: C \to MC,\qquad R \to MRM + (I-M),\qquad y - Ch - e \to M(y - Ch - e).

The missing rows then carry a unit-variance, zero-residual, :math:`h`-independent pseudo-observation, so every
update below equals the update on the observed sub-vector :math:`y_o` exactly (the log-likelihood gains
:math:`-\tfrac{|\bar o|}2\log2\pi`, which is removed), and a fully missing step gives back the prior.

**Measurement updates** (:func:`kalman_update`, :func:`scalar_update`, :func:`safe_update`). Given the prior
:math:`h\sim N(m^-,P^-)` and the (masked) observation model above,

.. math::
    S = CP^-C^\top + R,\quad K = P^-C^\top S^{-1},\quad m = m^- + K(y - Cm^- - e),\quad
    P = (I-KC)P^-(I-KC)^\top + KRK^\top \ \text{(Joseph form)},

    \log p(y_o) = \log N\big(y_o;\ (Cm^-+e)_o,\ S_{oo}\big).

:func:`kalman_update` factorises :math:`S` by Cholesky; :func:`scalar_update` is the same maths for a scalar
observation (:math:`S` a scalar: no factorisation, an autograd graph of element-wise ops); :func:`safe_update`
takes the scalar path where it applies and otherwise adds growing diagonal jitter to :math:`R` (with a
warning) if :math:`S` does not factorise.

**Smoothing.** :func:`smoother_gain`: the gain :math:`J` of the backward conditional :math:`h_t\mid h_{t+1}`
(RTS smoother, forward-filter backward-sample, the EKF guide).

**Sampling.** :func:`gaussian_sampler`: reparameterised draws :math:`m + L\varepsilon`, :math:`LL^\top=P`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

from .errors import ModelCapabilityError

LOG_2PI = math.log(2 * math.pi)


class NumericalJitterWarning(RuntimeWarning):
    """A covariance needed diagonal jitter to stay positive definite."""


# ---- linear algebra -----------------------------------------------------------------------------------
def symmetrize(P: torch.Tensor) -> torch.Tensor:
    r""":math:`\tfrac12(P + P^\top)` over the last two dims."""
    return 0.5 * (P + P.transpose(-1, -2))


def matvec(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``M @ v``: ``(..., K, H) x (..., H) -> (..., K)``."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; :func:`torch.bmm` for two 3-d tensors of equal shape (one autograd node instead of four)."""
    if a.dim() == 3 and a.shape == b.shape:
        return torch.bmm(a, b)
    return a @ b


def psd_cholesky(S: torch.Tensor, *, tries: int = 6) -> torch.Tensor:
    """Cholesky factor of the symmetrised ``S`` with the smallest relative jitter that works (see module)."""
    S = symmetrize(S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    jitter = 0.0
    # the ladder 1e-12, 1e-11, ... (times the mean diagonal): ``tries`` rungs, and in a low precision as many more
    # as reach 1e6 machine epsilons (float32: up to ~0.1; float64: the same 6 rungs as ever)
    top = 1e6 * torch.finfo(S.dtype).eps
    for _ in range(max(tries, math.ceil(math.log10(top / 1e-12)))):
        try:
            return torch.linalg.cholesky(S + jitter * eye)
        except RuntimeError:
            jitter = max(jitter * 10, 1e-12 * float(torch.diagonal(S, dim1=-2, dim2=-1).abs().mean()) + 1e-15)
    return torch.linalg.cholesky(S + jitter * eye)


def jitter_scale(M: torch.Tensor) -> torch.Tensor:
    r""":math:`\bar m`, the mean diagonal magnitude of each matrix ``(..., 1, 1)`` (at least the smallest normal
    float): the unit of the diagonal jitter."""
    d = torch.diagonal(M, dim1=-2, dim2=-1).abs()
    return d.mean(-1).clamp_min(torch.finfo(M.dtype).tiny)[..., None, None]


def _where(what: str, t: int | None) -> str:
    return what if t is None else f"{what} at step t={t}"


def ensure_pd(P: torch.Tensor, *, what: str = "covariance", t: int | None = None, who: str = "EKF") -> torch.Tensor:
    """Return ``P`` symmetrised; if its Cholesky fails, add growing diagonal jitter with a
    :class:`NumericalJitterWarning` (see module docstring). ``who`` names the method in messages."""
    P = symmetrize(P)
    _, info = torch.linalg.cholesky_ex(P.detach())
    if not bool((info > 0).any()):
        return P
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    base = jitter_scale(P.detach())
    eps = torch.finfo(P.dtype).eps
    for k in range(12):
        jit = base * eps * 10.0 ** (k + 2)
        Pj = P + jit * eye
        _, info = torch.linalg.cholesky_ex(Pj.detach())
        if not bool((info > 0).any()):
            warnings.warn(
                f"{who}: {_where(what, t)} was not positive definite; added diagonal jitter {float(jit.max()):.3g}. "
                "Results are approximate there; consider float64 or larger noise.",
                NumericalJitterWarning, stacklevel=3,
            )
            return Pj
    raise ModelCapabilityError(
        f"{who}: {_where(what, t)} is not positive definite even after jitter (non-finite or degenerate values). "
        "Check the model's noise scales, or use float64."
    )


def cholesky_pd(P: torch.Tensor, *, what: str = "covariance", t: int | None = None, who: str = "EKF",
                floor: float = 0.0) -> torch.Tensor:
    r"""Cholesky factor of :math:`\tfrac12(P+P^\top) + \text{floor}\,I`, through :func:`ensure_pd` (jitter and a
    warning) where the plain factorisation fails. (``cholesky_ex`` first: ``torch.linalg.cholesky`` is ~100x
    slower on tiny batches with several intra-op threads.)"""
    P = symmetrize(P)
    if floor:
        P = P + floor * torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    L, info = torch.linalg.cholesky_ex(P)
    if bool((info > 0).any()):
        L = torch.linalg.cholesky(ensure_pd(P, what=what, t=t, who=who))
    return L


# ---- moments and linearisation ------------------------------------------------------------------------
def gaussian_moments(d, *, role: str = "distribution", model=None, method: str = "the EKF"):
    r"""Mean ``(..., K)`` and covariance ``(..., K, K)`` of a Gaussian distribution.

    Accepted: ``Independent(Normal, 1)`` (``Normal(loc, scale).to_event(1)``: covariance
    :math:`\operatorname{diag}(\text{scale}^2)`), ``MultivariateNormal``, ``LowRankMultivariateNormal``.
    Anything else raises :class:`~ppl_rnn.errors.ModelCapabilityError` naming the requirement.
    """
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, Normal):
        loc, scale = torch.broadcast_tensors(d.base_dist.loc, d.base_dist.scale)
        return loc, torch.diag_embed(scale**2)
    if isinstance(d, (MultivariateNormal, LowRankMultivariateNormal)):
        return d.loc, d.covariance_matrix
    who = f"{type(model).__name__}.{role}()" if model is not None else role
    found = type(d).__name__
    if isinstance(d, Independent):
        found = f"{type(d.base_dist).__name__}(...).to_event({d.reinterpreted_batch_ndims})"
    raise ModelCapabilityError(
        f"{method} needs Gaussian conditionals with a differentiable mean: every {role} must be "
        f"Normal(loc, scale).to_event(1) or MultivariateNormal; {who} returned {found}"
        f"{'' if not hasattr(d, 'event_shape') else f' with event_shape {tuple(d.event_shape)}'}. "
        "Use ParticleFilter / ParticleSmoother (any distributions), or return a Gaussian from that method."
    )


def linearize(fn: Callable, x: torch.Tensor, *, role: str = "conditional", model=None, method: str = "the EKF",
              jacobian: Callable | None = None):
    r"""Linearise a Gaussian conditional ``fn(x)`` around ``x`` (``(..., H)``, any leading dims).

    Returns ``(mean, jacobian, cov)``: :math:`\mu(x)` ``(..., K)``, :math:`\partial\mu/\partial x`
    ``(..., K, H)`` and the covariance at ``x`` ``(..., K, K)``. The Jacobian rows are vector-Jacobian
    products of the mean summed over the leading dims (exact when rows do not interact,
    :math:`\partial\sum_b\mu(x)_b/\partial x_b = \partial\mu(x)_b/\partial x_b`): one backward pass per output
    dimension for small ``K``, :func:`torch.func.jacrev` otherwise. Under grad mode the result is differentiable
    with respect to the model's parameters (``create_graph``); under ``torch.no_grad()`` it is detached.
    ``jacobian``: optional analytic Jacobian ``x -> (..., K, H)`` (a model capability); used instead of autograd
    unless it returns None.
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


# ---- conditioning on observed entries and the measurement updates --------------------------------------
def masked_covariance(mf: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    r""":math:`MRM + (I-M)` for a float mask ``mf`` ``(..., D)`` (1 = observed): the observed block of ``R``,
    unit variance on the missing entries, no cross terms — so a Gaussian density of the residual zeroed on
    the missing entries is the observed entries' marginal density times :math:`(2\pi)^{-|\bar o|/2}`."""
    mm = mf.unsqueeze(-1) * mf.unsqueeze(-2)
    eye_d = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return R * mm + torch.diag_embed(1.0 - mf) * eye_d


def masked_observation(mask: torch.Tensor, C: torch.Tensor, R: torch.Tensor):
    r"""``(mf, MC, MRM + (I-M))`` for an element mask ``(..., D)`` (True = observed; see module docstring):
    ``mf`` the mask as floats ``(..., D)``, then the observation matrix and noise covariance of the observed
    entries padded with unit-variance pseudo-observations. Multiply the residual by ``mf``."""
    mf = mask.to(C.dtype)
    return mf, mf.unsqueeze(-1) * C, masked_covariance(mf, R)


def kalman_update(m_pred, P_pred, y, mask, C, offset, R):
    r"""One measurement update with an element mask, batched (see module docstring). Returns ``(m, P, log_lik)``.

    ``m_pred`` ``(B,H)``, ``P_pred`` ``(B,H,H)``, ``y``/``mask`` ``(B,D)``; ``C``: ``(D,H)`` or ``(B,D,H)``;
    ``offset``: ``(B,D)`` or ``(D,)`` (the predicted observation is :math:`C m^- + \text{offset}`); ``R``:
    ``(D,D)`` or ``(B,D,D)``. Raises ``torch.linalg.LinAlgError`` when :math:`S` does not factorise (see
    :func:`safe_update`).
    """
    mf, Cm, Rm = masked_observation(mask, C, R)
    resid = (y - matvec(C, m_pred) - offset) * mf
    PCt = P_pred @ Cm.transpose(-1, -2)
    S = symmetrize(Cm @ PCt + Rm)
    L = torch.linalg.cholesky(S)
    K = torch.cholesky_solve(PCt.transpose(-1, -2), L).transpose(-1, -2)  # (B,H,D)
    m = m_pred + matvec(K, resid)
    eye_h = torch.eye(P_pred.shape[-1], dtype=P_pred.dtype, device=P_pred.device)
    IKC = eye_h - K @ Cm
    P = symmetrize(IKC @ P_pred @ IKC.transpose(-1, -2) + K @ Rm @ K.transpose(-1, -2))
    z = torch.linalg.solve_triangular(L, resid.unsqueeze(-1), upper=False).squeeze(-1)
    n_obs = mf.sum(-1)
    ll = -0.5 * (z**2).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) - 0.5 * n_obs * LOG_2PI
    return m, P, ll


def scalar_update(m_pred, P_pred, resid, mf, C, r2, *, full: bool):
    r""":func:`kalman_update` for a scalar observation (``D=1``): the same maths (masking, Joseph form,
    log-likelihood) with :math:`S` a scalar, so no factorisation and an autograd graph of cheap element-wise ops.

    ``resid``: the residual :math:`y - Cm^- - e` ``(..., 1)`` (zeroed where missing), ``mf``: the mask as floats
    ``(..., 1)``, ``C``: ``(..., 1, H)``, ``r2``: the observation noise variance ``(..., 1)``; ``full``: the entry
    is observed in every sequence (skips the masking ops). Returns ``(m, P, log_lik)``, or None when
    :math:`S` is not positive and finite somewhere (then take :func:`safe_update`'s general path).
    """
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
    P = symmetrize(matmul(matmul(IKC, P_pred), IKC.transpose(-1, -2)) + r2.unsqueeze(-1) * (Kc * Kc.transpose(-1, -2)))
    ll = -0.5 * (resid * resid / S + torch.log(S) + (LOG_2PI if full else LOG_2PI * mf))
    return m, P, ll.squeeze(-1)


def safe_update(m_pred, P_pred, y, mask, C, offset, R, *, t: int | None = None, who: str = "EKF"):
    """:func:`kalman_update` with diagonal jitter on ``R`` (and a :class:`NumericalJitterWarning`) if the
    innovation Cholesky fails; scalar observations take the equivalent :func:`scalar_update`."""
    if R.shape[-1] == 1:
        mf = mask.to(m_pred.dtype)
        resid = (y - matvec(C, m_pred) - offset) * mf
        out = scalar_update(m_pred, P_pred, resid, mf, C, R[..., 0], full=False)
        if out is not None:
            return out
    try:
        return kalman_update(m_pred, P_pred, y, mask, C, offset, R)
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    base = jitter_scale(R.detach() + (C @ P_pred @ C.transpose(-1, -2)).detach())
    eps = torch.finfo(R.dtype).eps
    for k in range(12):
        jit = base * eps * 10.0 ** (k + 2)
        try:
            out = kalman_update(m_pred, P_pred, y, mask, C, offset, R + jit * eye)
        except torch.linalg.LinAlgError:
            continue
        warnings.warn(
            f"{who}: {_where('innovation covariance', t)} was not positive definite; added jitter "
            f"{float(jit.max()):.3g} to the observation noise.", NumericalJitterWarning, stacklevel=3,
        )
        return out
    raise ModelCapabilityError(
        f"{who}: {_where('innovation covariance', t)} is not positive definite even after jitter. Check the "
        "model's observation noise (it must be > 0) and the data."
    )


def smoother_gain(A: torch.Tensor, P_filt: torch.Tensor, P_pred: torch.Tensor,
                  chol_pred: torch.Tensor | None = None) -> torch.Tensor:
    r"""The backward (RTS) gain :math:`J = P_tA^\top(P^-_{t+1})^{-1}` of :math:`h_{t+1} = Ah_t + \text{noise}`,
    :math:`P^-_{t+1} = AP_tA^\top + Q`: conditioning the filtered :math:`h_t\sim N(m_t,P_t)` on :math:`h_{t+1}`,

    .. math:: h_t\mid h_{t+1} \sim N\big(m_t + J(h_{t+1}-m^-_{t+1}),\ P_t - JP^-_{t+1}J^\top\big).

    A solve with the Cholesky factor of :math:`P^-_{t+1}` (``chol_pred`` if the caller has it), batched."""
    L = torch.linalg.cholesky(P_pred) if chol_pred is None else chol_pred
    return torch.cholesky_solve((P_filt @ A.transpose(-1, -2)).transpose(-1, -2), L).transpose(-1, -2)


# ---- sampling -----------------------------------------------------------------------------------------
def gaussian_sampler(mean: torch.Tensor, cov: torch.Tensor) -> Callable[[int], torch.Tensor]:
    r"""``num -> (num, ...)`` reparameterised draws :math:`m + L\varepsilon` from :math:`N(m, P)`
    (``mean`` ``(..., H)``, ``cov`` ``(..., H, H)``; :math:`L` by :func:`cholesky_pd`, factorised at the first
    call)."""
    memo: list = []

    def sample(num: int) -> torch.Tensor:
        if not memo:
            memo.append(cholesky_pd(cov, what="Gaussian to sample", who="gaussian_sampler"))
        L = memo[0]
        eps = torch.randn((num,) + mean.shape, dtype=L.dtype, device=L.device)
        return mean + matvec(L, eps)

    return sample


__all__ = [
    "LOG_2PI", "NumericalJitterWarning", "symmetrize", "matvec", "matmul", "psd_cholesky", "jitter_scale",
    "ensure_pd", "cholesky_pd", "gaussian_moments", "linearize", "masked_observation", "kalman_update",
    "scalar_update", "safe_update", "smoother_gain", "gaussian_sampler",
]
