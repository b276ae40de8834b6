r"""Real-time recurrent learning (RTRL): the deterministic network's gradient by forward-mode sensitivities,
with an online weight update at every time step (Williams & Zipser 1989).

**Objective** — the same as :class:`~ppl_rnn.inference.BPTT` (:func:`~ppl_rnn.inference.bptt.deterministic_log_likelihood`):
with zero process noise the state follows the noise-free rollout and

.. math:: L(\theta) = \sum_t \ell_t(\bar h_t, \theta),\qquad \ell_t = \log p_\theta(y_{t,o}\mid \bar h_t),\qquad
          \bar h_0 = E[h_0],\ \bar h_t = f_\theta(\bar h_{t-1}, u_t) = E[h_t\mid h_{t-1}=\bar h_{t-1}],

where :math:`\theta\in\mathbb R^P` is the model's flat weight vector (capabilities ``weights`` / ``set_weights``;
the observation noise is not in it and stays fixed during a pass).

**Sensitivity recursion** — :math:`S_t = \partial\bar h_t/\partial\theta \in\mathbb R^{H\times P}`:

.. math:: S_0 = \frac{\partial E[h_0]}{\partial\theta},\qquad
          S_t = \frac{\partial f_\theta}{\partial h}\Big|_{\bar h_{t-1}} S_{t-1} + \frac{\partial f_\theta}{\partial\theta}\Big|_{\bar h_{t-1}},
          \qquad g_t = \frac{\partial\ell_t}{\partial h}\Big|_{\bar h_t} S_t + \frac{\partial\ell_t}{\partial\theta},

and :math:`\nabla_\theta L = \sum_t g_t` exactly (:func:`rtrl_gradient`; it equals BPTT's reverse-mode gradient).
It is forward-mode automatic differentiation with stacked tangent vectors: the :math:`P` tangents
:math:`(S_{t-1}e_k, e_k)` are pushed through :math:`f_\theta` by one ``torch.func.vmap(torch.func.jvp)`` call per
step, on the model's own transition mean evaluated with ``torch.func.functional_call`` at the parameters that
``set_weights(theta)`` would produce (:class:`FlatWeights`) — no Python loop over weights, nothing model-specific.

**Online learning** (:class:`RTRL`) — at every step :math:`t` the weights move along :math:`g_t` (divided by the
number of observed entries at :math:`t`; Adam or plain gradient ascent) and the recursion carries on with the
new weights (the classical RTRL approximation: :math:`S_t` mixes sensitivities of slightly older weights). A
pass (epoch) restarts the rollout at :math:`\bar h_0`; after each pass the observation noise is set to its
maximum-likelihood value given the rollout's residuals (the closed-form maximiser of :math:`L` over it).

**Cost** — the product :math:`(\partial f/\partial h)\,S_{t-1}` costs :math:`H^2P` multiply-adds per step and sequence
(:math:`P\approx H^2` for a dense Elman network, i.e. :math:`O(H^4)`), and the sensitivities take :math:`BHP` floats;
BPTT costs :math:`O(P)` per step but stores the :math:`T` states. :class:`RTRL` refuses a problem whose per-step
cost :math:`B H^2 P` exceeds ``max_step_cost`` (default :math:`10^7`: a dense Elman network of up to about 55 hidden units, one sequence)
with a :class:`~ppl_rnn.ConfigurationError` that names the cost.

``tests/inference/test_rtrl.py`` checks that online RTRL cuts the one-step error of an input-driven 3-unit tanh
network threefold in 4 passes over 40 steps. Cost per step and what online updates do on an autonomous
oscillator: measured in ``benchmarks/README.md``, "Deterministic training: BPTT, RTRL and global search".

The fitted model gets the process noise and the initial spread of :class:`BPTT` (``noise_floor``, through
``set_noise_scales``) and the maximum-likelihood observation noise, so the common evaluator scores it like any
other fitted model. ``FitResult.trace`` (dim ``iteration`` = pass; row 0 = the initial weights): ``objective`` =
``log_evidence`` = :math:`L(\theta)` at the end of the pass (``evidence_kind="approximation"``), ``mse`` (mean
squared error of the noise-free one-step predictions), the parameters, ``wall_time_s``.
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from torch.func import functional_call, jvp, vmap
from tqdm.auto import tqdm

from ppl_rnn.capabilities import require
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.method import InferenceMethod, check_choice, check_positive_float, check_positive_int
from ppl_rnn.model import input_at
from ppl_rnn.results import FitResult
from ppl_rnn.rng import seeded
from ppl_rnn.scope import library_scope, local_param_ready

from .bptt import deterministic_log_likelihood, set_noise_floor
from .em_common import TraceRecorder, check_finite

#: largest P for which a non-selection (general affine) ``set_weights`` map is stored as a dense matrix
_DENSE_LIMIT = 4096


def _rollout_predictions(model, data) -> torch.Tensor:
    r"""``(B, T, D)`` :math:`E[y_t\mid\bar h_t]` along the noise-free rollout."""
    u = data.inputs
    B, T, _ = data.observations.shape
    h = model.initial_batched(input_at(u, 0), (B,)).mean
    out = [model.emission(0, h, input_at(u, 0)).mean]
    for t in range(1, T):
        u_t = input_at(u, t)
        h = model.transition(t, h, u_t).mean
        out.append(model.emission(t, h, u_t).mean)
    return torch.stack(out, 1)


class _Calls(torch.nn.Module):
    """The model's conditionals as one ``forward`` (so ``functional_call`` can swap its parameters)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, what, *args):
        m = self.m
        if what == "initial_mean":
            u0, batch = args
            return m.initial_batched(u0, batch).mean
        if what == "transition_mean":
            return m.transition(*args).mean
        if what == "emission_mean":
            return m.emission(*args).mean
        if what == "obs_log_prob":
            return m.observation_log_prob(*args)
        if what == "predictions":
            return _rollout_predictions(m, *args)
        if what == "deterministic_log_likelihood":
            return deterministic_log_likelihood(m, *args)
        raise ValueError(what)  # pragma: no cover - internal


