r"""Autoregressive models AR(p) per observed dimension, in companion form:

.. math:: y_{t,d} = c_d + \sum_{i=1}^{p}\phi_{d,i}\,y_{t-i,d} + \varepsilon_{t,d},\qquad
          \varepsilon_{t,d}\sim N(0,\sigma_d^2),

with state :math:`h_t = (y_t, y_{t-1}, \dots, y_{t-p+1})` per dimension (hidden size :math:`pD`), transition
the companion matrix, and emission :math:`y_t = h_{t,0}`.

**Two forms.** The process itself is a *singular* linear-Gaussian model: the lags are copied exactly (zero
noise) and the emission has no noise, so given :math:`y_{0:t-1}` (all of the last :math:`p` values observed)
the state is known and :math:`p(y_t\mid y_{0:t-1}) = N(c + \phi^\top y_{t-1:t-p},\ \sigma^2)`, the AR's own
conditional likelihood. The capability ``singular_linear_gaussian`` returns that form; the yardstick
(:func:`ppl_rnn.workbench.evaluate.evaluate`) scores and forecasts with it by exact Kalman filtering (which
also marginalises missing lags exactly). The model's three conditionals — the Pyro program that particle
filters, SVI, ``Predictive`` and the ``linear_gaussian`` capability (Kalman smoothing, the AR start of
``KalmanEM``) see — add a negligible regularising noise, :math:`10^{-3}` of the series' scale, to the lags and
the emission, which keeps every covariance positive definite (a zero-noise emission gives a particle filter
zero weights and an RTS smoother a singular predicted covariance). Their log-evidence is therefore *near*
the AR's, not equal to it, and the further off the smaller the innovation :math:`\sigma_d` is against the
series' scale (a smooth series). The fitting methods (``Persistence``, ``LinearAR``) are in
:mod:`ppl_rnn.inference.reference`.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ppl_rnn.model import LinearGaussianParams, StateSpaceModel

__all__ = ["ARStateSpace"]

_TINY = 1e-3


class ARStateSpace(StateSpaceModel):
    """Independent AR(p) models per observed dimension in companion form (see module docstring).

    ``phi`` ``(D, p)``, ``c`` ``(D,)``, ``sigma`` ``(D,)`` innovation scales, ``scale`` ``(D,)`` the series'
    scale (sets the regularising noises of the conditionals and the initial spread), ``level`` ``(D,)`` the
    series' mean (the initial state's mean). Initial state: every component N(level, (2 scale)^2), independently.
    """

    def __init__(self, phi, c, sigma, scale, level, dtype=None):
        phi = torch.as_tensor(phi, dtype=dtype or torch.get_default_dtype())
        D, p = phi.shape
        super().__init__(hidden_dim=D * p, obs_dim=D)
        dt = phi.dtype
        self.order = p
        self.register_buffer("phi", phi.clone())
        self.register_buffer("c", torch.as_tensor(c, dtype=dt).clone())
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=dt).clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=dt).clone())
        self.register_buffer("level", torch.as_tensor(level, dtype=dt).clone())
        H = D * p
        A = torch.zeros(H, H, dtype=dt)
        b = torch.zeros(H, dtype=dt)
        q = torch.empty(H, dtype=dt)
        C = torch.zeros(D, H, dtype=dt)
        for d in range(D):
            o = d * p
            A[o, o:o + p] = self.phi[d]
            for i in range(1, p):
                A[o + i, o + i - 1] = 1.0
            b[o] = self.c[d]
            q[o:o + p] = _TINY * self.scale[d]
            q[o] = self.sigma[d]
            C[d, o] = 1.0
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.register_buffer("q", q)
        self.register_buffer("Cmat", C)
        self.register_buffer("r", _TINY * self.scale)
        self.register_buffer("m0", self.level.repeat_interleave(p))
        self.register_buffer("s0", (2.0 * self.scale).repeat_interleave(p))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def initial(self, u0):
        return dist.Normal(self.m0, self.s0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(h_prev @ self.A.T + self.b, self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h @ self.Cmat.T, self.r).to_event(1)

    # ---- capabilities (declared in ppl_rnn.capabilities) ------------------------------------
    def linear_gaussian(self) -> LinearGaussianParams:
        return LinearGaussianParams(A=self.A, b=self.b, Q=torch.diag(self.q**2), C=self.Cmat,
                                    d=torch.zeros(self.obs_dim, dtype=self.dtype), R=torch.diag(self.r**2),
                                    m0=self.m0, P0=torch.diag(self.s0**2), diagonal_noise=True)

    def singular_linear_gaussian(self) -> LinearGaussianParams:
        r"""The AR process itself (module docstring): :math:`Q` = diag of :math:`\sigma_d^2` on each block's first
        state and 0 on its lags, :math:`R = 0`; the same :math:`A, b, C, m_0, P_0` as :meth:`linear_gaussian`."""
        H = self.hidden_dim
        q = torch.zeros(H, dtype=self.dtype)
        q[torch.arange(self.obs_dim) * self.order] = self.sigma
        return LinearGaussianParams(A=self.A, b=self.b, Q=torch.diag(q**2), C=self.Cmat,
                                    d=torch.zeros(self.obs_dim, dtype=self.dtype),
                                    R=torch.zeros(self.obs_dim, self.obs_dim, dtype=self.dtype),
                                    m0=self.m0, P0=torch.diag(self.s0**2), diagonal_noise=True)

    def linear_gaussian_emission(self, t, u_t):
        return self.Cmat, torch.zeros(self.obs_dim, dtype=self.dtype), torch.diag(self.r**2)

    def transition_loc_scale(self, t, h_prev, u_t):
        return h_prev @ self.A.T + self.b, self.q

    def emission_loc_scale(self, t, h, u_t):
        return h @ self.Cmat.T, self.r
