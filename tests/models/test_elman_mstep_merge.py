r"""``ElmanSSM.closed_form_mstep`` on paths that share states, as a particle smoother's paths do.

The ``tanh`` block merges equal regression rows :math:`(x_m, h_m)` and sums their weights before its
Levenberg-Marquardt steps (``models/elman.py``, ``_merge_equal_columns``). Here the paths are built from two
base paths per sequence, switching between them every few steps, so most rows repeat (the merge is asserted to
happen), and the step is compared with the independent autograd oracle of ``test_elman_mstep.py`` on the
un-merged rows (1e-10 relative). A merge that kept one copy's weight instead of the sum, or merged unequal rows,
fails here.
"""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.models import elman

from tests.models.test_elman_mstep import S, T, _check, _problem


def _shared_paths(h: torch.Tensor) -> torch.Tensor:
    """``(S,B,T,H)``: path ``s`` at step ``t`` is base path ``(s + t // 7) % 2`` (path 4 repeats path 0)."""
    out = torch.empty_like(h)
    for s in range(S):
        for t in range(T):
            out[s, :, t] = h[((s % 4) + t // 7) % 2, :, t]
    return out


@pytest.mark.parametrize("input_dim", [0, 2])
@pytest.mark.parametrize("steps", [1, 4])
def test_lm_steps_on_shared_paths_equal_oracle(float64, input_dim, steps, monkeypatch):
    m, h, y, mask, u, w = _problem(input_dim, seed=11 + input_dim)
    h = _shared_paths(h)
    merged = []
    real = elman._merge_equal_columns

    def spy(X, Y, wm):
        out = real(X, Y, wm)
        merged.append((X.shape[1], out[0].shape[1]))
        return out

    monkeypatch.setattr(elman, "_merge_equal_columns", spy)
    _check(m, h, y, mask, u, w, steps)
    (before, after), = merged
    assert after < before / 2, merged  # the rows did repeat and were merged


def test_merge_keeps_weighted_sums(float64):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 50, generator=g)
    Y = torch.randn(2, 50, generator=g)
    X[:, 0], Y[:, 0] = -X[:, 1], -Y[:, 1]  # a sign-flipped column: the same key (the hash is linear in the bits)
    cols = torch.randint(0, 50, (400,), generator=g)
    assert bool((cols == 0).any()) and bool((cols == 1).any())
    Xd, Yd, wd = X[:, cols], Y[:, cols], torch.rand(400, generator=g, dtype=X.dtype)
    Xm, Ym, wm = elman._merge_equal_columns(Xd, Yd, wd)
    assert Xm.shape[1] == torch.unique(cols).numel()

    def f(X, Y, w):  # weighted sums
        return ((torch.tanh(X.sum(0)) - Y[0]) ** 2 * w).sum() + (X * w).sum(1)

    torch.testing.assert_close(f(Xm, Ym, wm), f(Xd, Yd, wd), rtol=1e-12, atol=1e-12)
    # the un-merged and merged rows are the same set
    assert {tuple(c) for c in torch.cat((Xm, Ym)).T.tolist()} == {tuple(c) for c in torch.cat((Xd, Yd)).T.tolist()}
