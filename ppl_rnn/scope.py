r"""Settings the library needs, applied inside a scope it controls and restored on exit.

* Pyro's ``module_local_params``: a model's parameters live on the module, never in Pyro's global param
  store, while the library runs (inside :func:`library_scope`) and whenever a model's Pyro program runs
  (``StateSpaceModel.__call__``, so ``Predictive``, ``poutine`` and SVI see each model's own parameters);
  everything else — a user's guides, e.g. ``AutoNormal``'s parameters — behaves as the user set Pyro.
* torch's intra-op thread count: per-time-step loops on small tensors (particle filters and smoothers, Kalman,
  EKF, the EM E-steps) run far faster on one thread, and much more so when another process shares the cores
  (measured in ``benchmarks/bench_threads.py``). :func:`threads_for` picks the count for the work size and
  restores the caller's setting.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyro
import torch

F = TypeVar("F", bound=Callable)

#: elements per tensor operation below which one intra-op thread is faster than several
SMALL_WORK = 1 << 16


@contextlib.contextmanager
def threads_for(work_size: int) -> Iterator[int]:
    """Use one torch thread while the per-operation work (elements) is below :data:`SMALL_WORK`; restore
    the caller's thread count on exit. Yields the count in force."""
    old = torch.get_num_threads()
    want = 1 if work_size < SMALL_WORK else old
    if want == old:
        yield old
        return
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def library_scope() -> Iterator[None]:
    """Module-local Pyro parameters for the duration (the caller's setting is restored on exit). Modules
    called inside must have local parameter state: see :func:`local_param_ready`."""
    if pyro.settings.get("module_local_params"):
        yield
        return
    with pyro.settings.context(module_local_params=True):
        yield


def local_param_ready(module: torch.nn.Module) -> None:
    """Give every ``PyroModule`` in ``module`` the local parameter state Pyro creates only for modules built
    while ``module_local_params`` was on (so a model or guide built outside :func:`library_scope` can be
    called inside it)."""
    for sub in module.modules():
        ctx = getattr(sub, "_pyro_context", None)
        if ctx is not None and not hasattr(ctx, "param_state"):
            ctx.param_state = {"params": {}, "constraints": {}}


def in_library_scope(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`library_scope`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with library_scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
