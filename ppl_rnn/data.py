"""Validation of observations and exogenous inputs: the one place where data are checked.

Conventions (``docs/design.md``, "Data conventions"):

* ``observations``: float tensor ``(num_sequences, num_steps, obs_dim)``; a single series
  ``(num_steps, obs_dim)`` is promoted to one sequence. **NaN marks a missing entry** (per element).
* ``inputs``: ``(num_sequences, num_steps, input_dim)`` (a ``(num_steps, input_dim)`` array is promoted
  and broadcast over sequences). Inputs may not be missing.
* ±inf, wrong ranks, mismatched lengths and non-float dtypes raise :class:`~ppl_rnn.errors.DataError`
  naming the argument, the shape found and the shape expected.
* Nothing here mutates the caller's tensors: the returned tensors are fresh copies.
* Data follow the **model's** dtype (:func:`prepare`): float64 data given to a float32 model are cast to
  float32 (about 7 significant digits), and a :class:`PrecisionWarning` says so once per process. Use
  ``model.double()`` to compute in float64, or pass float32 data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError


@dataclass(frozen=True)
class Data:
    """Validated data.

    observations: ``(B, T, D)``, missing entries filled with 0 (see ``mask``)
    mask: ``(B, T, D)`` bool, True where observed
    inputs: ``(B, T, I)`` or None
    """

    observations: torch.Tensor
    mask: torch.Tensor
    inputs: torch.Tensor | None

    @property
    def num_sequences(self) -> int:
        return self.observations.shape[0]

    @property
    def num_steps(self) -> int:
        return self.observations.shape[1]

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[2]

    @property
    def num_observed(self) -> int:
        return int(self.mask.sum())

    def with_nan(self) -> torch.Tensor:
        """Observations with NaN at the missing entries (a copy)."""
        return self.observations.masked_fill(~self.mask, float("nan"))


def _to_tensor(x, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise DataError(f"{name} could not be converted to an array: {e}") from e
        if arr.dtype == object:
            raise DataError(f"{name} must be a numeric array; found an object array (ragged lists?). "
                            "Pad ragged sequences with NaN to a common length.")
        t = torch.as_tensor(arr)
    if not (t.is_floating_point()):
        raise DataError(
            f"{name} must have a floating dtype (float32 or float64); found {t.dtype}. "
            f"Convert with {name}.float() or np.asarray({name}, dtype=float)."
        )
    if dtype is not None:
        t = t.to(dtype)
    return t.clone()


def validate_observations(
    observations,
    *,
    obs_dim: int | None = None,
    dtype: torch.dtype | None = None,
    name: str = "observations",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(observations (B,T,D) with missing filled by 0, mask (B,T,D))``, validated and copied."""
    if observations is None:
        raise DataError(f"{name} is None; expected a float tensor of shape (num_sequences, num_steps, obs_dim).")
    y = _to_tensor(observations, name, dtype)
    if y.dim() == 1:
        raise DataError(
            f"{name} has shape {tuple(y.shape)} (rank 1); expected (num_steps, obs_dim) or "
            f"(num_sequences, num_steps, obs_dim). For a scalar series use {name}[:, None]."
        )
    if y.dim() == 2:
        y = y.unsqueeze(0)
    if y.dim() != 3:
        raise DataError(
            f"{name} has shape {tuple(y.shape)} (rank {y.dim()}); expected (num_sequences, num_steps, obs_dim)."
        )
    if y.shape[1] == 0 or y.shape[0] == 0:
        raise DataError(f"{name} has shape {tuple(y.shape)}; expected at least one sequence and one time step.")
    if obs_dim is not None and y.shape[-1] != obs_dim:
        raise DataError(
            f"{name} has shape {tuple(y.shape)}; expected last dimension obs_dim={obs_dim} to match the model "
            f"(found {y.shape[-1]})."
        )
    if torch.isinf(y).any():
        idx = torch.nonzero(torch.isinf(y))[0].tolist()
        raise DataError(
            f"{name} contains ±inf (first at index {tuple(idx)}); only NaN is allowed, and it marks a missing "
            "entry. Replace infinities with NaN if they are missing values."
        )
    mask = ~torch.isnan(y)
    y = y.masked_fill(~mask, 0.0)
    return y, mask


