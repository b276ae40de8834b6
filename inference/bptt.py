r"""Deterministic training by backpropagation through time: the classical RNN loss as maximum likelihood.

With zero process noise the state-space model becomes a deterministic recurrent network,
:math:`p(h_t\mid h_{t-1}) = \delta(h_t - f_\theta(h_{t-1}, u_t))`, :math:`h_0 = E[h_0]`, and the log-evidence
collapses to the familiar loss (Mohamed, "Recurrent nets and dynamical systems"; Werbos):

.. math:: \log p_\theta(y) = \sum_t \log p_\theta(y_{t,o}\mid \bar h_t),\qquad
          \bar h_t = E[h_t\mid h_{t-1}=\bar h_{t-1}],\ \bar h_0 = E[h_0],

a Gaussian negative log-likelihood of the observed entries (so the observation noise :math:`r` is fitted too,
not just the squared error). :class:`BPTT` maximises it with Adam over the unrolled network
(``truncation=k``: gradients are cut every ``k`` steps, truncated BPTT; ``k = 100`` by default, and the
gradient is clipped to a global norm, because through :math:`T` steps it grows like :math:`\rho(W)^T`).

The fitted model is a copy of the input model with the process noise and the initial-state spread set to a
tiny floor (``noise_floor``, default :math:`10^{-4}`) instead of exactly zero, so it stays a valid
state-space model (positive scales) that the common particle-filter evaluator can score like every other
fitted model; at that floor the filter's log-evidence equals the BPTT objective up to :math:`O(\text{floor})`.
It is supported for models that expose their process-noise parameters: :class:`~ppl_rnn.models.ElmanSSM`
(``q``, ``s0``) and :class:`~ppl_rnn.models.LinearGaussianSSM` (``Q_tril``, ``P0_tril``); the transition's
``.mean`` is the deterministic map, so any Gaussian-transition model with those parameters works.

``FitResult.trace`` (dim ``iteration`` = optimisation step, recorded every ``record_every`` steps):
``objective`` = ``log_evidence`` = the deterministic log-likelihood :math:`\log p_\theta(y)` of the
zero-noise network (``evidence_kind="approximation"``: it is not the evidence of the noisy model), the
parameters, ``wall_time_s``.
"""

from __future__ import annotations

import copy

import pyro
import torch

from ppl_rnn.capabilities import require
from ppl_rnn.errors import ConfigurationError, DivergenceError
from ppl_rnn.method import InferenceMethod, check_positive_float, check_positive_int
from ppl_rnn.model import input_at

from .em_common import ConvergenceRule, EMLoop, EMStep


def deterministic_log_likelihood(model, data, truncation: int | None = None) -> torch.Tensor:
    r"""``(B,)`` :math:`\sum_t\log p(y_{t,o}\mid\bar h_t)` along the noise-free rollout (differentiable)."""
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, _ = y.shape
    h = model.initial_batched(input_at(u, 0), (B,)).mean
    ll = model.observation_log_prob(0, h, y[:, 0], mask[:, 0], input_at(u, 0))
    for t in range(1, T):
        if truncation and t % truncation == 0:
            h = h.detach()
        u_t = input_at(u, t)
        h = model.transition(t, h, u_t).mean
        ll = ll + model.observation_log_prob(t, h, y[:, t], mask[:, t], u_t)
    return ll


def set_noise_floor(model, floor: float) -> dict[str, torch.Tensor]:
    """Set the process noise and initial spread of ``model`` to ``floor`` in place (through its
    ``noise_scales`` / ``set_noise_scales`` capabilities); returns the new scales by role."""
    scales = require(model, "noise_scales", needed_by="BPTT (it sets the process noise to ~0)",
                     alternative="use MonteCarloEM or SVI")()
    require(model, "set_noise_scales", needed_by="BPTT (it sets the process noise to ~0)",
            alternative="use MonteCarloEM or SVI")
    new = {}
    for role in ("process", "initial"):
        cur = scales[role].detach()
        new[role] = torch.full_like(cur, floor) if cur.dim() < 2 else floor * torch.eye(cur.shape[-1], dtype=cur.dtype)
    model.set_noise_scales(**new)
    return new


