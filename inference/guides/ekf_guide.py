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
Sites are sampled in the order ``h_{T-1}, …, h_0``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.method import check_positive_float

from ..ekf import ensure_pd, extended_kalman_filter, gaussian_moments
from ..kalman import _mv, _sym
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
        T, H = y.shape[1], f.filt_mean.shape[-1]
        eye = torch.eye(H, dtype=f.filt_mean.dtype, device=f.filt_mean.device)

        def chol(cov, t):
            cov = _sym(cov) + 1e-12 * eye
            # cholesky_ex: torch.linalg.cholesky is ~100x slower on tiny batches with >1 intra-op thread
            L, info = torch.linalg.cholesky_ex(cov)
            if bool((info > 0).any()):
                L = torch.linalg.cholesky(ensure_pd(cov, what="EKF guide conditional covariance", t=t))
            return L

        scale = kappa**0.5 if isinstance(kappa, float) else kappa.sqrt()
        hs = [None] * T
        h = pyro.sample(f"h_{T - 1}", dist.MultivariateNormal(f.filt_mean[:, -1],
                                                             scale_tril=scale * chol(f.filt_cov[:, -1], T - 1)))
        hs[-1] = h
        F = f.transition_jacobian
        for t in range(T - 2, -1, -1):
            Pf, Pp = f.filt_cov[:, t], f.pred_cov[:, t + 1]
            Lp = chol(Pp, t + 1)
            J = torch.cholesky_solve((Pf @ F[:, t + 1].transpose(-1, -2)).transpose(-1, -2), Lp).transpose(-1, -2)
            loc = f.filt_mean[:, t] + _mv(J, h - f.pred_mean[:, t + 1])
            cov = Pf - J @ Pp @ J.transpose(-1, -2)
            h = pyro.sample(f"h_{t}", dist.MultivariateNormal(loc, scale_tril=scale * chol(cov, t)))
            hs[t] = h
        return hs


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