class FlatWeights:
    r"""The model's parameters as a differentiable, ``vmap``-able function of its flat weight vector.

    ``set_weights(theta)`` writes :math:`\theta` into the model's parameters; this adapter finds that map once
    by probing ``set_weights`` (the model is restored afterwards) and reproduces it functionally:
    :math:`\text{params}(\theta) = c + J\theta` over the concatenated (unconstrained) parameter tensors (the
    entries outside the weights — noise scales — are read live from the model at each call), with
    :math:`J` a 0/1 selection (every model of the suite: ``set_weights`` copies entries) stored as indices, or a
    general affine map stored densely for :math:`P\le 4096`. Anything else (a ``set_weights`` that is not affine in
    the parameters) is a :class:`~ppl_rnn.ModelCapabilityError`.

    :meth:`call` evaluates a conditional of the model at ``params(theta)`` through ``torch.func.functional_call``,
    so ``torch.func`` transforms (``jvp``, ``grad``, ``vmap`` over a population) see :math:`\theta` as the input.
    """

    def __init__(self, model, *, needed_by: str, alternative: str = ""):
        get = require(model, "weights", needed_by=needed_by, alternative=alternative)
        require(model, "set_weights", needed_by=needed_by, alternative=alternative)
        self.model = model
        self.needed_by = needed_by
        self._calls = _Calls(model)
        named = list(model.named_parameters())
        self.keys = ["m." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        with torch.no_grad():
            w0 = get().detach().clone().reshape(-1)
            self.dtype = w0.dtype
            self.num_weights = P = w0.numel()

            def snap():
                return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

            try:
                model.set_weights(torch.zeros_like(w0))
                c = snap()
                model.set_weights(torch.arange(1, P + 1, dtype=w0.dtype))
                probe = snap()
                rnd = torch.randn(P, generator=torch.Generator().manual_seed(12345), dtype=w0.dtype) + w0
                model.set_weights(rnd)
                check = snap()
                self._select = None
                self._J = None
                moved = probe != c
                src = (probe - 1).round().long()
                if (moved.sum() == P and bool((c[moved] == 0).all())
                        and bool(((probe[moved] - 1 - src[moved]).abs() < 1e-6).all())
                        and torch.equal(torch.sort(src[moved]).values, torch.arange(P))
                        and torch.allclose(check, torch.where(moved, rnd[src.clamp(0, P - 1)], c))):
                    self._select = (moved, src.clamp(0, P - 1))
                elif P <= _DENSE_LIMIT:
                    cols = []
                    for k in range(P):  # one-off probe of a general affine map (not the sensitivity recursion)
                        model.set_weights(torch.nn.functional.one_hot(torch.tensor(k), P).to(w0.dtype))
                        cols.append(snap() - c)
                    J = torch.stack(cols, 1)
                    if not torch.allclose(check, c + J @ rnd, rtol=1e-6, atol=1e-9):
                        raise ModelCapabilityError(self._not_affine())
                    self._J = J
                else:
                    raise ModelCapabilityError(self._not_affine())
            finally:
                model.set_weights(w0)
            self.w0 = w0

    def _not_affine(self) -> str:
        return (f"{self.needed_by} needs set_weights(vector) to write the vector into the model's parameters (an "
                f"affine map: copied entries, as every model of the suite does); {type(self.model).__name__}'s is "
                "not affine in its parameters (or too large to probe). Use BPTT, which needs no weight vector.")

    def vector(self) -> torch.Tensor:
        """The model's current weights (a detached copy)."""
        return self.model.weights().detach().clone().reshape(-1)

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of every parameter at weights ``theta`` (differentiable in ``theta``)."""
        live = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])  # the noise scales, ...
        if self._select is not None:
            moved, src = self._select
            flat = torch.where(moved, theta[src], live)
        else:
            flat = live + self._J @ (theta - self.vector())
        out, i = {}, 0
        for k, shape, n in zip(self.keys, self.shapes, self.sizes, strict=True):
            out[k] = flat[i:i + n].reshape(shape)
            i += n
        return out

    def call(self, theta: torch.Tensor, what: str, *args):
        """The model's ``what`` (``initial_mean``, ``transition_mean``, ``emission_mean``, ``obs_log_prob``,
        ``deterministic_log_likelihood``) at weights ``theta``."""
        return functional_call(self._calls, self.params(theta), (what, *args))

    def predictions(self, theta: torch.Tensor, data) -> torch.Tensor:
        r"""``(B, T, D)`` noise-free one-step predictions :math:`E[y_t\mid\bar h_t]` at weights ``theta``."""
        return self.call(theta, "predictions", data)

    def population_predictions(self, thetas: torch.Tensor, data) -> tuple[torch.Tensor, bool]:
        """``(K, B, T, D)`` predictions of ``K`` weight vectors ``(K, P)`` — one ``vmap`` over the population,
        or a loop where the model's conditionals cannot be vmapped. Returns ``(predictions, vectorised)``."""
        with torch.no_grad(), pyro.validation_enabled(False), library_scope():
            local_param_ready(self.model)
            if getattr(self, "_vmap_ok", True):
                try:
                    return vmap(lambda th: self.predictions(th, data))(thetas), True
                except Exception:  # e.g. data-dependent control flow in a user's conditional
                    self._vmap_ok = False
            return torch.stack([self.predictions(th, data) for th in thetas]), False


