r"""The generic Levenberg-Marquardt / closed-form M-step (``models/_lm_mstep.py``) of every architecture that declares
``closed_form_mstep`` through it (GRU, LSTM, CTRNN, MTRNN, second-order, stacked, Jordan), float64.

* **Generalised EM**: on weighted paths (a teacher network of the same family simulated, plus noise) one M-step never
  lowers :math:`\hat Q = \sum_s w_s\log p_\theta(h^{(s)}, y)` (several seeds, from another random network), and the
  value it returns is :math:`\hat Q` at the new parameters as ``complete_data_log_likelihood`` scores it.
* **At least Adam's**: one M-step (10 LM steps) reaches at least what 200 Adam steps (lr 0.01, every parameter,
  autograd through the complete-data log-likelihood: the gradient M-step) reach on the same paths.
* **The LM step against an independent oracle**: the transition's free parameters are found by autograd (the
  unconstrained ``PyroParam`` s with a non-zero Jacobian column of the transition mean, substituted with
  ``torch.func.functional_call``), the residual Jacobian of the whole row-stacked residual vector by one ``jacrev``
  (no chunks, no pre-activation factorisation), and the damping rule read from the module docstring: process noise
  first in closed form :math:`q_j^2=F_j/N`, unit weights :math:`1/q_j^2`, :math:`A = G + \lambda\operatorname{diag}(\operatorname{diag}G
  + 10^{-12})`, :math:`\lambda_0 = 10^{-3}`, accept iff finite and :math:`\Phi` does not rise, :math:`\lambda\leftarrow
  0.3\lambda` / :math:`10\lambda` clamped to :math:`[10^{-9}, 10^9]`, :math:`q` again at the end. The code's parameter
  updates must equal the oracle's to 1e-8 relative to the update's size (one step where the first step is
  accepted; three steps for every architecture, with and without inputs; a far start where a step is refused).
"""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference.complete_data import complete_data_log_likelihood
from ppl_rnn.models import (
    CTRNNSSM,
    GRUSSM,
    LSTMSSM,
    JordanSSM,
    MultipleTimescalesSSM,
    SecondOrderSSM,
    StackedSSM,
)

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data

S, B, T = 4, 2, 25
T_ORACLE = 60  # more rows than the networks' parameters by far: the first lightly damped step is accepted

# name -> builder(seed, input_dim); the builders' start and teacher differ only in the seed
BUILD = {
    "gru": lambda s, I: GRUSSM(3, 2, I, seed=s, weight_scale=2.0),
    "lstm": lambda s, I: LSTMSSM(2, 2, I, seed=s, weight_scale=2.0),
    "lstm_hidden": lambda s, I: LSTMSSM(2, 2, I, seed=s, weight_scale=2.0, noise_on="hidden", cell_noise=0.05),
    "ctrnn": lambda s, I: CTRNNSSM(3, 2, I, dt=0.5, tau=[1.0, 2.0, 4.0], seed=s),
    "mtrnn": lambda s, I: MultipleTimescalesSSM(2, 2, 2, I, seed=s),
    "second_order": lambda s, I: SecondOrderSSM(3, 2, I, seed=s, weight_scale=1.5),
    "second_order_identity": lambda s, I: SecondOrderSSM(3, 2, I, activation="identity", seed=s, weight_scale=0.5),
    "stacked": lambda s, I: StackedSSM((3, 2), 2, I, seed=s, weight_scale=1.5),
    "jordan": lambda s, I: JordanSSM(3, 2, I, seed=s, weight_scale=2.0, context_decay=0.8),
}
NAMES = list(BUILD)


def _problem(name: str, I: int, seed: int, near: bool = False, T: int = T):
    """(start model, paths (S,B,T,H), y, mask, u, w): paths from a teacher of the same family plus noise of sd 0.1,
    non-uniform path weights, one missing observation. The start: another random network, or (``near``) the teacher
    with its recurrent weights perturbed (``perturb(0.1)``), where the first lightly damped step is accepted."""
    g = torch.Generator().manual_seed(seed)
    teacher = BUILD[name](100 + seed, I)
    u = torch.randn(B, T, I, generator=g) if I else None
    sim = teacher.simulate(T, B, inputs=u, seed=seed)
    h = sim.states.unsqueeze(0) + 0.1 * torch.randn(S, B, T, teacher.hidden_dim, generator=g)
    y = sim.observations.clone()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 3, 0] = False
    y[0, 3, 0] = 1e6  # any finite value at a missing entry
    w = torch.rand(S, generator=g) + 0.2
    if near:
        teacher.perturb(0.1, g)
        return teacher, h, y, mask, u, w
    return BUILD[name](seed, I), h, y, mask, u, w