class BPTT(InferenceMethod):
    """Backpropagation through time on the zero-process-noise network (module docstring).

    Args:
        num_steps: Adam steps (each over all sequences, the full unrolled series).
        lr: Adam learning rate.
        truncation: cut gradients every ``truncation`` steps (``None``: full BPTT). Default 100: the
            backward pass multiplies by the transition Jacobian at every step, so through ``T`` steps a
            gradient grows like :math:`\\rho(W)^T`; at ``T`` = 800 and :math:`\\rho` = 1.14 that is
            :math:`10^{45}`, past float32's :math:`3\\cdot10^{38}` (NaN at the first step), while 100
            steps stay below :math:`\\rho^{100}` (:math:`5\\cdot10^5` at 1.14).
        max_grad_norm: clip the gradient of the per-observation loss to this global norm before each Adam
            step (``None``: no clipping).
        noise_floor: process-noise / initial-spread scale of the returned model.
        record_every: trace row every this many steps (default: about 200 rows).
        tol: relative tolerance of the convergence rule of :mod:`~ppl_rnn.inference.em_common` (``0``,
            the default: run all steps).
        progress: progress bar.
    """

    name = "bptt"
    resumable = True  # pr.fit(..., resume=fit): the parameters and Adam's moments (FitState.trainer)

    def __init__(self, *, num_steps: int = 500, lr: float = 0.01, truncation: int | None = 100,
                 max_grad_norm: float | None = 10.0, noise_floor: float = 1e-4, record_every: int | None = None,
                 tol: float = 0.0, progress: bool = False):
        self.num_steps = check_positive_int(num_steps, "num_steps")
        self.lr = check_positive_float(lr, "lr")
        self.truncation = None if truncation is None else check_positive_int(truncation, "truncation")
        self.max_grad_norm = None if max_grad_norm is None else check_positive_float(max_grad_norm, "max_grad_norm")
        self.noise_floor = check_positive_float(noise_floor, "noise_floor")
        self.record_every = (max(1, self.num_steps // 200) if record_every is None
                             else check_positive_int(record_every, "record_every"))
        self.tol = check_positive_float(tol, "tol", allow_zero=True)
        self.progress = bool(progress)

    def _fit(self, model, data, seed, resume=None):
        # the noise-free rollout does not depend on the process noise or the initial spread: their gradients
        # are exactly zero, so Adam leaves them at the floor
        set_noise_floor(model, self.noise_floor)
        params = list(model.parameters())
        n_obs = max(data.num_observed, 1)
        opt = torch.optim.Adam(params, lr=self.lr)
        if resume is not None:  # continue the earlier fit: its parameters and Adam's moments
            try:
                model.load_state_dict(resume.state.parameters)
                opt.load_state_dict(copy.deepcopy(resume.state.trainer))
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise ConfigurationError(
                    f"resume: the earlier BPTT fit's state does not fit this model ({e}). Pass the same kind of "
                    "model (same class and sizes) as the earlier fit.") from e

        def evaluate(k):
            opt.zero_grad()
            with pyro.validation_enabled(False):  # NaN must reach the divergence check, not a ValueError
                ll = deterministic_log_likelihood(model, data, self.truncation).sum()
            val = float(ll.detach())
            return EMStep(value=val, scalars={"log_evidence": val, "objective": val}, state=ll)

        def update(k, step):
            with pyro.validation_enabled(False):
                (-step.state / n_obs).backward()
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                raise DivergenceError(
                    f"{self.name} diverged at iteration {k + 1}: the gradient of {', '.join(bad)} is not finite "
                    f"(the objective, {step.value:.6g}, is). The backward pass through "
                    f"{'all' if self.truncation is None else self.truncation} steps overflowed "
                    f"{step.state.dtype}: gradients grow like the spectral radius of the transition Jacobian to the "
                    "power of the number of steps. Fixes: truncated BPTT (truncation=50 or 100), float64 "
                    "(model.double() and float64 data), or a smaller initial recurrent weight scale.",
                    iteration=k + 1)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            opt.step()

        loop = EMLoop(method=self.name, evidence_kind="approximation", num_iterations=self.num_steps,
                      rule=ConvergenceRule(self.tol), n_obs=n_obs, record_every=self.record_every,
                      progress=self.progress, desc="BPTT")
        return loop.run(model, evaluate=evaluate, update=update, seed=seed,
                        attrs={"objective": "deterministic (zero process noise) log-likelihood"},
                        diagnostics={"noise_floor": self.noise_floor}, resume=resume,
                        snapshot=lambda: copy.deepcopy(opt.state_dict()), data_shape=tuple(data.observations.shape))


__all__ = ["BPTT", "deterministic_log_likelihood", "set_noise_floor"]
