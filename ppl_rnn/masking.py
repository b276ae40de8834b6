r"""Log-likelihood of partially observed vectors: the one rule for missing entries.

For an emission :math:`p(y_t \mid h_t)` with event dimension ``obs_dim`` and an element mask
:math:`m_t`, the contribution of step t is the marginal density of the observed entries,

.. math:: \log p(y_{t,o} \mid h_t) = \log \int p(y_t \mid h_t)\, dy_{t,\bar o}.

* ``Independent(Normal)`` (any factorising base): sum of the observed elements' log-densities.
* ``MultivariateNormal``: with :math:`M=\operatorname{diag}(m)`, the covariance
  :math:`\Sigma' = M\Sigma M + (I-M)` is block-diagonal (observed block :math:`\Sigma_{oo}`, identity on the
  missing entries) so :math:`\log N(y'; \mu', \Sigma') = \log N(y_o; \mu_o, \Sigma_{oo}) - \tfrac{|\bar o|}{2}\log 2\pi`
  with :math:`y'-\mu'` zeroed on missing entries. Exact and batched.
* any other distribution: only whole-step missingness (all or none of a step's entries) is supported.

A fully missing step contributes 0.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Independent, MultivariateNormal, TorchDistribution
from torch.distributions import constraints

from .errors import ModelCapabilityError
from .gaussian import masked_covariance


def masked_log_prob(dist, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Log-density of the observed entries of ``y`` (``mask`` True = observed), summed over the event dim.

    ``y`` must hold finite values at missing entries (any value: they do not matter).
    """
    if mask is None:
        return dist.log_prob(y)
    if isinstance(dist, Independent) and dist.reinterpreted_batch_ndims == 1:
        lp = dist.base_dist.log_prob(y)
        return torch.where(mask, lp, torch.zeros((), dtype=lp.dtype)).sum(-1)
    if isinstance(dist, MultivariateNormal):
        m = mask.to(y.dtype)
        cov2 = masked_covariance(m, dist.covariance_matrix)
        diff = (y - dist.loc) * m
        L = torch.linalg.cholesky(cov2)
        sol = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
        n_obs = m.sum(-1)
        logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (sol**2).sum(-1) - logdet - 0.5 * n_obs * math.log(2 * math.pi)
    # generic: whole-step missingness only
    full = mask.all(-1)
    none = (~mask).all(-1)
    if not bool((full | none).all()):
        raise ModelCapabilityError(
            f"partially missing observation vectors need an emission that factorises (Independent) or is "
            f"MultivariateNormal; found {type(dist).__name__}. Mark whole steps missing instead, or return "
            "Normal(...).to_event(1) from emission()."
        )
    y_safe = torch.where(mask, y, dist.mean.detach() if _has_mean(dist) else y)
    lp = dist.log_prob(y_safe)
    return torch.where(full, lp, torch.zeros_like(lp))


def _has_mean(dist) -> bool:
    try:
        _ = dist.mean
        return True
    except NotImplementedError:
        return False


class PartiallyObserved(TorchDistribution):
    """Wrap an emission so that its ``log_prob`` counts only the observed entries (see module docstring).

    Used as the observation site of the Pyro program, so Pyro's SVI, ``poutine.trace`` and SMC agree on
    the likelihood of data with missing entries.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base, mask: torch.Tensor, validate_args=None):
        self.base = base
        self.obs_mask = mask
        batch_shape = torch.broadcast_shapes(base.batch_shape, mask.shape[:-1])
        super().__init__(batch_shape, base.event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self):
        return constraints.real_vector

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return PartiallyObserved(self.base.expand(batch_shape), self.obs_mask.expand(batch_shape + self.event_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        return masked_log_prob(self.base, value, self.obs_mask)
