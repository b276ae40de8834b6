"""Seeding: every stochastic call takes ``seed`` and leaves the caller's global RNG state untouched."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from .errors import ConfigurationError


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigurationError(
            f"{name} must be a non-negative int or None; found {seed!r}. Pass e.g. {name}=0."
        )
    return int(seed)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block with torch/numpy/random seeded by ``seed``; restore the previous RNG state after.

    ``seed=None`` runs the block on the current global RNG state (non-reproducible).
    """
    seed = check_seed(seed)
    if seed is None:
        yield
        return
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
