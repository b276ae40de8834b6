r"""Linear-Gaussian state-space model.

.. math::
    h_0 &\sim N(m_0, P_0) \\
    h_t &= A h_{t-1} + B u_t + b + e_t, \quad e_t \sim N(0, Q) \\
    y_t &= C h_t + D u_t + d + v_t, \quad v_t \sim N(0, R)

Covariances are parameterised by their Cholesky factors (``constraints.lower_cholesky``: lower
triangular with a positive diagonal), so every parameter value is a valid model. All parameters are
learnable ``PyroParam`` s living on the module.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.gaussian import psd_cholesky
from ppl_rnn.model import LinearGaussianParams, StateSpaceModel, pack_params, set_param, unpack_params
from ppl_rnn.rng import check_seed


def _mat(x, shape, name):
    t = torch.as_tensor(x, dtype=torch.get_default_dtype()).clone()
    if tuple(t.shape) != tuple(shape):
        raise ConfigurationError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ConfigurationError(f"{name} must be finite; found NaN or ±inf in {t.tolist()}.")
    return t


def _chol(cov, n, name):
    c = _mat(cov, (n, n), name)
    if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-8):
        raise ConfigurationError(f"{name} must be symmetric positive definite; found a non-symmetric matrix "
                                 f"{c.tolist()}. Pass (M + M.T) / 2 or L @ L.T.")
    try:
        return torch.linalg.cholesky(c)
    except Exception as e:
        raise ConfigurationError(f"{name} must be symmetric positive definite; Cholesky failed: {e}") from e


class LinearGaussianSSM(StateSpaceModel):
    """Linear-Gaussian SSM. ``LinearGaussianSSM(hidden_dim, obs_dim=1, input_dim=0, *, A=..., ...)``: matrices
    default to a stable random ``A`` (spectral radius 0.9) and identity covariances scaled by 0.1 (process) and
    0.1 (observation)."""

    def __init__(
        self,
        hidden_dim: int,
        obs_dim: int = 1,
        input_dim: int = 0,
        *,
        A=None,
        B=None,
        b=None,
        C=None,
        D=None,
        d=None,
        Q=None,
        R=None,
        m0=None,
        P0=None,
        seed: int = 0,
    ):
        super().__init__(hidden_dim, obs_dim, input_dim)
        H, O, I = hidden_dim, obs_dim, input_dim
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        if A is None:
            A0 = torch.randn(H, H, generator=g, dtype=torch.float64)
            A = 0.9 * A0 / torch.linalg.eigvals(A0).abs().max()
        if C is None:
            C = torch.randn(O, H, generator=g, dtype=torch.float64) / H**0.5
        self.A = PyroParam(_mat(A, (H, H), "A"))
        self.b = PyroParam(_mat(torch.zeros(H) if b is None else b, (H,), "b"))
        self.C = PyroParam(_mat(C, (O, H), "C"))
        self.d = PyroParam(_mat(torch.zeros(O) if d is None else d, (O,), "d"))
        if I > 0:
            self.B = PyroParam(_mat(torch.zeros(H, I) if B is None else B, (H, I), "B"))
            self.D = PyroParam(_mat(torch.zeros(O, I) if D is None else D, (O, I), "D"))
        elif B is not None or D is not None:
            raise ConfigurationError("B/D given but input_dim=0; pass input_dim>0 to use inputs.")
        self.Q_tril = PyroParam(_chol(0.1 * torch.eye(H) if Q is None else Q, H, "Q"), constraint=constraints.lower_cholesky)
        self.R_tril = PyroParam(_chol(0.1 * torch.eye(O) if R is None else R, O, "R"), constraint=constraints.lower_cholesky)
        self.m0 = PyroParam(_mat(torch.zeros(H) if m0 is None else m0, (H,), "m0"))
        self.P0_tril = PyroParam(_chol(torch.eye(H) if P0 is None else P0, H, "P0"), constraint=constraints.lower_cholesky)

    def initial(self, u0):
        return dist.MultivariateNormal(self.m0, scale_tril=self.P0_tril)

    def transition(self, t, h_prev, u_t):
        loc = h_prev @ self.A.T + self.b
        if u_t is not None:
            loc = loc + u_t @ self.B.T
        return dist.MultivariateNormal(loc, scale_tril=self.Q_tril)

    def emission(self, t, h, u_t):
        loc = h @ self.C.T + self.d
        if u_t is not None:
            loc = loc + u_t @ self.D.T
        return dist.MultivariateNormal(loc, scale_tril=self.R_tril)

    # ---- capabilities (declared in ppl_rnn.capabilities) ------------------------------------
    def linear_gaussian(self) -> LinearGaussianParams:
        Lq, Lr, Lp = self.Q_tril, self.R_tril, self.P0_tril
        return LinearGaussianParams(
            A=self.A, b=self.b, Q=Lq @ Lq.T, C=self.C, d=self.d, R=Lr @ Lr.T, m0=self.m0, P0=Lp @ Lp.T,
            B=self.B if self.input_dim else None, D=self.D if self.input_dim else None,
        )

    @torch.no_grad()
    def set_linear_gaussian(self, params: LinearGaussianParams) -> None:
        """Set every parameter from ``params`` (covariances through their Cholesky factors, with a tiny
        jitter if one is only semi-definite)."""
        dt = self.A.dtype
        for name in ("A", "b", "C", "d", "m0") + (("B", "D") if self.input_dim else ()):
            v = getattr(params, name)
            if v is not None:
                set_param(self, name, v.detach().to(dt))
        for name, cov in (("Q_tril", params.Q), ("R_tril", params.R), ("P0_tril", params.P0)):
            set_param(self, name, psd_cholesky(cov.detach().to(dt)))

    def linear_special_case(self) -> LinearGaussianSSM:
        return self.copy()

    def linear_gaussian_emission(self, t, u_t):
        r""":math:`y_t = C h_t + D u_t + d + v_t,\ v_t\sim N(0,R)`: ``(C, D u_t + d, R)``."""
        off = self.d if u_t is None else u_t @ self.D.T + self.d
        return self.C, off, self.R_tril @ self.R_tril.T

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        return self.A.expand(h_prev.shape[:-1] + self.A.shape)

    def emission_jacobian(self, t, h, u_t):
        return self.C.expand(h.shape[:-1] + self.C.shape)

    def noise_scales(self) -> dict[str, torch.Tensor]:
        """Lower-triangular scale matrices: ``initial`` = P0_tril, ``process`` = Q_tril, ``obs`` = R_tril."""
        return {"initial": self.P0_tril, "process": self.Q_tril, "obs": self.R_tril}

    @torch.no_grad()
    def set_noise_scales(self, **scales: torch.Tensor) -> None:
        names = {"initial": "P0_tril", "process": "Q_tril", "obs": "R_tril"}
        for role, v in scales.items():
            if role not in names:
                raise ConfigurationError(f"noise role must be one of {sorted(names)}; found {role!r}.")
            cur = getattr(self, names[role])
            v = torch.as_tensor(v, dtype=cur.dtype)
            set_param(self, names[role], torch.diag_embed(v.expand(cur.shape[:1])) if v.dim() < 2 else v)

    def _weight_names(self) -> tuple[str, ...]:
        return ("A", "b", "C", "d", "m0") + (("B", "D") if self.input_dim else ())

    def weights(self) -> torch.Tensor:
        """``(A, b, C, d, m0[, B, D])`` flattened (detached copy)."""
        return pack_params(self, self._weight_names())

    def set_weights(self, vector: torch.Tensor) -> None:
        unpack_params(self, self._weight_names(), vector)
