r"""Monte Carlo EM with a particle-smoother E-step (Unkelbach, Yi & Schmidhuber 2009), built from parts.

EM maximises the log-evidence :math:`\log p_\theta(y)` by iterating

.. math::
    Q(\theta\mid\theta_k) = E_{p_{\theta_k}(h\mid y)}\big[\log p_\theta(h, y)\big], \qquad
    \theta_{k+1} = \arg\max_\theta Q(\theta\mid\theta_k).

For a nonlinear model the smoothing distribution is intractable; the **E-step** draws :math:`S` trajectories
:math:`h^{(s)}\sim p_{\theta_k}(h\mid y)` with a smoother (default: the particle smoother, forward particle
filter plus backward simulation; any method whose posterior has ``diagnostics["paths"]`` or a ``sample``
works, e.g. ``KalmanSmoother`` on a linear model) and replaces :math:`Q` by the Monte Carlo estimate

.. math:: \hat Q_k(\theta) = \sum_s w_s \log p_\theta(h^{(s)}, y_{obs})

scored with the model's own conditionals. ``MonteCarloEM`` is that loop and its parts, each an object with
its own options and maths:

* ``mstep``: the **M-step** (:mod:`~ppl_rnn.inference.msteps`: :class:`~ppl_rnn.inference.msteps.AutoMStep`,
  ``ClosedFormMStep``, ``GradientMStep``; noise annealing is an M-step option);
* ``acceptance``: the **acceptance policy** (:mod:`~ppl_rnn.inference.acceptance`: the standard error of each
  log-evidence estimate, rejection, the ascent test, over-relaxation, and the one meaning of a refused step);
* ``schedule``: the **particle schedule** (:class:`ParticleSchedule`);
* ``averaging``: **stochastic averaging** (:class:`SAEM`);
* ``start``: where the run begins (:mod:`~ppl_rnn.inference.starts`: the model, the linear or nonlinear warm
  start, multi-start);
* ``stopping``: the **convergence rule** (:class:`~ppl_rnn.inference.em_common.ConvergenceRule`).

**Monte Carlo noise.** :math:`\hat Q` is noisy, so the exact EM ascent property holds only up to Monte Carlo
error. A :class:`ParticleSchedule` grows the number of particles (and paths) geometrically across iterations,
so the noise shrinks as EM converges; :class:`SAEM` switches on stochastic-approximation EM (Delyon, Lavielle &
Moulines 1999): :math:`\tilde Q_k = (1-\gamma_k)\tilde Q_{k-1} + \gamma_k\hat Q_k`, implemented by keeping the
paths of past iterations with geometrically decaying weights (a bank pruned below weight ``1e-3``), which
for the exponential-family blocks is exactly the averaging of sufficient statistics.

**The loop** is :class:`~ppl_rnn.inference.em_common.EMLoop`, shared with every EM-style trainer. Iteration
:math:`k`: the E-step at :math:`\theta_k` (paths, :math:`\hat\ell_k` and its standard error); then the M-step
on the (averaged) paths, the acceptance policy's stretch, the M-step's annealing; with the ascent test, the
policy may refuse the step.

**Convergence** (the one rule of :mod:`~ppl_rnn.inference.em_common`; default
``ConvergenceRule(tol=1e-5, window=5, z=2.0)``): stop when the upper ``z`` standard-error bound of the change per
iteration between windows of ``window`` iterations is at most ``tol * max(|l|, n_obs)``. With noisy estimates
the bound stays large, so a run that is still improving is not stopped (why the default ``tol`` is ``1e-5``:
``benchmarks/README.md``, "Monte Carlo EM's options, measured").

**dtype** (default ``"float64"``): the run works on a float64 copy and writes the result back into the
model in its own dtype (chosen by measurement: ``benchmarks/README.md``, "Monte Carlo EM's options, measured").

**Trace** (``FitResult.trace``, dim ``iteration``; row ``k`` = parameters :math:`\theta_k`, row 0 = the initial
model): ``log_evidence`` (estimate at :math:`\theta_k`), ``objective`` (:math:`\hat Q_{k-1}(\theta_k)`, NaN at
``k=0`` and where the ascent test refused the step), ``num_particles``, ``num_paths``, ``gamma`` (SAEM's step size
for the M-step from row ``k``'s paths), ``wall_time_s`` (cumulative), ``log_evidence_se`` and ``rejected`` (with
rejection on), ``overrelax`` (the :math:`\omega` that produced the row's parameters, when over-relaxing),
``ascent_dq``, ``ascent_se``, ``ascent_kept`` (with the ascent test), and every parameter.
``K`` iterations cost ``K`` M-steps and ``K+1`` E-steps (the last gives ``FitResult.posterior`` at the fitted
parameters).

**Resuming** (``pr.fit(model, y, method=MonteCarloEM(...), resume=earlier_fit)``): the fit's state is a
frozen record, :class:`ppl_rnn.results.FitState` (parameters, RNG state, iteration, the convergence rule's
history) with the trainer's part :class:`MCEMState` (SAEM's bank, the M-step's state: Adam's moments, the
acceptance policy's state: the particle boost and :math:`\omega`); the resumed run continues it to
``num_iterations`` exactly as an uninterrupted run (:mod:`~ppl_rnn.inference.em_common`, "Resuming"); the start
is not re-run. Schedules that depend on ``num_iterations`` (a geometric :class:`ParticleSchedule`, ``SAEM(alpha)``)
go on under the resumed method's length, so there the continuation is not the uninterrupted run of that length.

**Initialisation matters more than restarts.** EM climbs to the local maximum of the basin it starts in. For
a tanh network on oscillating data, Gaussian random weights tend to end in a "linear-regime" optimum;
starting from ``ElmanSSM(..., weight_init="rotation")`` EM tunes the oscillating modes' frequencies instead.
From a Gaussian start, ``start=MultiStart(num_starts=8, kind="rotation")`` reaches that basin (measured:
``benchmarks/README.md``, "Monte Carlo EM's options, measured").
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping

import torch

from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import InferenceMethod, check_positive_int

from .acceptance import Acceptance, AcceptanceState
from .em_common import ConvergenceRule, EMLoop, EMStep, load_resumed_parameters
from .msteps import AutoMStep, MStep, q_hat
from .starts import FromModel, Start

_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64,
           torch.float32: torch.float32, torch.float64: torch.float64}


def _check_count(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigurationError(
            f"{name} must be a positive int (at least one particle/path); found {v!r}. Use e.g. 100.")
    return v


def _geometric(a: int, b: int, k: int, n: int) -> int:
    if n <= 1:
        return b
    f = min(k, n - 1) / (n - 1)
    return max(1, int(round(a * (b / a) ** f)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParticleSchedule:
    r"""The number of particles :math:`N_k` and paths :math:`P_k` of the E-step at iteration :math:`k`.

    ``particles=(N_0, N_1)`` grows the particles geometrically over the :math:`K` iterations,
    :math:`N_k = \mathrm{round}\big(N_0 (N_1/N_0)^{\min(k, K-1)/(K-1)}\big)`; ``paths=(P_0, P_1)`` the same for
    the paths; an unset one is the smoother's own size. ``growth=(g_N, g_P)``: from the smoother's own sizes
    :math:`(N, P)` to :math:`(g_N N, g_P P)` the same way, reached at iteration ``over - 1`` whatever the run's
    length (so a resumed fit continues the uninterrupted run's sizes; what ``MonteCarloEM`` uses, when no
    schedule is given, for an M-step with a ``particle_growth``). ``fn``: a callable ``k -> N`` or ``k -> (N, P)``
    instead (exclusive with the others). Refusals of the acceptance policy multiply both by its boost.
    """

    particles: tuple | None = None
    paths: tuple | None = None
    fn: Callable | None = None
    growth: tuple | None = None
    over: int = 50

    def __post_init__(self):
        if self.fn is not None:
            if not callable(self.fn) or self.particles is not None or self.paths is not None:
                raise ConfigurationError(
                    f"ParticleSchedule fn must be a callable k -> N or k -> (N, P), given alone (without particles= "
                    f"or paths=); found fn={self.fn!r}, particles={self.particles!r}, paths={self.paths!r}.")
        if self.growth is not None:
            g = self.growth
            ok = (isinstance(g, (tuple, list)) and len(g) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 1 for x in g))
            if not ok or self.particles is not None or self.paths is not None or self.fn is not None:
                raise ConfigurationError(
                    f"ParticleSchedule growth must be (factor on the particles, factor on the paths), both >= 1, "
                    f"given alone; found growth={g!r}, particles={self.particles!r}, paths={self.paths!r}, "
                    f"fn={self.fn!r}. Use e.g. ParticleSchedule(growth=(8, 2)).")
            object.__setattr__(self, "growth", (float(g[0]), float(g[1])))
        object.__setattr__(self, "over", check_positive_int(self.over, "ParticleSchedule over"))
        for name in ("particles", "paths"):
            v = getattr(self, name)
            if v is None:
                continue
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise ConfigurationError(
                    f"ParticleSchedule {name} must be None or (start, end), two positive ints; found {v!r}. "
                    f"Use e.g. {name}=(100, 1000).")
            _check_count(v[0], f"ParticleSchedule {name} start")
            _check_count(v[1], f"ParticleSchedule {name} end")
            object.__setattr__(self, name, (int(v[0]), int(v[1])))

    def sizes(self, k: int, num_iterations: int, smoother) -> tuple[int | None, int]:
        """:math:`(N_k, P_k)` (``N`` None for an E-step without particles)."""
        N = getattr(smoother, "num_particles", None)
        P = getattr(smoother, "num_paths", 100)
        if self.fn is not None:
            out = self.fn(k)
            if isinstance(out, (tuple, list)):
                N, P = out
            else:
                N = out
        elif self.growth is not None:
            if N is not None:
                N = _geometric(N, int(round(N * self.growth[0])), k, self.over)
            P = _geometric(P, int(round(P * self.growth[1])), k, self.over)
        else:
            if self.particles is not None:
                N = _geometric(self.particles[0], self.particles[1], k, num_iterations)
            if self.paths is not None:
                P = _geometric(self.paths[0], self.paths[1], k, num_iterations)
        if N is not None:
            _check_count(N, f"num_particles at iteration {k}")
        _check_count(P, f"num_paths at iteration {k}")
        return N, P


@dataclasses.dataclass(frozen=True)
class SAEM:
    r"""Stochastic-approximation EM's step sizes :math:`\gamma_k\in(0,1]` (module docstring, "Monte Carlo noise").

    ``SAEM(alpha)`` with ``alpha`` in (0.5, 1]: :math:`\gamma_k=1` for the first half of the :math:`K`
    iterations (:math:`k < k_0 = \lfloor K/2\rfloor`), then :math:`\gamma_k = (k - k_0 + 1)^{-\alpha}` (so
    :math:`\sum\gamma_k=\infty`, :math:`\sum\gamma_k^2<\infty`); ``SAEM(fn)`` with a callable ``k -> gamma``.
    """

    alpha: float | Callable = 0.7

    def __post_init__(self):
        a = self.alpha
        if callable(a):
            return
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.5 < a <= 1.0):
            raise ConfigurationError(
                f"SAEM alpha must be a float in (0.5, 1] or a callable k -> gamma; found {a!r}. Use e.g. SAEM(0.7).")
        object.__setattr__(self, "alpha", float(a))

    def gamma(self, k: int, num_iterations: int) -> float:
        """The step size of the M-step that produces :math:`\\theta_{k+1}`."""
        if callable(self.alpha):
            g = float(self.alpha(k))
        else:
            k0 = num_iterations // 2
            g = 1.0 if k < k0 else float((k - k0 + 1) ** (-self.alpha))
        if not (0.0 < g <= 1.0) or g != g:
            raise ConfigurationError(f"SAEM step size at iteration {k} must be in (0, 1]; found {g!r}.")
        return g


@dataclasses.dataclass(frozen=True)
class MCEMState:
    r"""The trainer's part of a Monte Carlo EM fit's state (``FitResult.state.trainer``; the parameters, the
    RNG state, the iteration and the rule's history are in :class:`ppl_rnn.results.FitState`).

    bank: ``((paths, weight), ...)`` SAEM's averaging bank: past E-steps' paths with their weights (empty
        without averaging, where every step size is 1 and the next M-step uses only its own paths)
    mstep: the M-step's saved state (``GradientMStep``: Adam's ``state_dict``; None until its first step, and
        for the closed-form M-step)
    objective: :math:`\hat Q_{k-1}(\theta_k)` of the last M-step (NaN when none was kept)
    acceptance: the acceptance policy's :class:`~ppl_rnn.inference.acceptance.AcceptanceState` (boost, :math:`\omega`)
    """

    bank: tuple = ()
    mstep: dict | None = None
    objective: float = math.nan
    acceptance: AcceptanceState = dataclasses.field(default_factory=AcceptanceState)


def _resized(smoother, num_particles: int | None, num_paths: int):
    """``smoother`` with ``num_particles`` / ``num_paths``: its own ``resized(num_particles=, num_paths=)`` where it
    has one (``ParticleSmoother.resized``); otherwise a shallow copy with those attributes set where it has them
    (e.g. ``KalmanSmoother`` has neither and is used as it is)."""
    fn = getattr(smoother, "resized", None)
    if callable(fn) and "num_paths" in inspect.signature(fn).parameters:
        return fn(num_particles=num_particles, num_paths=num_paths)
    sm = copy.copy(smoother)
    if num_particles is not None and hasattr(sm, "num_particles"):
        sm.num_particles = num_particles
    if hasattr(sm, "num_paths"):
        sm.num_paths = num_paths
    return sm


def _part(value, name: str, kind: type, default, example: str):
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ConfigurationError(f"MonteCarloEM {name} must be None or a {kind.__name__} object such as {example}; "
                                 f"found {value!r}.")
    return value


class MonteCarloEM(InferenceMethod):
    """Monte Carlo EM from parts (module docstring has the maths; each part's docstring its own).

    Args:
        smoother: the E-step method (default ``ParticleSmoother(num_particles=500, num_paths=100,
            backward="mcmc")``: backward Metropolis-Hastings, O(paths) per step; ``backward="simulation"`` (FFBSi,
            O(particles x paths) per step, independent paths) costs more — measured by ``benchmarks/bench_mcem.py``).
        num_iterations: maximum number of EM iterations (M-steps).
        mstep: the M-step (:mod:`~ppl_rnn.inference.msteps`; default ``AutoMStep()``: closed form where the model
            declares ``closed_form_mstep``, else ``GradientMStep()``).
        acceptance: the acceptance policy (:class:`~ppl_rnn.inference.acceptance.Acceptance`; default
            ``Acceptance()``: rejection at 3 standard errors, boost up to 8, no ascent test, plain EM).
        schedule: a :class:`ParticleSchedule` (default: the smoother's sizes every iteration, or, for an M-step
            with a ``particle_growth`` such as the L-BFGS ``GradientMStep``, that growth).
        averaging: ``None`` (plain MCEM), a :class:`SAEM` or a callable ``k -> gamma`` in (0, 1].
        start: where the run begins (:mod:`~ppl_rnn.inference.starts`; default ``FromModel()``).
        stopping: the convergence rule (default ``ConvergenceRule(tol=1e-5, window=5, z=2.0)``;
            ``ConvergenceRule(tol=0)``: never stop early).
        dtype: ``"float64"`` (default: the run in float64 on a float64 copy, written back into the model),
            ``"float32"``, or ``None`` (the model's dtype).
        progress: progress bar over iterations.
    """

    name = "mcem"
    resumable = True

    def __init__(self, *, smoother: InferenceMethod | None = None, num_iterations: int = 50,
                 mstep: MStep | None = None, acceptance: Acceptance | None = None,
                 schedule: ParticleSchedule | None = None, averaging: SAEM | Callable | None = None,
                 start: Start | None = None, stopping: ConvergenceRule | None = None, dtype="float64",
                 progress: bool = False):
        if smoother is None:
            from .particle_smoother import ParticleSmoother

            smoother = ParticleSmoother(num_particles=500, num_paths=100, backward="mcmc")
        if not isinstance(smoother, InferenceMethod):
            raise ConfigurationError(
                f"smoother must be an inference method object such as ParticleSmoother(...); found {smoother!r}.")
        self.smoother = smoother
        self.num_iterations = check_positive_int(num_iterations, "num_iterations")
        self.mstep = _part(mstep, "mstep", MStep, AutoMStep(), "AutoMStep(), ClosedFormMStep() or GradientMStep()")
        self.acceptance = _part(acceptance, "acceptance", Acceptance, Acceptance(), "Acceptance(reject_se=3.0)")
        self.schedule = _part(schedule, "schedule", ParticleSchedule, None, "ParticleSchedule(particles=(100, 1000))")
        if averaging is not None and callable(averaging) and not isinstance(averaging, SAEM):
            averaging = SAEM(averaging)
        self.averaging = _part(averaging, "averaging", SAEM, None, "SAEM(0.7)")
        self.start = _part(start, "start", Start, FromModel(), "LinearStart(), NARStart() or MultiStart()")
        self.stopping = _part(stopping, "stopping", ConvergenceRule, ConvergenceRule(1e-5, 5, 2.0),
                              "ConvergenceRule(tol=1e-5, window=5, z=2.0)")
        if dtype not in _DTYPES:
            raise ConfigurationError(f"dtype must be None, 'float32' or 'float64'; found {dtype!r}.")
        self.dtype = dtype
        self.progress = bool(progress)
        self._sizes(0)  # validate a callable schedule early

    def shortened(self, iterations: int) -> MonteCarloEM:
        """The short run :class:`~ppl_rnn.inference.starts.MultiStart` gives each candidate: the same E-step,
        M-step (without annealing) and acceptance policy, no schedule, no averaging, no start, ``iterations``
        iterations without stopping early, no progress bar."""
        mstep = dataclasses.replace(self.mstep, anneal_noise=None)
        return MonteCarloEM(smoother=self.smoother, num_iterations=iterations, mstep=mstep,
                            acceptance=self.acceptance, stopping=ConvergenceRule(0.0), dtype=self.dtype)

    def _sizes(self, k: int, mstep: MStep | None = None) -> tuple[int | None, int]:
        return self._schedule_for(mstep).sizes(k, self.num_iterations, self.smoother)

    def _schedule_for(self, mstep: MStep | None) -> ParticleSchedule:
        r"""The schedule of a run with the resolved ``mstep``: the one given, or (none given) the M-step's
        ``particle_growth`` (a gradient M-step run to convergence moves the parameters by :math:`\hat Q`'s whole
        Monte Carlo noise, so its E-step grows: ``GradientMStep.particle_growth``), else the smoother's sizes."""
        if self.schedule is not None:
            return self.schedule
        growth = None if mstep is None else getattr(mstep, "particle_growth", None)
        return ParticleSchedule() if growth is None else ParticleSchedule(growth=growth)

    def _gamma(self, k: int) -> float:
        """SAEM step size for the M-step that produces :math:`\\theta_{k+1}` (1 = plain MCEM)."""
        return 1.0 if self.averaging is None else self.averaging.gamma(k, self.num_iterations)

    # ------------------------------------------------------------------------------------------
    def _estep(self, model, data, N, P):
        sm = _resized(self.smoother, N, P)
        with torch.no_grad():
            post = sm.infer_prepared(model, data, None)
            paths = post.diagnostics.get("paths") if isinstance(post.diagnostics, Mapping) else None
            if paths is None:
                paths = post.sample(P)
        le = float(post.log_evidence.detach().sum())
        return post, paths.detach().to(model.dtype), le

    def _evidence_se(self, model, data, post, N) -> float:
        r"""Monte Carlo standard error of the E-step's log-evidence estimate
        (:mod:`~ppl_rnn.inference.acceptance`, "Standard error"): from the E-step filter's own genealogy where its
        posterior carries the filter's record with ancestors (summed over the independent sequences); otherwise
        the acceptance policy's ``se_runs`` independent particle filters with :math:`N/R` particles each, run as
        one batched filter on ``R`` copies of the data; :math:`\widehat{SE}_N = \mathrm{sd}_R\sqrt{(N/R)/N}`."""
        if post.evidence_kind == "exact" or N is None:
            return 0.0
        rec = post.diagnostics.get("record") if isinstance(post.diagnostics, Mapping) else None
        if getattr(rec, "ancestors", None) is not None and getattr(rec, "log_weights", None) is not None:
            from .evidence_se import genealogy_log_evidence_var

            return float(genealogy_log_evidence_var(rec).sum().sqrt())
        R = self.acceptance.se_runs
        if R < 2:
            return 0.0
        from .smc import ParticleFilter

        sm = self.smoother
        n = max(N // R, 8)
        opts = {k: getattr(sm, k) for k in ("proposal", "resampling", "ess_threshold", "dtype") if hasattr(sm, k)}
        rep = Data(data.observations.repeat(R, 1, 1), data.mask.repeat(R, 1, 1),
                   None if data.inputs is None else data.inputs.repeat(R, 1, 1))
        le = ParticleFilter(n, **opts).infer_prepared(model, rep, None).log_evidence.detach()
        le = le.to(torch.float64).reshape(R, -1).sum(1)
        return float(le.std()) * math.sqrt(n / N)

    def _fit(self, model, data, seed, resume=None):
        dtype = _DTYPES[self.dtype]
        work, wdata = model, data
        if dtype is not None and dtype != model.dtype:
            work = model.copy().to(dtype)
            wdata = Data(data.observations.to(dtype), data.mask, None if data.inputs is None else data.inputs.to(dtype))
        if resume is not None:  # continue the earlier fit: the start is not re-run
            if not isinstance(resume.state.trainer, MCEMState):
                raise ConfigurationError(
                    f"resume: the earlier fit's state has no MonteCarloEM part (found "
                    f"{type(resume.state.trainer).__name__}); resume a fit made by MonteCarloEM.")
            load_resumed_parameters(work, resume, self.name)
            info = {k: v for k, v in resume.diagnostics.items() if k not in ("num_iterations", "stopped")}
        else:
            info = dict(self.start.apply(work, wdata, seed, self))
        res = self._run(work, wdata, seed, info, resume)
        if work is not model:
            model.load_state_dict(work.state_dict())
            res = dataclasses.replace(res, model=model)
        return res

    def _run(self, model, data, seed, info, resume=None):
        mstep = self.mstep.resolve(model)
        saved = None if resume is None else resume.state.trainer
        acc = self.acceptance.start(None if saved is None else saved.acceptance)
        mstate = mstep.start(None if saved is None else saved.mstep)
        bank = [] if saved is None else list(saved.bank)
        obj = [math.nan if saved is None else saved.objective]  # Q-hat of the M-step that produced theta_k

        def evaluate(k):
            N, P = self._sizes(k, mstep)
            if acc.boost > 1:
                N = None if N is None else N * acc.boost
                P = P * acc.boost
            post, paths, le = self._estep(model, data, N, P)
            se = self._evidence_se(model, data, post, N) if math.isfinite(le) else math.nan
            gamma = self._gamma(k)  # of the M-step from these paths (recorded on the last row too: resumable)
            scalars = {"log_evidence": le, "objective": obj[0], "num_particles": -1 if N is None else N,
                       "num_paths": P, "gamma": gamma, **acc.scalars()}
            return EMStep(value=le, se=se, state=(post, paths), scalars=scalars, strict=acc.strict(post.evidence_kind))

        def update(k, step):
            before = model.copy() if self.acceptance.ascent_z is not None else None
            paths, gamma = step.state[1], step.scalars["gamma"]
            bank[:] = [(p, w * (1 - gamma)) for p, w in bank if w * (1 - gamma) >= 1e-3] + [(paths, gamma)]
            tot = sum(w for _, w in bank)
            allp = torch.cat([p for p, _ in bank], 0)
            wts = torch.cat([torch.full((p.shape[0],), w / tot / p.shape[0], dtype=allp.dtype) for p, w in bank])
            old = acc.before_mstep(model)
            obj[0] = mstep(model, allp, wts, data, mstate)
            if acc.stretch(model, old):
                with torch.no_grad():  # the objective at the stretched parameters
                    obj[0] = float(q_hat(model, allp, wts, data))
            mstep.anneal(model, k)
            if before is None:
                return None
            N, P = self._sizes(k, mstep)  # the ascent test's fresh paths at theta_k
            N = None if N is None else N * acc.boost
            _, fresh, _ = self._estep(before, data, N, P * acc.boost)
            kept, scalars = acc.ascent(model, before, fresh, data)
            if not kept:
                obj[0] = math.nan  # no M-step kept: the refused step's Q-hat is not theta_k's
            return scalars

        loop = EMLoop(method=self.name, evidence_kind="estimate", num_iterations=self.num_iterations,
                      rule=self.stopping, n_obs=max(data.num_observed, 1), reject_se=self.acceptance.reject_se,
                      progress=self.progress, desc="MonteCarloEM")
        keep_bank = self.averaging is not None
        return loop.run(model, evaluate=evaluate, update=update, seed=seed, on_reject=lambda k: acc.refuse(),
                        posterior=lambda step: step.state[0], attrs={"mstep": mstep.kind},
                        diagnostics={"mstep": mstep.kind, **info}, resume=resume,
                        snapshot=lambda: MCEMState(bank=tuple(bank) if keep_bank else (), mstep=mstep.freeze(mstate),
                                                   objective=obj[0], acceptance=acc.freeze()),
                        data_shape=tuple(data.observations.shape))


__all__ = ["MonteCarloEM", "MCEMState", "ParticleSchedule", "SAEM"]
