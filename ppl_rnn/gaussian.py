r"""The Gaussian toolkit: symmetric positive-definite repair and factorisation shared by the models and by
every Gaussian method (Kalman, EKF/EKS, the EKF proposal and guide, the fully adapted particle filter).

* :func:`psd_cholesky`: :math:`L` with :math:`L L^\top = \tfrac12(S + S^\top) + \epsilon I`, the smallest
  jitter :math:`\epsilon \in \{0, 10^{-12}\bar s, 10^{-11}\bar s, \dots\}` (:math:`\bar s` the mean diagonal
  magnitude) for which the factorisation succeeds.
"""

from __future__ import annotations

import torch


def symmetrize(P: torch.Tensor) -> torch.Tensor:
    r""":math:`\tfrac12(P + P^\top)` over the last two dims."""
    return 0.5 * (P + P.transpose(-1, -2))


def psd_cholesky(S: torch.Tensor, *, tries: int = 6) -> torch.Tensor:
    """Cholesky factor of the symmetrised ``S`` with the smallest relative jitter that works (see module)."""
    S = symmetrize(S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    jitter = 0.0
    for _ in range(tries):
        try:
            return torch.linalg.cholesky(S + jitter * eye)
        except RuntimeError:
            jitter = max(jitter * 10, 1e-12 * float(torch.diagonal(S, dim1=-2, dim2=-1).abs().mean()) + 1e-15)
    return torch.linalg.cholesky(S + jitter * eye)


__all__ = ["symmetrize", "psd_cholesky"]
