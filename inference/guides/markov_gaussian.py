r"""Structured Markov Gaussian guide: a linear-Gaussian chain with free parameters per step,

.. math::
    q_\phi(h_0)=N(b_0,\operatorname{diag}s_0^2),\qquad
    q_\phi(h_t\mid h_{t-1}) = N\big(A_t h_{t-1} + b_t,\ \operatorname{diag}s_t^2\big),

per sequence (``A``: ``(B,T,H,H)``, ``b``, ``s``: ``(B,T,H)``). The exact smoothing posterior of a
linear-Gaussian model factorises the same way (with full conditional covariances), so for ``H=1`` — or
with ``covariance="full"``, which replaces :math:`\operatorname{diag}s_t^2` by :math:`L_tL_t^\top` with a
free lower-triangular :math:`L_t` — the family contains it and the ELBO can reach the exact evidence.

Cost: one pass is :math:`O(T)`, forwards and backwards: the per-step parameters are taken from the
``(B, T, ...)`` tensors by one ``unbind`` (a slice per step would make the backward pass :math:`O(T^2)`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.method import check_choice, check_positive_float

from .base import StateGuide


class MarkovGaussianGuide(StateGuide):
    """:math:`q(h_t\\mid h_{t-1}) = N(A_t h_{t-1} + b_t, \\operatorname{diag} s_t^2)` with free per-step parameters.

    Args:
        model: optional; the model whose sizes the guide takes.
        init_scale: initial :math:`s_t`.
        covariance: ``"diag"`` (default) or ``"full"`` (free lower-triangular scale per step).
        init: ``"zeros"`` (:math:`A_t=0, b_t=0, s_t=` ``init_scale``) or ``"eks"``: the extended Kalman smoother's
            Gaussian written forwards, :math:`A_t=\\Sigma_{t,t-1}\\Sigma_{t-1}^{-1}`,
            :math:`b_t=m_t-A_tm_{t-1}`, :math:`s_t^2=\\operatorname{diag}(\\Sigma_t-A_t\\Sigma_{t-1,t})` (a warm start; needs
            Gaussian conditionals).
    """

    def __init__(self, model=None, *, init_scale: float = 0.1, covariance: str = "diag", init: str = "zeros"):
        self.init = check_choice(init, "init", ("zeros", "eks"))
        self.init_scale = check_positive_float(init_scale, "init_scale")
        self.covariance = check_choice(covariance, "covariance", ("diag", "full"))
        super().__init__(model)

    def _build(self, B, T):
        H = self._dims[0]
        dt = self._dtype
        self.A = PyroParam(torch.zeros(B, T, H, H, dtype=dt))
        self.b = PyroParam(torch.zeros(B, T, H, dtype=dt))
        if self.covariance == "diag":
            self.s = PyroParam(torch.full((B, T, H), self.init_scale, dtype=dt), constraint=constraints.positive)
        else:
            L = self.init_scale * torch.eye(H, dtype=dt).expand(B, T, H, H).clone()
            self.L = PyroParam(L, constraint=constraints.lower_cholesky)

    def _init_from_data(self, y, mask, u):
        if self.init != "eks":
            return
        mean, cov, cross = self._eks_moments(y, mask, u)
        A = torch.zeros_like(cov)
        # A_t = Cov(h_t, h_{t-1}) Cov(h_{t-1})^{-1}
        A[:, 1:] = torch.linalg.solve(cov[:, :-1], cross[:, 1:].transpose(-1, -2)).transpose(-1, -2)
        b = mean - (A @ torch.cat([torch.zeros_like(mean[:, :1]), mean[:, :-1]], 1).unsqueeze(-1)).squeeze(-1)
        S = cov - A @ cross.transpose(-1, -2)
        S = 0.5 * (S + S.transpose(-1, -2))
        self.A = PyroParam(A.detach().clone())
        self.b = PyroParam(b.detach().clone())
        if self.covariance == "diag":
            self.s = PyroParam(torch.diagonal(S, dim1=-2, dim2=-1).clamp_min(1e-12).sqrt().detach().clone(),
                               constraint=constraints.positive)
        else:
            eye = torch.eye(S.shape[-1], dtype=S.dtype)
            self.L = PyroParam(torch.linalg.cholesky(S + 1e-12 * eye).detach().clone(),
                               constraint=constraints.lower_cholesky)

    def _sample_states(self, y, mask, u):
        # unbind once: one autograd node whose backward stacks the per-step gradients (O(T)); a slice A[:, t] per
        # step would build a full-size (B, T, ...) gradient per step (O(T^2) per SVI step)
        As, bs = self.A.unbind(1), self.b.unbind(1)
        diag = self.covariance == "diag"
        scales = (self.s if diag else self.L).unbind(1)

        def q(t, loc):
            if diag:
                return dist.Normal(loc, scales[t]).to_event(1)
            return dist.MultivariateNormal(loc, scale_tril=scales[t])

        h = pyro.sample("h_0", q(0, bs[0]))
        hs = [h]
        for t in range(1, y.shape[1]):
            loc = (As[t] @ h.unsqueeze(-1)).squeeze(-1) + bs[t]
            h = pyro.sample(f"h_{t}", q(t, loc))
            hs.append(h)
        return hs