def validate_inputs(
    inputs,
    *,
    num_sequences: int,
    num_steps: int,
    input_dim: int,
    dtype: torch.dtype | None = None,
    name: str = "inputs",
) -> torch.Tensor | None:
    """Return inputs as ``(B, T, I)`` (a copy), or None for a model without inputs."""
    if inputs is None:
        if input_dim > 0:
            raise DataError(
                f"{name} is None but the model has input_dim={input_dim}; expected a float tensor of shape "
                f"({num_sequences}, {num_steps}, {input_dim})."
            )
        return None
    u = _to_tensor(inputs, name, dtype)
    expected = (num_sequences, num_steps, input_dim)
    if input_dim == 0:
        raise DataError(f"{name} given with shape {tuple(u.shape)} but the model takes no inputs (input_dim=0); "
                        "drop the argument or build the model with input_dim>0.")
    if u.dim() == 2:
        u = u.unsqueeze(0).expand(num_sequences, -1, -1).clone()
    if u.dim() != 3 or u.shape[0] != num_sequences or u.shape[1] < num_steps or u.shape[2] != input_dim:
        raise DataError(f"{name} has shape {tuple(u.shape)}; expected {expected} (num_sequences, num_steps, input_dim).")
    if not torch.isfinite(u).all():
        raise DataError(f"{name} contains NaN or ±inf; inputs may not be missing. Impute or drop those steps.")
    return u


class PrecisionWarning(UserWarning):
    """Data were cast to a narrower floating dtype (float64 data, float32 model)."""


_warned_downcast: list[bool] = [False]


def _warn_downcast(x, dtype: torch.dtype, name: str) -> None:
    """Say once per process that float64 data are computed in a narrower dtype (see module docstring)."""
    src = getattr(x, "dtype", None)
    wide = src == torch.float64 or (isinstance(src, np.dtype) and src == np.float64)
    if not wide or dtype == torch.float64 or _warned_downcast[0]:
        return
    _warned_downcast[0] = True
    warnings.warn(
        f"{name} are float64 but the model computes in {dtype}: they are cast to {dtype} (about "
        f"{round(-np.log10(torch.finfo(dtype).eps))} significant digits, magnitudes up to {torch.finfo(dtype).max:.3g}). "
        "Use model.double() to compute in float64, or pass data of the model's dtype to silence this. "
        "(Shown once per process.)", PrecisionWarning, stacklevel=5,  # the caller of pr.infer / pr.fit
    )


def prepare(model, observations, inputs=None, *, dtype: torch.dtype | None = None) -> Data:
    """Validate ``observations`` and ``inputs`` against ``model`` (its obs_dim, input_dim and dtype; float64 data
    for a float32 model are cast, with a :class:`PrecisionWarning` once per process)."""
    if dtype is None:
        dtype = model_dtype(model)
    _warn_downcast(observations, dtype, "observations")
    y, mask = validate_observations(observations, obs_dim=model.obs_dim, dtype=dtype)
    u = validate_inputs(inputs, num_sequences=y.shape[0], num_steps=y.shape[1], input_dim=model.input_dim, dtype=dtype)
    if u is not None and u.shape[1] != y.shape[1]:
        # validate_inputs accepts longer inputs (forecasting needs T + horizon); paired data must match
        raise DataError(
            f"inputs has shape {tuple(inputs.shape) if hasattr(inputs, 'shape') else tuple(u.shape)}; expected "
            f"{(y.shape[0], y.shape[1], model.input_dim)} (num_sequences, num_steps, input_dim): inputs must have "
            f"as many steps as observations ({y.shape[1]}). Slice inputs[..., :{y.shape[1]}, :] if they run longer."
        )
    return Data(y, mask, u)


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    for b in model.buffers():  # models with fixed parameters only (the AR reference models)
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()
