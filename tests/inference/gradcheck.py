"""Finite-difference checks of autograd gradients (test helper): a gradient is right when its projection on a
random direction equals the central difference of the function along that direction."""

from __future__ import annotations

import torch


def random_direction(params, seed: int = 0) -> list[torch.Tensor]:
    """A unit-norm random direction in the space of ``params`` (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    n = torch.sqrt(sum((x**2).sum() for x in v))
    return [x / n for x in v]


def central_difference(fn, params, direction, eps: float = 1e-5) -> float:
    r""":math:`(f(\theta+\epsilon v) - f(\theta-\epsilon v)) / 2\epsilon`; ``params`` are moved in place and restored."""
    with torch.no_grad():
        for p, v in zip(params, direction, strict=True):
            p.add_(eps * v)
        fp = float(fn())
        for p, v in zip(params, direction, strict=True):
            p.sub_(2 * eps * v)
        fm = float(fn())
        for p, v in zip(params, direction, strict=True):
            p.add_(eps * v)
    return (fp - fm) / (2 * eps)


def directional(grads, direction) -> float:
    """:math:`\\nabla f \\cdot v` (``None`` gradients count as 0)."""
    return float(sum((g * v).sum() for g, v in zip(grads, direction, strict=True) if g is not None))


def assert_gradient_matches(value: torch.Tensor, reference, params, *, seeds=(0, 1, 2), rtol: float = 1e-6) -> None:
    """The autograd gradient of the scalar ``value`` (built from ``params``) equals, along each random direction,
    the central finite difference of ``reference()`` (the same function, or an independent computation of it)."""
    grads = torch.autograd.grad(value, params, allow_unused=True)
    for seed in seeds:
        v = random_direction(params, seed)
        fd = central_difference(reference, params, v)
        g = directional(grads, v)
        assert abs(g - fd) < rtol * (1 + abs(fd)), (seed, g, fd)