def squared_errors(pred: torch.Tensor, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension sums of squared errors ``(..., D)`` over the observed entries and the counts ``(D,)``;
    non-finite predictions give ``inf``."""
    y, mask = data.observations, data.mask
    r = torch.where(mask, pred - y, torch.zeros((), dtype=pred.dtype))
    sse = r.square().sum((-3, -2))
    sse = torch.where(torch.isfinite(sse), sse, torch.full_like(sse, math.inf))
    return sse, mask.sum((0, 1)).to(pred.dtype)


def deterministic_noise(model, flat: FlatWeights, data, noise_floor: float) -> dict[str, float]:
    r"""Set the noise of a deterministically trained model (in place, through ``set_noise_scales``): process noise
    and initial spread at ``noise_floor`` (as :class:`BPTT`), observation noise at its maximum-likelihood value
    given the noise-free rollout (:math:`r_k^2` = mean squared residual of output :math:`k`; for a scale-matrix
    model the Cholesky factor of the residual covariance over fully observed steps, or of its diagonal).
    Returns ``{"mse": ..., "log_likelihood": ...}``: the mean squared error and the deterministic log-likelihood
    at that observation noise."""
    set_noise_floor(model, noise_floor)
    scales = require(model, "noise_scales", needed_by=flat.needed_by, alternative="use MonteCarloEM or SVI")()
    with torch.no_grad(), pyro.validation_enabled(False), library_scope():
        local_param_ready(model)
        pred = flat.predictions(flat.vector(), data)
    sse, n = squared_errors(pred, data)
    ms = (sse / n.clamp_min(1)).clamp_min(noise_floor**2)
    obs = scales.get("obs")
    if obs is not None and bool(torch.isfinite(ms).all()):
        obs = obs.detach()
        if obs.dim() < 2:
            model.set_noise_scales(obs=ms.sqrt().to(obs.dtype))
        else:
            full = data.mask.all(-1)
            r = (pred - data.observations)[full]
            D = r.shape[-1]
            cov = r.T @ r / r.shape[0] if r.shape[0] > D else torch.diag(ms)
            cov = cov + noise_floor**2 * torch.eye(D, dtype=cov.dtype)
            model.set_noise_scales(obs=torch.linalg.cholesky(cov).to(obs.dtype))
    with torch.no_grad(), pyro.validation_enabled(False):
        ll = float(deterministic_log_likelihood(model, data).sum())
    return {"mse": float(sse.sum() / n.sum().clamp_min(1)), "log_likelihood": ll}


class _Sensitivities:
    r"""The RTRL recursion. One step maps :math:`(\bar h_{t-1}, S_{t-1})` to :math:`(\bar h_t, S_t, \ell_t, g_t)` with
    ONE ``vmap(jvp)`` over the P stacked tangents :math:`(S_{t-1}e_k, e_k)` of
    :math:`F_t(h, \theta) = (f_\theta(h, u_t),\ \ell_t(f_\theta(h, u_t), \theta))`: the tangent of the first output is
    :math:`S_t e_k`, that of the second :math:`g_t e_k`. Sensitivities are kept tangent-major, ``S`` ``(P, B, H)``."""

    def __init__(self, flat: FlatWeights, data):
        self.flat, self.data = flat, data
        self.eye = torch.eye(flat.num_weights, dtype=flat.dtype)

    def _loss(self, t, h, th):
        d = self.data
        return self.flat.call(th, "obs_log_prob", t, h, d.observations[:, t], d.mask[:, t],
                              input_at(d.inputs, t)).sum()

    def start(self, theta):
        """``(h_0, S_0, l_0, g_0)``."""
        B = self.data.num_sequences
        u0 = input_at(self.data.inputs, 0)

        def F0(th):
            h = self.flat.call(th, "initial_mean", u0, (B,))
            return h, self._loss(0, h, th)

        (h, ell), (S, g) = vmap(lambda e: jvp(F0, (theta,), (e,)))(self.eye)
        return h[0].contiguous(), S, ell[0], g

    def advance(self, t, h, S, theta):
        """``(h_t, S_t, l_t, g_t)`` from ``(h_{t-1}, S_{t-1})`` at weights ``theta``."""
        u_t = input_at(self.data.inputs, t)

        def F(hh, th):
            h_new = self.flat.call(th, "transition_mean", t, hh, u_t)
            return h_new, self._loss(t, h_new, th)

        (h_new, ell), (S_new, g) = vmap(lambda s, e: jvp(F, (h, theta), (s, e)))(S, self.eye)
        return h_new[0].contiguous(), S_new, ell[0], g


def rtrl_gradient(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(log_likelihood, gradient (P,))``: the deterministic log-likelihood (summed over sequences) and its gradient with respect
    to ``model.weights()``, accumulated over the sequence by the RTRL recursion at fixed weights (no update).
    Equal to BPTT's reverse-mode gradient of :func:`~ppl_rnn.inference.bptt.deterministic_log_likelihood`."""
    flat = FlatWeights(model, needed_by="RTRL", alternative="use BPTT")
    sens = _Sensitivities(flat, data)
    theta = flat.vector()
    with torch.no_grad(), pyro.validation_enabled(False), library_scope():
        local_param_ready(model)
        h, S, ll, total = sens.start(theta)
        for t in range(1, data.num_steps):
            h, S, ell, g = sens.advance(t, h, S, theta)
            ll, total = ll + ell, total + g
    return ll, total


class RTRL(InferenceMethod):
    r"""Real-time recurrent learning on the zero-process-noise network (see the module docstring).

    Args:
        num_epochs: passes over the data; every step of every pass updates the weights.
        lr: learning rate of the per-step update.
        optimizer: ``"adam"`` (``torch.optim.Adam`` on the weight vector, default) or ``"sgd"`` (plain gradient
            ascent, the textbook rule).
        update_every: update the weights every this many steps with the step gradients accumulated since the
            last update, per observed entry (1: online RTRL, the default; the number of steps: one exact gradient
            step per pass, i.e. BPTT's update computed forward).
        max_step_cost: refuse problems whose per-step RTRL cost :math:`B H^2 P` (multiply-adds) exceeds it.
        noise_floor: process-noise / initial-spread scale of the returned model.
        fit_obs_noise: set the observation noise to its maximum-likelihood value after every pass.
        progress: progress bar (one tick per step).
    """

    name = "rtrl"

    def __init__(self, *, num_epochs: int = 5, lr: float = 0.005, optimizer: str = "adam",
                 update_every: int = 1, max_step_cost: float = 1e7, noise_floor: float = 1e-4, fit_obs_noise: bool = True,
                 progress: bool = False):
        self.num_epochs = check_positive_int(num_epochs, "num_epochs")
        self.lr = check_positive_float(lr, "lr")
        self.optimizer = check_choice(optimizer, "optimizer", ("adam", "sgd"))
        self.update_every = check_positive_int(update_every, "update_every")
        self.max_step_cost = check_positive_float(max_step_cost, "max_step_cost")
        self.noise_floor = check_positive_float(noise_floor, "noise_floor")
        self.fit_obs_noise = bool(fit_obs_noise)
        self.progress = bool(progress)

    def check_cost(self, num_sequences: int, hidden_dim: int, num_weights: int, num_steps: int) -> int:
        """The per-step cost :math:`B H^2 P`, or a ConfigurationError naming it when above ``max_step_cost``."""
        B, H, P = num_sequences, hidden_dim, num_weights
        cost = B * H * H * P
        if cost > self.max_step_cost:
            raise ConfigurationError(
                f"RTRL would cost B*H^2*P = {B}*{H}^2*{P} = {cost:.3g} multiply-adds per time step "
                f"({cost * num_steps:.3g} per pass over {num_steps} steps) and keep B*H*P = {B * H * P:.3g} "
                f"sensitivities; the limit is max_step_cost={self.max_step_cost:.3g}. Use BPTT (O(P) per step), "
                "fewer hidden units or sequences, or raise max_step_cost.")
        return cost

    def _fit(self, model, data, seed):
        t0 = time.perf_counter()
        flat = FlatWeights(model, needed_by="RTRL", alternative="use BPTT")
        sens = _Sensitivities(flat, data)
        theta = torch.nn.Parameter(flat.vector())
        with torch.no_grad(), pyro.validation_enabled(False), library_scope():
            local_param_ready(model)
            h0 = flat.call(theta.detach(), "initial_mean", input_at(data.inputs, 0), (data.num_sequences,))
        cost = self.check_cost(data.num_sequences, h0.shape[-1], flat.num_weights, data.num_steps)
        if not self.fit_obs_noise:
            set_noise_floor(model, self.noise_floor)
        rec = TraceRecorder()
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([theta], lr=self.lr)
        n_t = data.mask.sum((0, 2))  # observed entries per step
        T = data.num_steps

        def finish_pass(k):
            model.set_weights(theta.detach())
            if self.fit_obs_noise:
                info = deterministic_noise(model, flat, data, self.noise_floor)
            else:
                with torch.no_grad(), pyro.validation_enabled(False):
                    ll = float(deterministic_log_likelihood(model, data).sum())
                    sse, n = squared_errors(flat.predictions(theta.detach(), data), data)
                info = {"log_likelihood": ll, "mse": float(sse.sum() / n.sum().clamp_min(1))}
            check_finite(model, iteration=k, method=self.name, what={"objective": info["log_likelihood"]})
            rec.record(model, objective=info["log_likelihood"], log_evidence=info["log_likelihood"],
                       mse=info["mse"])
            return info

        with seeded(seed):
            info0 = finish_pass(0)
            bar = tqdm(total=self.num_epochs * T, disable=not self.progress, desc="RTRL")
            for epoch in range(1, self.num_epochs + 1):
                with pyro.validation_enabled(False), library_scope():
                    local_param_ready(model)
                    acc, n_acc = torch.zeros_like(theta.detach()), 0
                    for t in range(T):
                        th = theta.detach()
                        if t == 0:
                            h, S, _, g = sens.start(th)
                        else:
                            h, S, _, g = sens.advance(t, h, S, th)
                        acc, n_acc = acc + g, n_acc + n_t[t]
                        if n_acc > 0 and ((t + 1) % self.update_every == 0 or t == T - 1):
                            if not bool(torch.isfinite(acc).all()):
                                model.set_weights(th)
                                check_finite(model, iteration=epoch, method=self.name,
                                             what={"gradient": math.nan})
                            opt.zero_grad()
                            theta.grad = -acc / n_acc
                            opt.step()
                            acc, n_acc = torch.zeros_like(acc), 0
                        bar.update(1)
                info = finish_pass(epoch)
                bar.set_postfix(mse=f"{info['mse']:.4g}")
            bar.close()
        trace = rec.dataset(attrs={"method": self.name, "evidence_kind": "approximation",
                                   "objective": "deterministic (zero process noise) log-likelihood after each pass"})
        return FitResult(model=model, trace=trace, posterior=None, wall_time_s=time.perf_counter() - t0,
                         converged=True, method=self.name, evidence_kind="approximation",
                         diagnostics={"noise_floor": self.noise_floor, "step_cost": cost,
                                      "initial_mse": info0["mse"], "final_mse": info["mse"]})


__all__ = ["RTRL", "FlatWeights", "rtrl_gradient", "deterministic_noise", "squared_errors"]
