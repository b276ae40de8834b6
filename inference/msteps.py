r"""The M-steps of Monte Carlo EM: objects with one interface, each with its own options.

Given weighted smoothed trajectories :math:`h^{(s)}` (weights :math:`w_s`, summing to 1) an M-step moves the
model's parameters towards

.. math:: \arg\max_\theta \hat Q(\theta), \qquad \hat Q(\theta) = \sum_s w_s \log p_\theta(h^{(s)}, y_{obs}),

the Monte Carlo estimate of EM's :math:`Q(\theta\mid\theta_k)`, scored with the model's own conditionals
(:func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`).

* :class:`ClosedFormMStep`: the model's ``closed_form_mstep`` capability (e.g.
  :meth:`ppl_rnn.models.ElmanSSM.closed_form_mstep`) maximises :math:`\hat Q` block by block: output map and
  noise variances by weighted least squares, recurrent weights by least squares (identity activation) or
  ``transition_steps`` Levenberg-Marquardt steps (``tanh``; generalised EM), process noise in closed form
  given the weights.
* :class:`GradientMStep` (any :class:`~ppl_rnn.StateSpaceModel`): ``steps`` Adam steps (learning rate ``lr``)
  on :math:`-\hat Q/n_{obs}`; Adam's moments are the step's working state, carried across iterations (and
  across a resumed fit: :class:`~ppl_rnn.inference.mcem.MCEMState`).
* :class:`AutoMStep` (the default): :class:`ClosedFormMStep` where the model declares ``closed_form_mstep``,
  else :class:`GradientMStep`.

**The interface.** ``step.resolve(model)`` gives the concrete step for a model (raising
:class:`~ppl_rnn.errors.ModelCapabilityError` when it needs a capability the model lacks);
``state = step.start(saved)`` its mutable working state (``saved``: what ``step.freeze(state)`` returned in an
earlier run, or None); ``step(model, paths, weights, data, state) -> float`` updates the model in place and
returns :math:`\hat Q` at the new parameters; ``step.anneal(model, iteration)`` applies noise annealing.

**Noise annealing** (``anneal_noise=(factor, iterations)``, deterministic-annealing EM): after each of the
first ``iterations`` M-steps (iteration :math:`k < K_a`) the estimated process-noise scale is multiplied by

.. math:: 1 + (\mathrm{factor} - 1)(1 - k/K_a),

decaying linearly from ``factor`` to 1, which smooths the likelihood surface early on. It acts on the
M-step's result through the model's ``noise_scales`` / ``set_noise_scales`` capabilities; Monte Carlo EM
applies it after the acceptance policy's over-relaxation (:mod:`~ppl_rnn.inference.acceptance`), so the stretch
acts on the M-step's own move.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ppl_rnn.capabilities import capability, require
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import check_positive_float, check_positive_int

__all__ = ["MStep", "AutoMStep", "ClosedFormMStep", "GradientMStep", "q_hat"]


def q_hat(model, paths: torch.Tensor, weights: torch.Tensor, data: Data) -> torch.Tensor:
    r""":math:`\hat Q(\theta)=\sum_s w_s\log p_\theta(h^{(s)}, y_{obs})` at the model's current parameters."""
    from .complete_data import complete_data_log_likelihood

    return (weights.to(model.dtype) * complete_data_log_likelihood(model, paths, data).sum(-1)).sum()


