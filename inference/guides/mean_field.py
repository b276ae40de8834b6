r"""Mean-field Gaussian guide: independent Gaussians over every hidden state,

.. math:: q_\phi(h_{0:T-1}) = \prod_{b}\prod_{t} N\big(h_{b,t};\ \mu_{b,t},\ \operatorname{diag}\sigma_{b,t}^2\big)

with free parameters :math:`\mu, \sigma` of shape ``(B, T, H)``. Cheapest guide; it cannot represent the
strong correlation between consecutive states, so its ELBO is loose when the process noise is small
relative to the state's posterior spread.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.method import check_choice, check_positive_float

from .base import StateGuide


class MeanFieldGuide(StateGuide):
    """Independent Gaussians :math:`q(h_t)=N(\\mu_t,\\operatorname{diag}\\sigma_t^2)` per sequence and step.

    Args:
        model: optional; the model whose sizes the guide takes (SVI binds it otherwise).
        init_scale: initial :math:`\\sigma`.
        init: ``"zeros"`` (means 0, scales ``init_scale``) or ``"eks"`` (the extended Kalman smoother's marginal
            means and standard deviations at the model's initial parameters; needs Gaussian conditionals).
    """

    def __init__(self, model=None, *, init_scale: float = 0.1, init: str = "zeros"):
        self.init_scale = check_positive_float(init_scale, "init_scale")
        self.init = check_choice(init, "init", ("zeros", "eks"))
        super().__init__(model)

    def _build(self, B, T):
        H = self._dims[0]
        self.loc = PyroParam(torch.zeros(B, T, H, dtype=self._dtype))
        self.scale = PyroParam(torch.full((B, T, H), self.init_scale, dtype=self._dtype),
                               constraint=constraints.positive)

    def _init_from_data(self, y, mask, u):
        if self.init != "eks":
            return
        mean, cov, _ = self._eks_moments(y, mask, u)
        self.loc = PyroParam(mean.detach().clone())
        self.scale = PyroParam(torch.diagonal(cov, dim1=-2, dim2=-1).sqrt().detach().clone(),
                               constraint=constraints.positive)

    def _sample_states(self, y, mask, u):
        # one unbind (O(T) backward), not a slice per step (each slice's backward is a full-size gradient: O(T^2))
        locs, scales = self.loc.unbind(1), self.scale.unbind(1)
        return [pyro.sample(f"h_{t}", dist.Normal(locs[t], scales[t]).to_event(1)) for t in range(y.shape[1])]
