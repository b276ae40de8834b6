r"""Shared pieces of the EM-style trainers (MonteCarloEM, KalmanEM, MeanFieldEM, BPTT).

* :class:`TraceRecorder` collects one row per iteration — scalars (``log_evidence``, ``objective``,
  ``num_particles``, ``wall_time_s``, ...) and a snapshot of every constrained parameter — and builds the
  ``xarray.Dataset`` stored in :attr:`ppl_rnn.FitResult.trace` (dim ``iteration``; a parameter ``W`` of shape
  ``(H, H)`` becomes the data variable ``W`` with dims ``("iteration", "W_dim_0", "W_dim_1")``).
* :func:`check_finite` turns non-finite parameters or objectives into a :class:`ppl_rnn.DivergenceError` that
  names the iteration and carries the last good :class:`ppl_rnn.FitResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import xarray as xr

from ppl_rnn.errors import DivergenceError
from ppl_rnn.results import FitResult, params_snapshot


def params_finite(model) -> list[str]:
    """Names of the parameters with non-finite entries (empty when all are finite)."""
    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


class TraceRecorder:
    """Per-iteration trace (see module docstring). ``record(model, **scalars)`` appends one row."""

    def __init__(self):
        self.scalars: dict[str, list[float]] = {}
        self.params: dict[str, list[np.ndarray]] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def record(self, model, **scalars) -> None:
        snap = params_snapshot(model)
        scalars.setdefault("wall_time_s", time.perf_counter() - self.t0)
        for k in set(self.scalars) | set(scalars):
            self.scalars.setdefault(k, [math.nan] * self.n).append(float(scalars.get(k, math.nan)))
        for k, v in snap.items():
            self.params.setdefault(k, []).append(v.detach().cpu().numpy().astype(np.float64))
        self.n += 1

    def last(self, name: str) -> float:
        return self.scalars[name][-1]

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.scalars.get(name, []), dtype=float)

    def dataset(self, upto: int | None = None, attrs: dict | None = None) -> xr.Dataset:
        """The trace as an ``xarray.Dataset`` (rows ``[0, upto)``; all rows by default)."""
        n = self.n if upto is None else upto
        data = {}
        for k, v in self.scalars.items():
            data[k] = (("iteration",), np.asarray(v[:n], dtype=float))
        for k, v in self.params.items():
            arr = np.stack(v[:n]) if n > 0 else np.zeros((0,))
            dims = ("iteration",) + tuple(f"{k}_dim_{i}" for i in range(arr.ndim - 1))
            data[k] = (dims, arr)
        return xr.Dataset(data, coords={"iteration": np.arange(n)}, attrs=dict(attrs or {}))


def check_finite(model, *, iteration: int, method: str, what: dict[str, float] | None = None,
                 last_good: Callable[[], FitResult] | None = None) -> None:
    """Raise :class:`DivergenceError` if a parameter of ``model`` or a value in ``what`` is not finite."""
    bad = params_finite(model)
    bad_vals = [k for k, v in (what or {}).items() if not math.isfinite(float(v))]
    if not bad and not bad_vals:
        return
    found = ", ".join([f"parameter {b}" for b in bad] + [f"{k}={what[k]}" for k in bad_vals])
    raise DivergenceError(
        f"{method} diverged at iteration {iteration}: non-finite {found}. The last finite parameters are in "
        "the exception's .last_good FitResult. Fixes: lower the learning rate / gradient steps, use more "
        "particles, or start from a better initialisation.",
        iteration=iteration, last_good=None if last_good is None else last_good(),
    )


def snapshot_model(model):
    """A frozen copy of ``model`` (used for ``last_good``)."""
    return model.copy()