def _q_hat(m, h, y, mask, u, w) -> float:
    with torch.no_grad():
        return float(((w / w.sum()) * complete_data_log_likelihood(m, h, Data(y, mask, u)).sum(-1)).sum())


@pytest.mark.parametrize("name", NAMES)
def test_every_lm_architecture_declares_the_mstep(name):
    assert capability(BUILD[name](0, 1), "closed_form_mstep") is not None


@pytest.mark.parametrize("I", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_one_mstep_never_lowers_q_hat_and_returns_it(name, I, float64):
    for seed in range(3):
        m, h, y, mask, u, w = _problem(name, I, seed)
        before = _q_hat(m, h, y, mask, u, w)
        val = m.closed_form_mstep(h, y, mask, u, weights=w, transition_steps=5)
        after = _q_hat(m, h, y, mask, u, w)
        assert after >= before, (seed, before, after)
        assert abs(val - after) <= 1e-8 * max(1.0, abs(after)), (seed, val, after)
        # a second M-step from there (its own start) does not lower it either
        assert m.closed_form_mstep(h, y, mask, u, weights=w, transition_steps=5) >= after - 1e-9 * abs(after)


def _adam(m, h, y, mask, u, w, steps=200, lr=0.01) -> float:
    data = Data(y, mask, u)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    n = float(mask.sum())
    for _ in range(steps):
        opt.zero_grad()
        q = ((w / w.sum()) * complete_data_log_likelihood(m, h, data).sum(-1)).sum()
        (-q / n).backward()
        opt.step()
    return _q_hat(m, h, y, mask, u, w)


@pytest.mark.slow  # 5-20 s each on one thread
@pytest.mark.parametrize("name", NAMES)
def test_one_mstep_reaches_what_200_adam_steps_reach(name, float64):
    m, h, y, mask, u, w = _problem(name, 1, seed=0)
    start = _q_hat(m, h, y, mask, u, w)
    adam = _adam(m.copy(), h, y, mask, u, w)
    lm = m.closed_form_mstep(h, y, mask, u, weights=w, transition_steps=10)
    assert adam > start  # Adam did climb
    # at least Adam's value, up to 1 % of the climb
    assert lm >= adam - 0.01 * (adam - start), (start, adam, lm)


# ---- the LM step against an independent autograd oracle ------------------------------------------------------
class _Mean(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, h, u):
        return self.model.transition_mean(1, h, u)


def _oracle(m, h, u, w, steps: int, units: slice, fixed_q2: torch.Tensor | None = None):
    S, B, T = h.shape[:3]
    """Independent LM (module docstring) in the model's unconstrained parameters. Returns (new values by parameter
    name, final F per unit, refused steps)."""
    wrap = _Mean(m)
    p0 = {n: p.detach().clone() for n, p in wrap.named_parameters()}
    H = h.shape[-1]
    prev = h[:, :, :-1].reshape(-1, H)
    tgt = h[:, :, 1:].reshape(-1, H)[:, units]
    uu = None if u is None else u[:, 1:].expand(S, B, T - 1, u.shape[-1]).reshape(-1, u.shape[-1])
    N = B * (T - 1)
    rw = (w / w.sum()).repeat_interleave(N)

    def resid(p):
        return tgt - torch.func.functional_call(wrap, p, (prev, uu))[:, units]

    J0 = torch.func.jacrev(resid)(p0)
    cols = {n: (J.reshape(J.shape[0], J.shape[1], -1) != 0).any(0).any(0) for n, J in J0.items()}
    names = [n for n in p0 if bool(cols[n].any())]
    idx = {n: cols[n].nonzero().flatten() for n in names}

    def full(theta):
        p, i = dict(p0), 0
        for n in names:
            k = idx[n].numel()
            p[n] = p0[n].reshape(-1).index_put((idx[n],), theta[i:i + k]).reshape(p0[n].shape)
            i += k
        return p

    def r_flat(theta):
        return resid(full(theta)).reshape(-1)

    theta = torch.cat([p0[n].reshape(-1)[idx[n]] for n in names])
    F = rw @ resid(p0).square()
    q2 = (F / N).clamp_min(1e-12) if fixed_q2 is None else torch.where(torch.isnan(fixed_q2), F / N, fixed_q2)
    Wd = (rw[:, None] / q2).reshape(-1)
    lam, refused = 1e-3, 0
    for _ in range(steps):
        r = r_flat(theta)
        J = torch.func.jacrev(r_flat)(theta)  # (M*H, P): d resid / d theta = -d f / d theta
        G = J.T @ (Wd[:, None] * J)
        grad = J.T @ (Wd * r)
        A = G + lam * torch.diag(torch.diagonal(G) + 1e-12)
        cand = theta - torch.linalg.solve(A, grad)
        phi, phi_c = float(Wd @ r.square()), float(Wd @ r_flat(cand).square())
        if phi_c == phi_c and abs(phi_c) != float("inf") and phi_c <= phi:
            theta, lam = cand, max(lam * 0.3, 1e-9)
        else:
            lam, refused = min(lam * 10.0, 1e9), refused + 1
    p = full(theta)
    return {n: p[n] for n in names}, rw @ r_flat(theta).reshape(-1, tgt.shape[1]).square(), refused


ORACLE_CASES = [("gru", 0), ("gru", 2), ("lstm", 1), ("ctrnn", 1), ("mtrnn", 1), ("second_order", 1),
                ("second_order_identity", 0), ("stacked", 1), ("jordan", 1)]


def _check_against_oracle(name, I, steps, seed=0, scale=None):
    m, h, y, mask, u, w = _problem(name, I, seed, near=scale is None, T=T_ORACLE)
    if scale is not None:  # a far start: the lightly damped first step overshoots
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.split("_unconstrained")[0] in m.recurrent_params:
                    p.mul_(scale)
    units = slice(0, m.hidden_units) if name == "jordan" else slice(None)
    old = {n: p.detach().clone() for n, p in _Mean(m).named_parameters()}
    new_ref, F_ref, refused = _oracle(m, h, u, w, steps, units)
    m.closed_form_mstep(h, y, mask, u, weights=w, transition_steps=steps)
    new = {n: p.detach() for n, p in _Mean(m).named_parameters()}
    moved = 0.0
    for n, v in new_ref.items():
        d_ref, d_code = v - old[n], new[n] - old[n]
        size = float(d_ref.abs().max())
        moved = max(moved, size)
        assert float((d_code - d_ref).abs().max()) <= 1e-8 * max(size, 1e-12), (n, d_code, d_ref)
    q = m.noise_scales()["process"].detach()[units]
    torch.testing.assert_close(q, (F_ref / (B * (T_ORACLE - 1))).sqrt(), rtol=1e-8, atol=0.0)
    return moved, refused


@pytest.mark.parametrize("name,I", [("second_order", 1), ("second_order_identity", 0), ("stacked", 1), ("jordan", 1)])
def test_one_lm_step_equals_the_autograd_oracle(name, I, float64):
    moved, refused = _check_against_oracle(name, I, steps=1)
    assert refused == 0 and moved > 1e-3  # a real, accepted step


@pytest.mark.parametrize("name,I", ORACLE_CASES)
def test_three_lm_steps_equal_the_autograd_oracle(name, I, float64):
    """Three steps: the first is refused for some architectures (too lightly damped at this size), so the damping
    schedule (x10 after a refusal, x0.3 after an acceptance) is compared too."""
    moved, refused = _check_against_oracle(name, I, steps=3)
    assert refused < 3 and moved > 1e-3


def test_a_refused_step_is_refused_by_both(float64):
    """From a start with 4x the recurrent weights the first, lightly damped GRU step overshoots: both keep the
    weights there and take the same damped steps after (the refusal branch is exercised)."""
    _, refused = _check_against_oracle("gru", 1, steps=3, scale=4.0)
    assert 0 < refused < 3


# ---- the defining-class rule ------------------------------------------------------------------------------------
def test_a_subclass_that_rewrites_the_transition_mean_loses_the_mstep():
    class NewMean(GRUSSM):
        def transition_parts(self, p, h_prev, u_t, shift=None):
            return super().transition_parts(p, 0.5 * h_prev, u_t, shift)

    class NewTransition(GRUSSM):
        def transition(self, t, h_prev, u_t):
            return super().transition(t, h_prev, u_t)

    assert capability(NewMean(2), "closed_form_mstep") is None
    assert capability(NewMean(2), "rotation_restart") is not None  # it redraws weights, it does not read the mean
    assert capability(NewTransition(2), "closed_form_mstep") is None
    assert capability(NewTransition(2), "rotation_restart") is None


@pytest.mark.parametrize("name", ["gru", "lstm", "ctrnn", "second_order", "stacked"])
def test_rotation_restart_redraws_a_recurrent_block_as_a_rotation_times_the_gain(name, float64):
    m = BUILD[name](0, 1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.rotation_restart(torch.Generator().manual_seed(0))
    changed = [n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == 1  # one recurrent parameter
    new = dict(m.named_parameters())[changed[0]].detach()
    moved = new != before[changed[0]]
    k = int(moved.sum().item() ** 0.5)
    if name == "stacked":  # the diagonal blocks (3x3 and 2x2): 13 entries
        assert int(moved.sum()) == 13
        blk = new[:3, :3]
    else:
        blk = new[moved].reshape(k, k)
    scale = 4.0 if name == "ctrnn" else 1.0
    ev = torch.linalg.eigvals(blk / scale).abs()
    torch.testing.assert_close(ev, torch.full_like(ev, 1.1))


# ---- the second-order network's linear special case (no inputs) ---------------------------------------------
def test_second_order_linear_special_case_and_embedding(float64):
    """Without inputs: the identity model's linear-Gaussian form is its own conditionals; embedding it in a tanh
    network at a small gain gives the linear model's means (states scaled by the gain) to O(gain^2); with an input
    none of the four capabilities applies."""
    from ppl_rnn.capabilities import has_capabilities

    m = SecondOrderSSM(3, 2, 0, seed=3)
    assert has_capabilities(m, "linear_special_case", "embed_linear")
    assert capability(m, "linear_gaussian") is None  # tanh
    lin = m.linear_special_case()
    assert has_capabilities(lin, "linear_gaussian", "set_linear_gaussian")
    p = lin.linear_gaussian()
    h = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lin.transition(1, h, None).mean, h @ p.A.T + p.b)
    torch.testing.assert_close(torch.diag(lin.transition(1, h, None).variance[0]), p.Q)
    torch.testing.assert_close(lin.emission(1, h, None).mean, h @ p.C.T + p.d)
    gain = 1e-3
    m.embed_linear(p, gain=gain)
    torch.testing.assert_close(m.transition(1, gain * h, None).mean / gain, h @ p.A.T + p.b, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.emission(1, gain * h, None).mean, h @ p.C.T + p.d)
    lin.set_linear_gaussian(p)
    torch.testing.assert_close(lin.linear_gaussian().A, p.A)
    with_input = SecondOrderSSM(3, 2, 1, seed=3)
    for name in ("linear_gaussian", "set_linear_gaussian", "linear_special_case", "embed_linear"):
        assert capability(with_input, name) is None


@pytest.mark.parametrize("name", ["gru", "jordan"])
def test_repeated_paths_count_by_their_weight(name, float64):
    """Rows that repeat exactly are merged (models/_lm_mstep.py): an M-step on paths (h0, h0, h1) with weights
    (a, b, c) is the M-step on (h0, h1) with weights (a + b, c)."""
    m, h, y, mask, u, w = _problem(name, 1, seed=0)
    twin = m.copy()
    h3, w3 = torch.cat([h[:1], h[:1], h[1:2]]), torch.tensor([0.2, 0.5, 0.3])
    v3 = m.closed_form_mstep(h3, y, mask, u, weights=w3, transition_steps=3)
    v2 = twin.closed_form_mstep(h[:2], y, mask, u, weights=torch.tensor([0.7, 0.3]), transition_steps=3)
    assert abs(v3 - v2) <= 1e-9 * abs(v2)
    for (n, p), (_, q) in zip(m.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
