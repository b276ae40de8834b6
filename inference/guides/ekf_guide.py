r"""EKF guide: the extended Kalman smoother's Gaussian at the model's current parameters.

With the EKF's filtered moments :math:`(m_t, P_t)`, predicted moments :math:`(m^-_t, P^-_t)` and
transition Jacobians :math:`F_t` (:func:`~ppl_rnn.inference.ekf.extended_kalman_filter`), the smoother's
joint Gaussian is sampled backwards (forward-filter backward-sample, reparameterised):

.. math::
    q(h_{T-1}) = N(m_{T-1},\ \kappa P_{T-1}),\qquad
    q(h_t\mid h_{t+1}) = N\big(m_t + J_t(h_{t+1}-m^-_{t+1}),\ \kappa\,(P_t - J_tP^-_{t+1}J_t^\top)\big),\quad
    J_t = P_tF_{t+1}^\top(P^-_{t+1})^{-1}

where :math:`\kappa>0` is an optional learned covariance inflation (``learn_inflation=True``; default 1).
On a linear-Gaussian model (and :math:`\kappa=1`) :math:`q` is the exact posterior, so the ELBO equals
the log-evidence. The guide has no free parameters besides :math:`\kappa`: it follows the model, and with
``detach_model=False`` (default) the ELBO gradient flows through the EKF into the model's parameters.
It needs Gaussian conditionals; otherwise it raises :class:`~ppl_rnn.errors.ModelCapabilityError`.
Sites are sampled in the order ``h_{T-1}, …, h_0``. The backward conditionals' gains, offsets and Cholesky
factors do not depend on the draws, so they are computed for all steps at once; only
:math:`h_t = c_t + J_th_{t+1} + \sqrt\kappa L_t\varepsilon_t` runs step by step, and each site is a light-weight
:class:`GaussianStep` whose ``log_prob`` of its own draw needs no triangular solve.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.gaussian import cholesky_pd, gaussian_moments, matvec, smoother_gain
from ppl_rnn.method import check_positive_float

from ..ekf import extended_kalman_filter
from .base import StateGuide


class EKFGuide(StateGuide):
    """The extended Kalman smoother's Gaussian as a guide (see module docstring).

    Args:
        model: optional; the model (SVI binds it otherwise).
        learn_inflation: learn a scalar covariance inflation :math:`\\kappa` (initial ``inflation``).
        inflation: initial (or fixed) :math:`\\kappa`.
        detach_model: run the EKF without gradients to the model's parameters (the model is then trained on
            :math:`E_q[\\log p_\\theta(h,y)]` with :math:`q` held fixed — EM-like, cheaper).
    """

    amortized = True
    sample_order = "backward"

    def __init__(self, model=None, *, learn_inflation: bool = False, inflation: float = 1.0,
                 detach_model: bool = False):
        self.learn_inflation = bool(learn_inflation)
        self.detach_model = bool(detach_model)
        self._init_inflation = check_positive_float(inflation, "inflation")
        super().__init__(model)

    def _on_bind(self, model):
        check_gaussian(model, "EKFGuide")
        if self.learn_inflation and "inflation" not in self._pyro_params:
            self.inflation = PyroParam(torch.tensor(self._init_inflation, dtype=self._dtype),
                                       constraint=constraints.positive)

    def _kappa(self):
        return self.inflation if self.learn_inflation else self._init_inflation

    def _sample_states(self, y, mask, u):
        model = self.model
        if self.detach_model:
            with torch.no_grad():
                f = extended_kalman_filter(model, y, mask, u, method="EKFGuide")
        else:
            f = extended_kalman_filter(model, y, mask, u, method="EKFGuide")
        kappa = self._kappa()
        T = y.shape[1]
        scale = kappa**0.5 if isinstance(kappa, float) else kappa.sqrt()
        # the backward conditionals' parameters do not depend on the draws: compute them for all t at once,
        # J_t = P_t F_{t+1}^T (P^-_{t+1})^{-1}, c_t = m_t - J_t m^-_{t+1}, L_t = chol(P_t - J_t P^-_{t+1} J_t^T)
        Lf = scale * _chol(f.filt_cov[:, -1], "EKF guide final filtering covariance")
        h = pyro.sample(f"h_{T - 1}", GaussianStep(f.filt_mean[:, -1], Lf))
        hs = [None] * T
        hs[-1] = h
        if T == 1:
            return hs
        Pf, Pp, F = f.filt_cov[:, :-1], f.pred_cov[:, 1:], f.transition_jacobian[:, 1:]
        Lp = _chol(Pp, "EKF guide predicted covariance")
        J = smoother_gain(F, Pf, Pp, Lp)
        c = f.filt_mean[:, :-1] - matvec(J, f.pred_mean[:, 1:])
        L = scale * _chol(Pf - J @ Pp @ J.transpose(-1, -2), "EKF guide conditional covariance")
        hld = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        Js, cs, Ls, hlds = J.unbind(1), c.unbind(1), L.unbind(1), hld.unbind(1)
        for t in range(T - 2, -1, -1):
            loc = cs[t] + (Js[t] @ h.unsqueeze(-1)).squeeze(-1)
            h = pyro.sample(f"h_{t}", GaussianStep(loc, Ls[t], hlds[t]))
            hs[t] = h
        return hs


class GaussianStep(TorchDistribution):
    r""":math:`N(\text{loc}, LL^\top)` with a lower-triangular ``scale_tril`` :math:`L` (one guide site), light-weight.

    Its reparameterised draw is :math:`x=\text{loc}+L\varepsilon`; ``log_prob`` of that very draw is evaluated as
    :math:`-\tfrac12|\varepsilon|^2-\log|L|-\tfrac H2\log 2\pi`, which equals the generic
    :math:`\log N(x;\text{loc},LL^\top)` identically in the parameters (:math:`L^{-1}(x-\text{loc})=\varepsilon`), so the
    value and its gradient are those of ``MultivariateNormal``, without a triangular solve per site.
    Other values take the solve. ``half_log_det``: optional precomputed :math:`\log|L|`.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, half_log_det: torch.Tensor | None = None):
        if half_log_det is None:
            half_log_det = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
        self.loc, self.scale_tril, self.half_log_det = loc, scale_tril, half_log_det
        self._draw = None
        batch = torch.broadcast_shapes(loc.shape[:-1], scale_tril.shape[:-2], half_log_det.shape)
        super().__init__(batch, loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        H = self.event_shape[0]
        return GaussianStep(self.loc.expand(batch_shape + (H,)), self.scale_tril.expand(batch_shape + (H, H)),
                            self.half_log_det.expand(batch_shape))

    @property
    def mean(self):
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self):
        return (self.scale_tril**2).sum(-1).expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        x = self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        self._draw = (x, eps)
        return x

    def log_prob(self, value):
        if self._draw is not None and value is self._draw[0]:
            eps = self._draw[1]
        else:
            diff = (value - self.loc).unsqueeze(-1)
            L = self.scale_tril.expand(diff.shape[:-2] + self.scale_tril.shape[-2:])
            eps = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)
        H = self.event_shape[0]
        return -0.5 * (eps * eps).sum(-1) - self.half_log_det - 0.5 * H * math.log(2 * math.pi)


def _chol(cov: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky factors of a batch of covariances (symmetrised, a 1e-12 floor on the diagonal; diagonal jitter
    with a warning where a factorisation fails)."""
    return cholesky_pd(cov, what=what, who="EKFGuide", floor=1e-12)


def check_gaussian(model, who: str) -> None:
    """Raise :class:`ModelCapabilityError` unless the model's initial, transition and emission are Gaussian."""
    H = model.hidden_dim
    dt = model.dtype
    u = torch.zeros(1, model.input_dim, dtype=dt) if model.input_dim else None
    h = torch.zeros(1, H, dtype=dt)
    with torch.no_grad():
        for role, d in (("initial", lambda: model.initial_batched(u, (1,))),
                        ("transition", lambda: model.transition(1, h, u)),
                        ("emission", lambda: model.emission(0, h, u))):
            try:
                dd = d()
            except ModelCapabilityError:
                raise
            except Exception:  # a conditional that cannot be probed at zeros: the EKF will check it when run
                continue
            gaussian_moments(dd, role=role, model=model, method=f"{who} (the extended Kalman smoother's Gaussian)")