def _check_anneal(anneal_noise, owner: str):
    if anneal_noise is None:
        return None
    ok = (isinstance(anneal_noise, (tuple, list)) and len(anneal_noise) == 2
          and isinstance(anneal_noise[0], (int, float)) and not isinstance(anneal_noise[0], bool)
          and anneal_noise[0] >= 1
          and isinstance(anneal_noise[1], int) and not isinstance(anneal_noise[1], bool) and anneal_noise[1] >= 1)
    if not ok:
        raise ConfigurationError(
            f"{owner}: anneal_noise must be None or (factor >= 1, iterations >= 1); found {anneal_noise!r}. "
            "Use e.g. anneal_noise=(3.0, 20).")
    return (float(anneal_noise[0]), int(anneal_noise[1]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MStep:
    """Base of the M-steps (module docstring has the interface and the maths of ``anneal_noise``)."""

    anneal_noise: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "anneal_noise", _check_anneal(self.anneal_noise, type(self).__name__))

    #: the name recorded in the trace attributes and diagnostics (``"closed_form"`` / ``"gradient"``)
    kind: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    def resolve(self, model) -> MStep:
        """The concrete step for ``model``; checks the capabilities it needs (annealing's noise scales)."""
        if self.anneal_noise is not None:
            for name in ("noise_scales", "set_noise_scales"):
                require(model, name, needed_by=f"{type(self).__name__}(anneal_noise=...)",
                        alternative="use anneal_noise=None")
        return self

    def start(self, saved=None):
        """The step's mutable working state (None: the step keeps none)."""
        return None

    def freeze(self, state):
        """What of ``state`` a frozen fit state keeps (to give back to :meth:`start` when resuming)."""
        return None

    def __call__(self, model, paths: torch.Tensor, weights: torch.Tensor, data: Data, state) -> float:
        raise NotImplementedError

    def anneal(self, model, iteration: int) -> None:
        """Noise annealing after the M-step of ``iteration`` (module docstring); nothing when off."""
        if self.anneal_noise is None or iteration >= self.anneal_noise[1]:
            return
        factor, n = self.anneal_noise
        infl = 1.0 + (factor - 1.0) * (1.0 - iteration / n)
        model.set_noise_scales(process=model.noise_scales()["process"].detach() * infl)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClosedFormMStep(MStep):
    """The model's closed-form M-step (capability ``closed_form_mstep``; module docstring).

    Args:
        transition_steps: Levenberg-Marquardt steps on nonlinear recurrent weights per M-step (``>= 0``; the
            identity activation's weights are solved exactly).
        learn_initial: also fit the initial-state parameters.
        anneal_noise: ``None`` or ``(factor, iterations)`` (module docstring, "Noise annealing").
    """

    transition_steps: int = 10
    learn_initial: bool = True
    kind: str = dataclasses.field(default="closed_form", init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "transition_steps",
                           check_positive_int(self.transition_steps, "ClosedFormMStep transition_steps", minimum=0))
        object.__setattr__(self, "learn_initial", bool(self.learn_initial))

    def resolve(self, model) -> MStep:
        require(model, "closed_form_mstep", needed_by="ClosedFormMStep",
                alternative="use mstep=GradientMStep() (or AutoMStep()) for this model")
        return super().resolve(model)

    def __call__(self, model, paths, weights, data, state) -> float:
        return float(model.closed_form_mstep(paths, data.observations, data.mask, data.inputs, weights=weights,
                                             transition_steps=self.transition_steps,
                                             learn_initial=self.learn_initial))


class _AdamState:
    """The gradient M-step's working state: the Adam optimiser (created on the first step) and, for a resumed
    fit, the earlier run's moments to load into it."""

    def __init__(self, saved: dict | None):
        self.optimizer: torch.optim.Optimizer | None = None
        self.saved = saved


class _QuasiNewtonState:
    """The L-BFGS M-step's working state: its curvature pairs ``(s, y)`` (oldest first), kept across iterations."""

    def __init__(self, saved: dict | None):
        self.s: list[torch.Tensor] = [] if saved is None else [v.clone() for v in saved["s"]]
        self.y: list[torch.Tensor] = [] if saved is None else [v.clone() for v in saved["y"]]


#: the curvature pairs L-BFGS keeps
_LBFGS_MEMORY = 10
#: Armijo's sufficient-decrease constant and the most step halvings of one line search
_ARMIJO, _HALVINGS = 1e-4, 30


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _two_loop(g: torch.Tensor, S: list, Y: list) -> torch.Tensor:
    r"""L-BFGS direction :math:`-H g` from the pairs ``S, Y`` (two-loop recursion, Nocedal & Wright alg. 7.4;
    initial :math:`H_0 = (s^\top y / y^\top y) I` of the newest pair)."""
    q = g.clone()
    alphas = []
    for s, y in zip(reversed(S), reversed(Y), strict=True):
        a = float(s @ q) / float(s @ y)
        alphas.append(a)
        q.sub_(y, alpha=a)
    q.mul_(float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]))
    for (s, y), a in zip(zip(S, Y, strict=True), reversed(alphas), strict=True):
        b = float(y @ q) / float(s @ y)
        q.add_(s, alpha=a - b)
    return q.neg_()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientMStep(MStep):
    r"""Maximise :math:`\hat Q` by gradients (any model; module docstring) in the model's unconstrained
    parameters (every ``parameters()`` entry that requires a gradient).

    * ``optimizer="lbfgs"`` (default): L-BFGS (Nocedal & Wright 2006, alg. 7.4/7.5) on
      :math:`f(\theta) = -\hat Q(\theta)/n_{obs}`, run to (near) convergence of this iteration's :math:`\hat Q`:
      at most ``steps`` iterations, each a quasi-Newton direction :math:`d = -H g` and a backtracking line search
      from the full step (Armijo: :math:`f(\theta + t d) \le f(\theta) + 10^{-4} t\, g^\top d`, halving
      :math:`t`); it stops when an iteration raises :math:`\hat Q` by less than ``tol`` nats or the quadratic model
      promises less (:math:`-\tfrac12 g^\top d\, n_{obs} <` ``tol``). The paths are fixed inside an M-step, so
      :math:`\hat Q` is a smooth deterministic function there. The curvature pairs
      :math:`(s, y) = (\Delta\theta, \Delta g)` (the last 10, kept only where :math:`s^\top y > 0`) persist
      across iterations: successive :math:`\hat Q` differ by Monte Carlo noise and the parameter move, so
      the previous iterations' curvature is a good start and an M-step near convergence costs a few
      evaluations of :math:`\hat Q` and its gradient. Without pairs the first step is
      :math:`-g\min(1, 1/\lVert g\rVert_1)`. A generalised-EM step: :math:`\hat Q` never decreases.
    * ``optimizer="adam"``: ``steps`` Adam steps with learning rate ``lr`` (Adam's moments persist across
      iterations).

    The objective is evaluated with distribution argument validation off and the model's parameters read once
    per evaluation (:func:`~ppl_rnn.inference.complete_data.cached_params`).

    Args:
        optimizer: ``"lbfgs"`` or ``"adam"``.
        steps: L-BFGS iterations at most / Adam steps per M-step (``>= 0``).
        lr: Adam's learning rate (not used by L-BFGS).
        tol: L-BFGS's stopping tolerance in nats of :math:`\hat Q` (not used by Adam).
        anneal_noise: ``None`` or ``(factor, iterations)`` (module docstring, "Noise annealing").
    """

    optimizer: str = "lbfgs"
    steps: int = 10
    lr: float = 0.01
    tol: float = 1e-3
    kind: str = dataclasses.field(default="gradient", init=False, repr=False, compare=False)

    @property
    def particle_growth(self) -> tuple[float, float] | None:
        r"""The E-step growth ``MonteCarloEM`` uses when given no schedule: with L-BFGS, (8, 2) — particles from
        :math:`N` to :math:`8N`, paths from :math:`P` to :math:`2P` geometrically over the run. An M-step run to
        convergence of :math:`\hat Q` moves the parameters by :math:`\hat Q`'s whole Monte Carlo noise, which a
        constant E-step never shrinks (measured on a local-level model: ``benchmarks/README.md``, MCEM cost
        section). Adam's few small steps (None) keep the smoother's sizes."""
        return (8.0, 2.0) if self.optimizer == "lbfgs" else None

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in ("lbfgs", "adam"):
            raise ConfigurationError(
                f"GradientMStep optimizer must be 'lbfgs' or 'adam'; found {self.optimizer!r}. Use "
                "GradientMStep(optimizer='lbfgs') (the default) or GradientMStep(optimizer='adam', lr=0.01).")
        object.__setattr__(self, "steps", check_positive_int(self.steps, "GradientMStep steps", minimum=0))
        object.__setattr__(self, "lr", check_positive_float(self.lr, "GradientMStep lr"))
        object.__setattr__(self, "tol", check_positive_float(self.tol, "GradientMStep tol"))

    def start(self, saved=None):
        if self.optimizer == "adam":
            return _AdamState(saved)
        return _QuasiNewtonState(saved)

    def freeze(self, state):
        if state is None:
            return None
        if isinstance(state, _QuasiNewtonState):
            return {"s": tuple(v.clone() for v in state.s), "y": tuple(v.clone() for v in state.y)}
        return state.saved if state.optimizer is None else copy.deepcopy(state.optimizer.state_dict())

    def __call__(self, model, paths, weights, data, state) -> float:
        if self.optimizer == "lbfgs":
            return self._lbfgs(model, paths, weights, data, state)
        if state.optimizer is None:
            state.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
            if state.saved is not None:  # a resumed fit: the earlier run's moments
                state.optimizer.load_state_dict(copy.deepcopy(state.saved))
        opt, n_obs = state.optimizer, max(data.num_observed, 1)
        for _ in range(self.steps):
            opt.zero_grad()
            (-q_hat(model, paths, weights, data) / n_obs).backward()
            opt.step()
        with torch.no_grad():
            return float(q_hat(model, paths, weights, data))

    def _lbfgs(self, model, paths, weights, data, state: _QuasiNewtonState) -> float:
        import pyro

        from .complete_data import cached_params

        params = [p for p in model.parameters() if p.requires_grad]
        n_obs = max(data.num_observed, 1)
        paths = paths.detach()

        def set_flat(x):
            with torch.no_grad():
                i = 0
                for p in params:
                    p.copy_(x[i:i + p.numel()].view_as(p))
                    i += p.numel()

        def fg(x):
            """``(f, g)`` at ``x`` (f a float, +inf where not finite)."""
            set_flat(x)
            with torch.enable_grad(), pyro.validation_enabled(False), cached_params(model):
                f = -q_hat(model, paths, weights, data) / n_obs
                grads = torch.autograd.grad(f, params, allow_unused=True)
            g = _flat([torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads, strict=True)]).to(x.dtype)
            fv = float(f.detach())
            if not (math.isfinite(fv) and bool(torch.isfinite(g).all())):
                fv = math.inf
            return fv, g

        if not params:
            with torch.no_grad():
                return float(q_hat(model, paths, weights, data))
        x = _flat([p.detach() for p in params]).clone()
        f, g = fg(x)
        if not math.isfinite(f):
            set_flat(x)
            return -f * n_obs
        S, Y = state.s, state.y
        for _ in range(self.steps):
            d = _two_loop(g, S, Y) if S else -g * min(1.0, 1.0 / max(float(g.abs().sum()), 1e-300))
            gd = float(g @ d)
            if not gd < 0:  # not a descent direction (stale curvature): forget it, take the gradient step
                S.clear()
                Y.clear()
                d = -g * min(1.0, 1.0 / max(float(g.abs().sum()), 1e-300))
                gd = float(g @ d)
                if not gd < 0:
                    break  # a zero gradient
            if S and -0.5 * gd * n_obs < self.tol:
                break  # the quadratic model promises less than tol
            t = 1.0
            for _ in range(_HALVINGS):
                f_new, g_new = fg(x + t * d)
                if f_new <= f + _ARMIJO * t * gd:
                    break
                t *= 0.5
            else:
                break  # no sufficient decrease along d: keep x
            s_k, y_k = t * d, g_new - g
            if float(s_k @ y_k) > 1e-12 * float(s_k @ s_k) ** 0.5 * float(y_k @ y_k) ** 0.5:
                S.append(s_k)
                Y.append(y_k)
                if len(S) > _LBFGS_MEMORY:
                    S.pop(0)
                    Y.pop(0)
            gain = (f - f_new) * n_obs
            x, f, g = x + s_k, f_new, g_new
            if gain < self.tol:
                break
        set_flat(x)
        return -f * n_obs


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoMStep(MStep):
    """The default: the ``closed_form`` step where the model declares ``closed_form_mstep``, else the
    ``gradient`` step (defaults ``ClosedFormMStep()`` and ``GradientMStep()``); the chosen step anneals with this
    ``anneal_noise`` when it is set (else with its own).

    Args:
        closed_form: the :class:`ClosedFormMStep` to use where the model has the capability.
        gradient: the :class:`GradientMStep` to use otherwise.
        anneal_noise: ``None`` or ``(factor, iterations)`` (module docstring, "Noise annealing").
    """

    closed_form: ClosedFormMStep | None = None
    gradient: GradientMStep | None = None

    def __post_init__(self):
        super().__post_init__()
        for name, cls in (("closed_form", ClosedFormMStep), ("gradient", GradientMStep)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise ConfigurationError(f"AutoMStep {name} must be None or a {cls.__name__}; found {v!r}. "
                                         f"Use e.g. {name}={cls.__name__}().")

    def resolve(self, model) -> MStep:
        if capability(model, "closed_form_mstep") is not None:
            step = self.closed_form or ClosedFormMStep()
        else:
            step = self.gradient or GradientMStep()
        if self.anneal_noise is not None:
            step = dataclasses.replace(step, anneal_noise=self.anneal_noise)
        return step.resolve(model)

    def __call__(self, model, paths, weights, data, state) -> float:
        raise ConfigurationError("AutoMStep is resolved first: call step.resolve(model) and use the step it returns.")
