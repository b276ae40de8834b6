r"""A generic Levenberg-Marquardt / closed-form M-step for Gaussian recurrent networks (private).

Monte Carlo EM's M-step increases :math:`\hat Q(\theta)=\sum_s w_s\log p_\theta(h^{(s)}, y_{obs})` given smoothed
paths :math:`h^{(s)}` ``(S,B,T,H)`` (weights :math:`w_s`, normalised to sum to one). For a model of the frame of
:mod:`._rnn_common`,

.. math::
    h_0\sim N(m_0,\operatorname{diag}s_0^2),\quad h_t = f_\theta(h_{t-1},u_t) + N(0,\operatorname{diag}q^2),\quad
    y_t = C h_t[a{:}b] + d + N(0,\operatorname{diag}r^2),

:math:`\hat Q` splits into three blocks that share no parameter:

* **emission** :math:`(C, d, r)`: per output, weighted least squares of :math:`y_{t,k}` on :math:`(h_t[a{:}b], 1)`
  over the observed steps, :math:`r_k^2` the weighted mean squared residual (exact maximiser;
  :func:`~._rnn_common.readout_mstep`);
* **initial state** :math:`(m_0, s_0)`: weighted mean and variance of :math:`h_0` (exact;
  :func:`~._rnn_common.initial_scale_mstep`);
* **transition** :math:`(\theta, q)`: with rows :math:`m=(s,b,t)`, :math:`t\ge1`, residuals
  :math:`\rho_{mj}(\theta) = h_{m,j} - f_\theta(h_{m-1}, u_m)_j` and :math:`F_j(\theta) = \sum_m w_m\rho_{mj}^2`,

  .. math:: \hat Q_{trans}(\theta, q) = -\tfrac12\sum_j\Big[\frac{F_j(\theta)}{q_j^2} + N\log(2\pi q_j^2)\Big],
            \qquad N = B(T-1).

  Cyclic (ECM) updates, each of which raises :math:`\hat Q_{trans}`: (1) :math:`q_j^2 = F_j(\theta)/N` (exact
  given :math:`\theta`); (2) ``steps`` Levenberg-Marquardt steps on the weighted least-squares problem
  :math:`\Phi(\theta)=\sum_{m,j} W_{mj}\rho_{mj}(\theta)^2`, :math:`W_{mj} = w_m/q_j^2`, in the free (unconstrained)
  coordinates of the transition's parameters:

  .. math:: G = J^\top W J,\quad g = J^\top W\rho,\quad
            \delta = (G + \lambda\operatorname{diag}(\operatorname{diag}G + 10^{-12}))^{-1} g,
            \quad J = \partial f/\partial\theta,

  with Marquardt's scaling; the step is accepted iff the new parameters and :math:`\Phi(\theta+\delta)` are finite
  and :math:`\Phi(\theta+\delta)\le\Phi(\theta)`, then :math:`\lambda\leftarrow0.3\lambda` (accepted) or :math:`10\lambda` (refused),
  clamped to :math:`[10^{-9},10^9]`, :math:`\lambda_0=10^{-3}`. An accepted step lowers :math:`\Phi` at fixed
  :math:`q`, i.e. raises :math:`\hat Q_{trans}` (generalised EM: :math:`\hat Q` never decreases); (3) :math:`q` again.
  Process-noise scales the model keeps fixed (an LSTM's cell noise with ``noise_on="hidden"``) keep their value in
  (1) and (3).

**Affine blocks** (how :math:`G` is accumulated without a loop over time or paths and without the full Jacobian).
Every suite transition reads its trained parameters through affine pre-activations
:math:`a_g = X_g(h_{t-1}, u_t)\,\Theta_g^\top` (``K_g`` pre-activations, ``L_g`` features per block :math:`g`: a GRU's
gates and candidate, an LSTM's four gates, a CTRNN's drive; a parameter entering otherwise, such as a CTRNN's
:math:`\Theta` or :math:`\log(\tau-\mathrm{dt})`, is a block with the single feature 1). Then
:math:`\partial f_j/\partial\Theta_{g,kl} = D_{j,gk} X_{g,l}` with :math:`D = \partial f/\partial a` (the total
derivative: a GRU's reset gate also acts through the candidate's features), so per row

.. math:: G_{(gkl),(g'k'l')} = \sum_m E_{m,gk,g'k'}\, X_{m,gl} X_{m,g'l'},\qquad E_m = D_m^\top W_m D_m,\qquad
          g_{gkl} = \sum_m (D_m^\top W_m\rho_m)_{gk} X_{m,gl},

one GEMM per pair of blocks over chunks of rows (rows that repeat exactly, common in smoothed particle paths, are
merged first with their summed weight: about half of them on the laser) (``(rows, K_g K_{g'}) x (rows, L_g L_{g'})``; a diagonal block uses the
pairs :math:`l\le l'` only). :math:`D` comes from ``torch.func.vmap(jacrev(.))`` of the model's own mean with respect to
a probe ``shift`` added to the pre-activations (``rows x H x K`` numbers instead of the Jacobian's
``rows x H x K L``). The model supplies the mean as one pure function of its parameters
(``transition_parts(p, h_prev, u_t, shift)``, also behind its ``transition``), the blocks (``blocks_from`` /
``params_from``) and masks of entries that are not free (a stacked network's off-structure blocks, an MTRNN's slow
input weights). Nothing here reads a parameter by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: rows x (units x pre-activations) per chunk of the shift Jacobian (float64: 8 bytes each), about 16 MB
CHUNK_ENTRIES = 1 << 21


def weighted_sse(mean: Callable, blocks: dict, prev: torch.Tensor, u: torch.Tensor | None, target: torch.Tensor,
                 row_w: torch.Tensor, chunk_rows: int = 1 << 14) -> torch.Tensor:
    r""":math:`F_j=\sum_m w_m (y_{mj} - f(x_m, u_m)_j)^2` ``(H,)`` at ``blocks``, over chunks of rows (no grad)."""
    M, H = target.shape
    F = torch.zeros(H, dtype=target.dtype)
    with torch.no_grad():
        for a in range(0, M, chunk_rows):
            b = min(a + chunk_rows, M)
            out, _ = mean(blocks, prev[a:b], None if u is None else u[a:b], None)
            F += row_w[a:b] @ (target[a:b] - out).square()
    return F


def lm_least_squares(mean: Callable, blocks: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     prev: torch.Tensor, u: torch.Tensor | None, target: torch.Tensor, row_w: torch.Tensor,
                     inv_var: torch.Tensor, steps: int, *, chunk_rows: int | None = None,
                     valid: Callable[[dict], bool] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    r"""``steps`` Levenberg-Marquardt steps on :math:`\Phi=\sum_{m,j} w_m v_j (y_{mj} - f(x_m, u_m)_j)^2` over the
    entries of the affine blocks :math:`\Theta_g` (module docstring, "Affine blocks"; damping and acceptance as
    there). ``mean(blocks, prev (m,H'), u (m,I) | None, shift | None) -> (f (m,H), features)`` with
    ``features[g]`` ``(m, L_g)`` and ``shift[g]`` ``(m, K_g)`` added to the pre-activations
    :math:`a_g = X_g\Theta_g^\top`; ``masks[g]`` (bool, like :math:`\Theta_g`): the free entries (default all).
    ``target`` ``(M,H)``, ``row_w`` ``(M,)``, ``inv_var`` ``(H,)``. ``valid(blocks)``: whether a candidate's parameters
    are admissible (finite); a step to an inadmissible candidate is refused like one that raises :math:`\Phi`.

    Returns ``(blocks, F, accepted)``: the final blocks, :math:`F_j=\sum_m w_m\rho_{mj}^2` ``(H,)`` there and the
    number of accepted steps."""
    M, H = target.shape
    names = tuple(blocks)
    dt = target.dtype
    K = {n: blocks[n].shape[0] for n in names}
    L = {n: blocks[n].shape[1] for n in names}
    Ktot = sum(K.values())
    koff, o = {}, 0
    for n in names:
        koff[n] = o
        o += K[n]
    # the free entries of the flat vector (theta_g row-major, groups in order)
    sel, poff = [], 0
    for n in names:
        m = masks.get(n)
        idx = torch.arange(K[n] * L[n]) if m is None else m.reshape(-1).nonzero().flatten()
        sel.append(idx + poff)
        poff += K[n] * L[n]
    sel = torch.cat(sel)
    P = int(sel.numel())
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ENTRIES // max(H * Ktot, Ktot * Ktot, max(L.values()) ** 2, 1))
    bounds = [(a, min(a + chunk_rows, M)) for a in range(0, M, chunk_rows)]

    def one_row(shift, x, uu):
        out, feats = mean(blocks_now[0], x.unsqueeze(0), None if uu is None else uu.unsqueeze(0),
                          {n: v.unsqueeze(0) for n, v in shift.items()})
        out = out.squeeze(0)
        return out, (out, {n: f.squeeze(0) for n, f in feats.items()})

    jac = torch.func.vmap(torch.func.jacrev(one_row, has_aux=True), in_dims=(0, 0, None if u is None else 0))

    def sym_index(k):  # the upper triangle of a k x k symmetric array and, per (a, b), its position there
        t = torch.triu_indices(k, k)
        pos = torch.empty(k, k, dtype=torch.long)
        pos[t[0], t[1]] = torch.arange(t.shape[1])
        pos[t[1], t[0]] = torch.arange(t.shape[1])
        return t, pos

    il = {n: sym_index(L[n])[1] for n in names}
    blocks_now = [blocks]
    F = weighted_sse(mean, blocks, prev, u, target, row_w)
    if P == 0 or steps <= 0:
        return blocks, F, 0
    lam, accepted = 1e-3, 0
    for _ in range(int(steps)):
        G = torch.zeros(poff, poff, dtype=dt)
        g = torch.zeros(poff, dtype=dt)
        with torch.no_grad():
            for a, b in bounds:
                x, uu = prev[a:b], (None if u is None else u[a:b])
                m = b - a
                zero = {n: torch.zeros(m, K[n], dtype=dt) for n in names}
                Dd, (out, X) = jac(zero, x, uu)  # Dd[g]: (m,H,K_g) = d f / d a_g
                D = torch.cat([Dd[n] for n in names], -1)  # (m,H,K)
                Wt = row_w[a:b, None] * inv_var  # (m,H)
                DW = D * Wt.unsqueeze(-1)
                E = DW.transpose(1, 2) @ D  # (m,K,K): D^T W D per row
                v = (DW * (target[a:b] - out).unsqueeze(-1)).sum(1)  # (m,K): D^T W rho
                for i, n in enumerate(names):
                    Xn = X[n]
                    rows = slice(poff_of(names, K, L, i), poff_of(names, K, L, i) + K[n] * L[n])
                    g[rows] += (v[:, koff[n]:koff[n] + K[n]].T @ Xn).reshape(-1)
                    for j, n2 in enumerate(names):
                        if j < i:
                            continue
                        X2 = X[n2]
                        cols = slice(poff_of(names, K, L, j), poff_of(names, K, L, j) + K[n2] * L[n2])
                        Eb = E[:, koff[n]:koff[n] + K[n], koff[n2]:koff[n2] + K[n2]]
                        if j == i:  # symmetric in (l, l'): the products X_l X_l' of the pairs l <= l' only
                            Ln = L[n]
                            Y = torch.empty(m, Ln * (Ln + 1) // 2, dtype=dt)
                            r0 = 0
                            for l0 in range(Ln):
                                torch.mul(Xn[:, l0:l0 + 1], Xn[:, l0:], out=Y[:, r0:r0 + Ln - l0])
                                r0 += Ln - l0
                            Tb = (Eb.reshape(m, -1).T @ Y)[:, il[n]]  # (K*K, L, L)
                            blk = Tb.reshape(K[n], K[n], Ln, Ln).permute(0, 2, 1, 3)
                            G[rows, cols] += blk.reshape(K[n] * Ln, K[n] * Ln)
                            continue
                        Y = (Xn.unsqueeze(-1) * X2.unsqueeze(-2)).reshape(m, -1)
                        blk = (Eb.reshape(m, -1).T @ Y).reshape(K[n], K[n2], L[n], L[n2]).permute(0, 2, 1, 3)
                        blk = blk.reshape(K[n] * L[n], K[n2] * L[n2])
                        G[rows, cols] += blk
                        G[cols, rows] += blk.T
            Gs, gs = G[sel][:, sel], g[sel]
            A = Gs + lam * torch.diag(torch.diagonal(Gs) + 1e-12)
            step = torch.zeros(poff, dtype=dt)
            step[sel] = torch.linalg.solve(A, gs)
            cand, i0 = {}, 0
            for n in names:
                cand[n] = blocks[n] + step[i0:i0 + K[n] * L[n]].reshape(K[n], L[n])
                i0 += K[n] * L[n]
            ok = all(bool(torch.isfinite(v).all()) for v in cand.values()) and (valid is None or valid(cand))
            F_new = weighted_sse(mean, cand, prev, u, target, row_w) if ok else torch.full_like(F, math.nan)
        phi, phi_new = float(F @ inv_var), float(F_new @ inv_var)
        if math.isfinite(phi_new) and phi_new <= phi:
            blocks, F, lam, accepted = cand, F_new, max(lam * 0.3, 1e-9), accepted + 1
            blocks_now[0] = blocks
        else:
            lam = min(lam * 10.0, 1e9)
    return blocks, F, accepted


def merge_rows(prev: torch.Tensor, u: torch.Tensor | None, target: torch.Tensor, row_w: torch.Tensor):
    """Rows that repeat exactly (paths that share a particle at two consecutive steps: resampling and the backward
    kernel copy states) merged into one row with the summed weight; every sum over rows is unchanged. Returns
    ``(prev, u, target, row_w)``."""
    H, Hp = target.shape[1], prev.shape[1]
    parts = [prev, target] + ([] if u is None else [u])
    rows, inv = torch.unique(torch.cat(parts, 1), dim=0, return_inverse=True)
    if rows.shape[0] == prev.shape[0]:
        return prev, u, target, row_w
    w = torch.zeros(rows.shape[0], dtype=row_w.dtype).index_add_(0, inv, row_w)
    return rows[:, :Hp], (None if u is None else rows[:, Hp + H:]), rows[:, Hp:Hp + H], w


def poff_of(names, K, L, i) -> int:
    """Offset of group ``i`` in the flat vector of every block's entries."""
    return sum(K[n] * L[n] for n in names[:i])


def transition_mstep(model, h: torch.Tensor, inputs: torch.Tensor | None, w: torch.Tensor, steps: int) -> float:
    r"""The transition block of the module docstring on paths ``h`` ``(S,B,T,H)`` with normalised weights ``w``:
    :math:`q` in closed form, ``steps`` LM steps on the model's affine blocks (``lm_blocks`` / ``lm_mean`` /
    ``lm_write``), :math:`q` again; in place. Returns :math:`\hat Q_{trans}` at the new parameters."""
    S, B, T, H = h.shape
    dt = h.dtype
    N = B * (T - 1)
    M = S * N
    prev = h[:, :, :-1].reshape(M, H)
    target = h[:, :, 1:].reshape(M, H)
    u = None
    if inputs is not None:
        I = inputs.shape[-1]
        u = inputs[:, 1:T].to(dt).expand(S, B, T - 1, I).reshape(M, I)
    row_w = w.repeat_interleave(N)
    prev, u, target, row_w = merge_rows(prev, u, target, row_w)
    blocks, masks = model.lm_blocks()
    learn = model.learnable_process_noise()  # (H,) bool
    q_old = model.noise_scales()["process"].detach().to(dt)

    def q2_of(F):
        return torch.where(learn, (F / N).clamp_min(1e-12), q_old ** 2)

    q2 = q2_of(weighted_sse(model.lm_mean, blocks, prev, u, target, row_w))
    blocks, F, _ = lm_least_squares(model.lm_mean, blocks, masks, prev, u, target, row_w, 1.0 / q2, steps,
                                    valid=model.lm_admissible)
    model.lm_write(blocks)
    q2 = q2_of(F)
    model.set_noise_scales(process=q2.sqrt())
    return -0.5 * float((F / q2 + N * (torch.log(q2) + math.log(2 * math.pi))).sum())


__all__ = ["weighted_sse", "lm_least_squares", "merge_rows", "transition_mstep", "CHUNK_ENTRIES"]
