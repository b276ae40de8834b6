r"""Monte Carlo EM with a particle-smoother E-step (Unkelbach, Yi & Schmidhuber 2009).

EM maximises the log-evidence :math:`\log p_\theta(y)` by iterating

.. math::
    Q(\theta\mid\theta_k) = E_{p_{\theta_k}(h\mid y)}\big[\log p_\theta(h, y)\big], \qquad
    \theta_{k+1} = \arg\max_\theta Q(\theta\mid\theta_k).

For a nonlinear model the smoothing distribution is intractable; the **E-step** draws :math:`S` trajectories
:math:`h^{(s)}\sim p_{\theta_k}(h\mid y)` with a smoother (default: the particle smoother, forward particle
filter plus backward simulation; any method whose posterior has ``diagnostics["paths"]`` or a ``sample``
works, e.g. ``KalmanSmoother`` on a linear model) and replaces :math:`Q` by the Monte Carlo estimate

.. math:: \hat Q_k(\theta) = \sum_s w_s \log p_\theta(h^{(s)}, y_{obs})

scored with the model's own conditionals. The **M-step**:

* ``mstep="closed_form"`` (``"auto"`` picks it when the model has the ``closed_form_mstep`` capability, e.g.
  :class:`~ppl_rnn.models.ElmanSSM`): the model maximises :math:`\hat Q` block by block — output map and
  noise variances by weighted least squares, recurrent weights by least squares (identity) or
  ``gradient_steps`` Levenberg-Marquardt steps (``tanh``; generalised EM), process noise in closed form given
  the weights. See :meth:`ppl_rnn.models.ElmanSSM.closed_form_mstep`.
* ``mstep="gradient"`` (any :class:`~ppl_rnn.StateSpaceModel`): ``gradient_steps`` Adam steps (learning rate
  ``lr``, optimiser state kept across iterations) on :math:`-\hat Q/n_{obs}` computed by
  :func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`.

**Monte Carlo noise.** :math:`\hat Q` is noisy, so the exact EM ascent property holds only up to Monte Carlo
error. ``particle_schedule`` grows the number of particles (and paths) geometrically across iterations so the
noise shrinks as EM converges; ``saem`` switches on stochastic-approximation EM (Delyon, Lavielle &
Moulines 1999): :math:`\tilde Q_k = (1-\gamma_k)\tilde Q_{k-1} + \gamma_k\hat Q_k`, implemented by keeping the
paths of past iterations with geometrically decaying weights (a bank pruned below weight ``1e-3``), which
for the exponential-family blocks is exactly the averaging of sufficient statistics.

**The loop** is :class:`~ppl_rnn.inference.em_common.EMLoop`, shared with every EM-style trainer.

**Standard error.** Each log-evidence estimate :math:`\hat\ell_k` gets a Monte Carlo standard error
:math:`s_k`. With a particle smoother it comes from the E-step filter's own genealogy at no extra filtering
(the Lee & Whiteley 2018 estimator over blocks of resampling events, :mod:`~ppl_rnn.inference.evidence_se`;
it runs low against the spread of independent filters, less so with multinomial resampling:
``tests/inference/test_evidence_se.py``). For an E-step without a genealogy it comes from ``se_runs``
(:math:`R`, default 4) *independent* particle filters with :math:`N/R` particles each (the smoother's
proposal, resampling and dtype), run as one batched filter on :math:`R` copies of the
data (about the cost of one filter pass without history): with :math:`\mathrm{sd}_R` the standard deviation
of their :math:`R` estimates, :math:`s_k = \mathrm{sd}_R\sqrt{(N/R)/N} = \mathrm{sd}_R/\sqrt R`, since the
variance of :math:`\log\hat Z` falls like :math:`1/N`; it runs low (Jensen bias of the smaller filters),
which the 3-SE rejection threshold absorbs (both estimators are measured in ``benchmarks/README.md``,
"Monte Carlo EM's options, measured"). An exact E-step (``KalmanSmoother``) has :math:`s_k = 0`.

**Rejection.** An iteration whose estimate falls by more than ``reject_se`` (3) standard errors of the
difference, :math:`\hat\ell_{k+1} < \hat\ell_k - 3\sqrt{s_k^2+s_{k+1}^2}`, or whose E-step degenerates, is
rejected: the parameters stay at :math:`\theta_k`, the particles and paths double (up to ``max_boost`` = 8x)
and :math:`\theta_k` is smoothed again (trace rows carry ``rejected`` and ``log_evidence_se``).

**Ascent test** (``ascent_z=z``; off by default). Near an optimum the M-step fits the Monte Carlo noise of
:math:`\hat Q`: with a near-noise-free model the recurrent weights are a regression on nearly collinear
states, and the noise move outweighs the true one (measured on breathing: ``benchmarks/README.md``,
``real_tables.py`` section, "The ascent test"). Following Caffo, Jank & Jones (2005, ascent-based MCEM),
the test draws fresh paths :math:`x^{(s)}` at :math:`\theta_k` and estimates
:math:`\Delta Q=Q(\theta'\mid\theta_k)-Q(\theta_k\mid\theta_k)`
by :math:`\bar d` with :math:`d_s=\log p_{\theta'}(x^{(s)},y)-\log p_{\theta_k}(x^{(s)},y)` (fresh paths, so the
M-step's in-sample optimism does not enter); since :math:`\ell(\theta')-\ell(\theta_k)\ge\Delta Q`, a
significantly positive :math:`\bar d` is a likelihood ascent. The step is kept if
:math:`\bar d - z\,\mathrm{sd}(d)/\sqrt S > 0` (the :math:`S` fresh paths treated as independent; they share
one forward filter, so this SE runs low); otherwise
:math:`\theta_k` stays and the particles and paths double (up to ``max_boost``), so the sample grows where
the steps stop being distinguishable from noise. Costs one more E-step per iteration. Trace rows get
``ascent_dq``, ``ascent_se``, ``ascent_kept``.

**Convergence** (the one rule of :mod:`~ppl_rnn.inference.em_common`): stop when the upper ``z`` (2)
standard-error bound of the change per iteration between windows of ``window`` (5) iterations is at most
``tol * max(|l|, n_obs)``. With noisy estimates the bound stays large, so a run that is still improving is
not stopped (why the default ``tol`` is ``1e-5``: ``benchmarks/README.md``,
"Monte Carlo EM's options, measured").

**Linear warm start** (``init="linear"``): exact :class:`~ppl_rnn.inference.kalman_em.KalmanEM` (float64,
``init_iterations``) on the model's ``linear_special_case()`` (a declared capability: a linear-Gaussian
model of the same sizes), begun at least-squares AR fits in companion form (``init_linear="ar"``, the
default: :func:`~ppl_rnn.inference.reference.ar_start`; ``"model"``: at the model's own parameters), then
the model's ``embed_linear(params, gain=init_gain)`` sets it to behave like that linear fit in its
activation's linear regime (states scaled by the gain, 0.01 by default, where :math:`\tanh x\approx x`
within 0.3 % for :math:`|x|\lesssim 0.1` of the scaled state; the output map scaled by its inverse). A
companion-form start passes each lag through the activation once per step, so the distortion compounds over
the lags, hence the small default gain. With a nearly noise-free model MCEM from this start may not improve
on it: the E-step's Monte Carlo error moves the recurrent weights more than the signal's nonlinearity pays
for; the nonlinear warm start (below) finds that nonlinearity by least squares instead.
The warm start is right for nearly linear signals (breathing); for strongly nonlinear ones (the laser)
MCEM from it stays in the linear basin: start from the model instead (there a rotation-type start,
``ElmanSSM(..., weight_init="rotation")``, forecast better than a Gaussian one, and
``ppl_rnn.select_by_forecast`` picks among seeds by the training tail). Measured in ``benchmarks/README.md``,
"Monte Carlo EM's options, measured". The embedded start is ``diagnostics["initial_model"]``;
``diagnostics["init_exact_log_evidence"]`` is KalmanEM's exact value.

**Nonlinear warm start** (``init="nar"``): a least-squares autoregression on random ``tanh`` features of the
lags (:mod:`~ppl_rnn.inference.nar_start`: order ``init_order``, by default the AIC order of a linear AR on
the training data; :math:`M = H - pD` features; the feature map drawn from the fit's seed), embedded through
the model's ``embed_nar`` capability (:meth:`ppl_rnn.models.ElmanSSM.embed_nar`: the lags ride in the
activation's linear regime at ``init_gain``, the features are tanh units, and the network behaves exactly as
the autoregression). It serves smooth signals whose nonlinearity shows over several steps, which MCEM does
not find from the linear regime (measured on breathing: ``benchmarks/README.md``,
"Monte Carlo EM's options, measured").

**dtype** (default ``"float64"``): the run works on a float64 copy and writes the result back into the
model in its own dtype (chosen by measurement: ``benchmarks/README.md``,
"Monte Carlo EM's options, measured").

**Trace** (``FitResult.trace``, dim ``iteration``; row ``k`` = parameters :math:`\theta_k`, row 0 = the initial
model): ``log_evidence`` (estimate at :math:`\theta_k`), ``objective`` (:math:`\hat Q_{k-1}(\theta_k)`, NaN at
``k=0`` and where the ascent test refused the step), ``num_particles``, ``num_paths``, ``gamma`` (SAEM's step size
for the M-step from row ``k``'s paths), ``wall_time_s`` (cumulative) and every parameter.
``K`` iterations cost ``K`` M-steps and ``K+1`` E-steps (the last gives ``FitResult.posterior`` at the fitted
parameters).

**Resuming** (``pr.fit(model, y, method=MonteCarloEM(...), resume=earlier_fit)``): the fit's state is a
frozen record, :class:`ppl_rnn.results.FitState` (parameters, RNG state, iteration, the convergence rule's
history) with the trainer's part :class:`MCEMState` (SAEM's bank, the particle boost, :math:`\omega` and its
grow flag, Adam's moments); the resumed run continues it to ``num_iterations`` exactly as an uninterrupted run
(:mod:`~ppl_rnn.inference.em_common`, "Resuming"); the warm start and the restarts are not re-run. Schedules
that depend on ``num_iterations`` (a geometric ``particle_schedule``, ``saem=alpha``) go on under the resumed
method's length, so there the continuation is not the uninterrupted run of that length.

**Initialisation matters more than restarts.** EM climbs to the local maximum of the basin it starts in. For
a tanh network on oscillating data, Gaussian random weights tend to end in a "linear-regime" optimum (small
hidden amplitudes, one mode wasted on fast or decaying dynamics); starting from
``ElmanSSM(..., weight_init="rotation")`` (a random rotation near the identity times a gain slightly above 1:
slow oscillatory modes) EM tunes the modes' frequencies instead. From a Gaussian start,
``num_restarts=8, restart_kind="rotation"`` reaches that basin (measured: ``benchmarks/README.md``,
"Monte Carlo EM's options, measured").

**Random restarts** (``num_restarts=k > 1``). EM only climbs to a local maximum of :math:`\log p_\theta(y)`;
for a recurrent network the surface has many (e.g. a network that has learnt one of two oscillations of the
data). Multi-start EM: candidate 0 is the given model, candidates :math:`1..k-1` redraw its recurrent weights
(``W`` and ``U``: Gaussian entries with the same root-mean-square as the given ones; ``b`` keeps its value
plus :math:`N(0, 0.1^2)`; ``restart_kind="perturb"``, the model's ``perturb``) or, with ``restart_kind="rotation"``,
replace ``W`` by a random rotation near the identity times 1.1 (the model's ``rotation_restart``: slow
oscillatory modes in the saturating regime, the basin a Gaussian start misses on oscillating data), with
generators seeded from ``seed`` and the candidate index. Each candidate gets
``restart_iterations`` plain MCEM iterations with the smoother's own sizes; the one with the largest
training log-evidence estimate (the mean of its last two E-step estimates) is kept and the full run continues
from it. ``FitResult.diagnostics`` gets ``restart_log_evidence`` (the k scores), ``restart_chosen`` (the
index), ``restart_models`` (the k candidates' fitted models, None where one diverged; the continued run
begins at ``restart_models[restart_chosen]``) and ``restart_wall_time_s``; the trace is the continued run's.

**Over-relaxation** (``overrelax=``:math:`\omega`, default 1: plain EM). Near a maximum EM is a linear
iteration, :math:`\theta_{k+1}-\theta^*\approx J(\theta_k-\theta^*)`, whose rate along an eigendirection of
:math:`J` is its eigenvalue :math:`\lambda\in[0,1)`, the fraction of missing information in that direction
(Dempster, Laird & Rubin 1977); in a nearly deterministic direction (here the hidden amplitude of a saturating
network, which the smoothed paths pin down only weakly) :math:`\lambda` is close to 1 and EM crawls. The
over-relaxed step :math:`\theta_{k+1}=\theta_k+\omega\,(M(\theta_k)-\theta_k)` (Lange 1995; Salakhutdinov &
Roweis 2003), taken in the model's unconstrained parametrisation (every ``named_parameters()`` entry that
requires a gradient; positive parameters such as noise scales are stored in log space, so they stay positive),
has rate :math:`1-\omega(1-\lambda)`: slow directions speed up by the factor :math:`\omega`, and every direction
still contracts for :math:`0<\omega<2`. The stretched step can overshoot where the surface is not quadratic
(far from a maximum); a stretched step that the rejection rule (or the ascent test) refuses is therefore retried
from :math:`\theta_k` as a plain EM step with the *same* particles (the stretch, not the Monte Carlo sample, is
the suspect), and :math:`\omega` then grows back by the factor 1.1 per accepted step up to ``overrelax``
(the adaptive scheme of Salakhutdinov & Roweis 2003); only a refused plain step raises the particles. The
trace's ``overrelax`` row is the :math:`\omega` that produced each row's parameters (only when ``overrelax``
is not 1), its ``objective`` :math:`\hat Q` at the stretched parameters. Measured (breathing, the synthetic
benchmark, the laser, a near-noise-free series) in ``benchmarks/README.md``, "Monte Carlo EM's options, measured".
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Mapping

import torch

from ppl_rnn.capabilities import capability, require
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError, DivergenceError
from ppl_rnn.method import InferenceMethod, check_choice, check_positive_float, check_positive_int

from .em_common import ConvergenceRule, EMLoop, EMStep, load_resumed_parameters

MSTEPS = ("auto", "closed_form", "gradient")
INITS = ("model", "linear", "nar")
LINEAR_INITS = ("ar", "model")
RESTART_KINDS = ("perturb", "rotation")
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


@dataclasses.dataclass(frozen=True)
class MCEMState:
    r"""The trainer's part of a Monte Carlo EM fit's state (``FitResult.state.trainer``; the parameters, the
    RNG state, the iteration and the rule's history are in :class:`ppl_rnn.results.FitState`).

    bank: ``((paths, weight), ...)`` SAEM's averaging bank: past E-steps' paths with their weights (empty
        without ``saem``, where every step size is 1 and the next M-step uses only its own paths)
    optimizer: the gradient M-step's Adam ``state_dict`` (None until the first gradient M-step)
    objective: :math:`\hat Q_{k-1}(\theta_k)` of the last M-step (NaN when none was kept)
    boost: the factor on the particles and paths that rejections have raised (1, 2, 4, ... ``max_boost``)
    omega: :math:`\omega` of the next over-relaxed M-step; grow: whether it grows first (not right after a
        fallback to plain EM)
    omega_of, prev_omega_of: the :math:`\omega` that produced the current / the previous parameters
    """

    bank: tuple = ()
    optimizer: dict | None = None
    objective: float = math.nan
    boost: int = 1
    omega: float = 1.0
    grow: bool = False
    omega_of: float = math.nan
    prev_omega_of: float = math.nan


class _Progress:
    """The mutable working copy of :class:`MCEMState` during a run (one object shared by the E-step, the
    M-step and the acceptance rules of :meth:`MonteCarloEM._run`)."""

    def __init__(self, state: MCEMState):
        self.bank = list(state.bank)
        self.opt = None
        self.opt_state = state.optimizer  # loaded into the optimiser when the gradient M-step creates it
        self.obj, self.boost, self.omega, self.grow = state.objective, state.boost, state.omega, state.grow
        self.omega_of, self.prev_omega_of = state.omega_of, state.prev_omega_of

    def freeze(self, keep_bank: bool = True) -> MCEMState:
        """The frozen state; ``keep_bank=False`` (plain MCEM, every step size 1: the next M-step drops the
        bank) leaves the paths out of it."""
        opt = self.opt_state if self.opt is None else copy.deepcopy(self.opt.state_dict())
        return MCEMState(bank=tuple(self.bank) if keep_bank else (), optimizer=opt, objective=self.obj, boost=self.boost,
                         omega=self.omega, grow=self.grow, omega_of=self.omega_of, prev_omega_of=self.prev_omega_of)

    def fall_back(self) -> bool:
        """After a rejected or refused step: if it was stretched (omega > 1), the next M-step is plain EM
        (omega = 1, growing again by ``_OMEGA_GROWTH`` per accepted step) and True (no particle boost)."""
        stretched = self.omega_of > 1.0
        self.omega_of = self.prev_omega_of  # the parameters are back at theta_k
        if stretched:
            self.omega, self.grow = 1.0, False
        return stretched


def _resized(smoother, num_particles: int | None, num_paths: int):
    """``smoother`` with ``num_particles`` / ``num_paths``: its own ``resized(num_particles=, num_paths=)`` where
    it has one (``ParticleSmoother.resized``: a copy whose forward filter is ``filter.resized(N)``); otherwise a
    shallow copy with those attributes set (and on any nested method that has ``num_particles``)."""
    fn = getattr(smoother, "resized", None)
    if callable(fn) and "num_paths" in inspect.signature(fn).parameters:
        return fn(num_particles=num_particles, num_paths=num_paths)
    sm = copy.copy(smoother)
    if num_particles is not None and hasattr(sm, "num_particles"):
        sm.num_particles = num_particles
        for k, v in list(vars(sm).items()):
            if isinstance(v, InferenceMethod) and hasattr(v, "num_particles"):
                v2 = copy.copy(v)
                v2.num_particles = num_particles
                setattr(sm, k, v2)
    if hasattr(sm, "num_paths"):
        sm.num_paths = num_paths
    return sm


class MonteCarloEM(InferenceMethod):
    """Monte Carlo EM (module docstring has the maths).

    Args:
        smoother: the E-step method (default ``ParticleSmoother(num_particles=500, num_paths=100,
            backward="mcmc")``: backward Metropolis-Hastings, O(paths) per step; ``backward="simulation"`` (FFBSi,
            O(particles x paths) per step, independent paths) costs more — the cost of an iteration against a
            particle-filter pass is measured by ``benchmarks/bench_mcem.py``).
        num_iterations: maximum number of EM iterations (M-steps).
        particle_schedule: ``None`` (the smoother's sizes every iteration); ``(start, end)`` ints: number of
            particles growing geometrically from ``start`` to ``end`` over the iterations (paths: the
            smoother's ``num_paths``); ``((N0, P0), (N1, P1))``: particles and paths both growing; or a
            callable ``k -> N`` or ``k -> (N, P)``.
        tol: relative tolerance of the convergence rule (module docstring, "Convergence"; ``0``: never stop
            early). The default stops only once the estimates *show* (``z`` standard errors) that the
            log-evidence rises by less than about ``1e-5`` per observed entry per iteration.
        window: iterations averaged by the convergence rule.
        z: standard errors in the rule's upper confidence bound.
        init: ``"model"`` (start from the model as given), ``"linear"`` (the linear warm start: exact
            KalmanEM on the model's linear special case, embedded in its activation's linear regime; module
            docstring) or ``"nar"`` (the nonlinear warm start: a least-squares autoregression on random tanh
            features of the lags, embedded through the model's ``embed_nar``; module docstring).
        init_iterations: KalmanEM iterations of ``init="linear"``.
        init_linear: where that KalmanEM begins: ``"ar"`` (least-squares AR fits in companion form,
            ``KalmanEM(init="ar")``) or ``"model"`` (the model's own parameters).
        init_gain: the state scale of the embedding (``embed_linear`` / ``embed_nar(params, gain=init_gain)``).
        init_order: lags :math:`p` of ``init="nar"`` (None: AIC on the training data, ``LinearAR(order="aic")``);
            the features are the remaining units, :math:`M = H - pD`.
        init_ridge: ridge penalty per regression row of ``init="nar"`` (:mod:`~ppl_rnn.inference.nar_start`).
        init_feature_scale: the standard deviation of each random feature's pre-activation (``init="nar"``).
        reject_se: reject an iteration whose log-evidence estimate falls by more than this many standard
            errors (parameters kept, particles and paths doubled; ``None``: never reject).
        max_boost: the largest factor by which rejections may multiply the particles and paths.
        se_runs: independent filters (of ``N / se_runs`` particles each) that estimate the standard error of
            each log-evidence estimate where the E-step's posterior has no filter genealogy (a particle
            smoother's has: its standard error costs no extra filter); ``0``: no standard error, no rejection,
            the rule as for exact values.
        dtype: ``"float64"`` (default: the run in float64 on a float64 copy, written back into the model),
            ``"float32"``, or ``None`` (the model's dtype).
        saem: ``None`` (plain MCEM), a float ``alpha`` in (0.5, 1] (step sizes 1 for the first half of the
            iterations, then :math:`\\gamma_k = (k - k_0 + 1)^{-\\alpha}`), or a callable ``k -> gamma`` in (0, 1].
        mstep: ``"auto"`` | ``"closed_form"`` | ``"gradient"``.
        gradient_steps: Adam steps (``"gradient"``) or Levenberg-Marquardt steps for nonlinear recurrent
            weights (``"closed_form"``) per M-step.
        lr: Adam learning rate (``"gradient"``).
        learn_initial: also fit the initial-state parameters (closed-form M-step).
        overrelax: :math:`\\omega` of the over-relaxed M-step (module docstring, "Over-relaxation"):
            :math:`\\theta_{k+1}=\\theta_k+\\omega\\,(M(\\theta_k)-\\theta_k)` in the unconstrained parametrisation;
            ``1`` is plain EM, values in (1, 2) speed up EM's slow directions; a refused stretched step falls
            back to plain EM, and :math:`\\omega` grows back by 1.1 per accepted step.
        anneal_noise: ``None`` or ``(factor, iterations)``: noise annealing (deterministic-annealing EM): after
            each of the first ``iterations`` M-steps the estimated process noise ``q`` is multiplied by a factor
            decaying linearly from ``factor`` to 1, which smooths the likelihood surface early on.
        num_restarts: number of candidate initialisations (1: none; see the module docstring, "Random
            restarts").
        restart_iterations: MCEM iterations given to each candidate before the best one is kept.
        restart_kind: how candidates ``1..k-1`` are drawn: ``"perturb"`` (the model's ``perturb``: recurrent
            weights redrawn at their current size) or ``"rotation"`` (the model's ``rotation_restart``: a random
            rotation near the identity times 1.1, slow oscillatory modes; module docstring).
        ascent_z: ``None`` (off) or :math:`z`: the ascent test (module docstring, "Ascent test"): an M-step is
            kept only if :math:`\\Delta\\hat Q - z\\,\\widehat{SE} > 0` on fresh paths at the current parameters;
            otherwise the parameters stay and the particles and paths double (up to ``max_boost``).
        progress: progress bar over iterations.
    """

    name = "mcem"
    resumable = True

    def __init__(self, *, smoother: InferenceMethod | None = None, num_iterations: int = 50,
                 particle_schedule=None, tol: float = 1e-5, window: int = 5, z: float = 2.0, saem=None,
                 mstep: str = "auto", gradient_steps: int = 10, lr: float = 0.01, learn_initial: bool = True,
                 init: str = "model", init_iterations: int = 200, init_gain: float = 0.01,
                 init_linear: str = "ar", init_order: int | None = None, init_ridge: float = 1e-7,
                 init_feature_scale: float = 1.0,
                 reject_se: float | None = 3.0, max_boost: int = 8, se_runs: int = 4, dtype="float64",
                 num_restarts: int = 1, restart_iterations: int = 10, restart_kind: str = "perturb",
                 anneal_noise=None, ascent_z: float | None = None, overrelax: float = 1.0,
                 progress: bool = False):
        if smoother is None:
            from .particle_smoother import ParticleSmoother

            smoother = ParticleSmoother(num_particles=500, num_paths=100, backward="mcmc")
        if not isinstance(smoother, InferenceMethod):
            raise ConfigurationError(
                f"smoother must be an inference method object such as ParticleSmoother(...); found {smoother!r}.")
        self.smoother = smoother
        self.num_iterations = check_positive_int(num_iterations, "num_iterations")
        self.tol = check_positive_float(tol, "tol", allow_zero=True)
        self.window = check_positive_int(window, "window")
        self.z = check_positive_float(z, "z", allow_zero=True)
        self.init = check_choice(init, "init", INITS)
        self.init_iterations = check_positive_int(init_iterations, "init_iterations")
        self.init_gain = check_positive_float(init_gain, "init_gain")
        self.init_linear = check_choice(init_linear, "init_linear", LINEAR_INITS)
        self.init_order = None if init_order is None else check_positive_int(init_order, "init_order")
        self.init_ridge = check_positive_float(init_ridge, "init_ridge", allow_zero=True)
        self.init_feature_scale = check_positive_float(init_feature_scale, "init_feature_scale")
        self.reject_se = None if reject_se is None else check_positive_float(reject_se, "reject_se")
        self.max_boost = check_positive_int(max_boost, "max_boost")
        self.se_runs = check_positive_int(se_runs, "se_runs", minimum=0)
        if dtype not in _DTYPES:
            raise ConfigurationError(f"dtype must be None, 'float32' or 'float64'; found {dtype!r}.")
        self.dtype = dtype
        self.mstep = check_choice(mstep, "mstep", MSTEPS)
        self.gradient_steps = check_positive_int(gradient_steps, "gradient_steps", minimum=0)
        self.lr = check_positive_float(lr, "lr")
        self.learn_initial = bool(learn_initial)
        self.num_restarts = check_positive_int(num_restarts, "num_restarts")
        self.restart_iterations = check_positive_int(restart_iterations, "restart_iterations")
        self.restart_kind = check_choice(restart_kind, "restart_kind", RESTART_KINDS)
        if anneal_noise is not None:
            ok = (isinstance(anneal_noise, (tuple, list)) and len(anneal_noise) == 2
                  and isinstance(anneal_noise[0], (int, float)) and anneal_noise[0] >= 1
                  and isinstance(anneal_noise[1], int) and not isinstance(anneal_noise[1], bool) and anneal_noise[1] >= 1)
            if not ok:
                raise ConfigurationError(
                    f"anneal_noise must be None or (factor >= 1, iterations >= 1); found {anneal_noise!r}. "
                    "Use e.g. (3.0, 20).")
            anneal_noise = (float(anneal_noise[0]), int(anneal_noise[1]))
        self.anneal_noise = anneal_noise
        if isinstance(overrelax, bool) or not isinstance(overrelax, (int, float)) or not (0 < overrelax < 2):
            raise ConfigurationError(
                f"overrelax must be a real number in (0, 2) (1: plain EM; 2 and above make exact EM diverge along "
                f"its fast directions); found {overrelax!r}. Use e.g. 1.8.")
        self.overrelax = float(overrelax)
        self.ascent_z = None if ascent_z is None else check_positive_float(ascent_z, "ascent_z", allow_zero=True)
        self.progress = bool(progress)
        self.particle_schedule = self._check_schedule(particle_schedule)
        if saem is not None and not callable(saem):
            if isinstance(saem, bool) or not isinstance(saem, (int, float)) or not (0.5 < saem <= 1.0):
                raise ConfigurationError(
                    f"saem must be None, a float alpha in (0.5, 1] or a callable k -> gamma; found {saem!r}.")
            saem = float(saem)
        self.saem = saem
        self._sizes(0)  # validate a callable schedule early

    @staticmethod
    def _check_schedule(s):
        if s is None or callable(s):
            return s
        if isinstance(s, (tuple, list)) and len(s) == 2:
            if all(isinstance(x, (tuple, list)) and len(x) == 2 for x in s):
                for x in s:
                    _check_count(x[0], "particle_schedule num_particles")
                    _check_count(x[1], "particle_schedule num_paths")
                return (tuple(s[0]), tuple(s[1]))
            _check_count(s[0], "particle_schedule start")
            _check_count(s[1], "particle_schedule end")
            return tuple(s)
        raise ConfigurationError(
            f"particle_schedule must be None, (start, end), ((N0, P0), (N1, P1)) or a callable; found {s!r}.")

    def _sizes(self, k: int) -> tuple[int | None, int]:
        sm = self.smoother
        N = getattr(sm, "num_particles", None)
        P = getattr(sm, "num_paths", 100)
        s, n = self.particle_schedule, self.num_iterations
        if s is None:
            pass
        elif callable(s):
            out = s(k)
            if isinstance(out, (tuple, list)):
                N, P = out
            else:
                N = out
        elif isinstance(s[0], tuple):
            N = _geometric(s[0][0], s[1][0], k, n)
            P = _geometric(s[0][1], s[1][1], k, n)
        else:
            N = _geometric(s[0], s[1], k, n)
        if N is not None:
            _check_count(N, f"num_particles at iteration {k}")
        _check_count(P, f"num_paths at iteration {k}")
        return N, P

    def _gamma(self, k: int) -> float:
        """SAEM step size for the M-step that produces :math:`\\theta_{k+1}` (1 = plain MCEM)."""
        if self.saem is None:
            return 1.0
        if callable(self.saem):
            g = float(self.saem(k))
        else:
            k0 = self.num_iterations // 2
            g = 1.0 if k < k0 else float((k - k0 + 1) ** (-self.saem))
        if not (0.0 < g <= 1.0) or g != g:
            raise ConfigurationError(f"saem step size at iteration {k} must be in (0, 1]; found {g!r}.")
        return g

    def _resolve_mstep(self, model) -> str:
        has = capability(model, "closed_form_mstep") is not None
        if self.mstep == "closed_form":
            require(model, "closed_form_mstep", needed_by="MonteCarloEM(mstep='closed_form')",
                    alternative="use mstep='gradient' (or 'auto') for this model")
        if self.mstep == "auto":
            return "closed_form" if has else "gradient"
        return self.mstep

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

    def _candidate(self, model, base: int, r: int):
        """Candidate ``r`` of the restarts: the given model (``r=0``) or its recurrent weights redrawn
        (``restart_kind``: the model's ``perturb(1, g)`` or ``rotation_restart(g)``)."""
        cand = model.copy()
        if r == 0:
            return cand
        g = torch.Generator().manual_seed((base * 1_000_003 + 7919 * r) % (2**63 - 1))
        if self.restart_kind == "rotation":
            require(cand, "rotation_restart", needed_by="MonteCarloEM(restart_kind='rotation')",
                    alternative="use restart_kind='perturb' or num_restarts=1")(g)
        else:
            require(cand, "perturb", needed_by="MonteCarloEM(num_restarts > 1)",
                    alternative="use num_restarts=1")(1.0, g)
        return cand

    def _restarts(self, model, data, seed):
        """Multi-start: short MCEM runs from ``num_restarts`` candidates; returns the best fitted one."""
        t0 = time.perf_counter()
        if seed is None:
            base = int(torch.randint(0, 2**31 - 1, ()).item())
        else:
            base = int(seed)
        short = copy.copy(self)
        short.num_restarts, short.num_iterations, short.tol, short.init = 1, self.restart_iterations, 0.0, "model"
        short.particle_schedule, short.saem, short.progress, short.anneal_noise = None, None, False, None
        scores, fits = [], []
        for r in range(self.num_restarts):
            cand = self._candidate(model, base, r)
            try:
                fr = short.fit_prepared(cand, data, (base + 104_729 * (r + 1)) % (2**31 - 1))
            except (DivergenceError, DegenerateWeightsError):
                scores.append(-math.inf)
                fits.append(None)
                continue
            tr = fr.trace
            le = tr.log_evidence.values[tr.rejected.values == 0] if "rejected" in tr else tr.log_evidence.values
            scores.append(float(le[-2:].mean()))
            fits.append(fr.model)
        best = max(range(len(scores)), key=lambda i: scores[i])
        if fits[best] is None:
            raise DivergenceError(
                f"{self.name}: every one of the {self.num_restarts} restart candidates diverged. Use more "
                "particles or num_restarts=1.", iteration=0, last_good=None)
        return fits[best], {"restart_log_evidence": scores, "restart_chosen": best, "restart_models": tuple(fits),
                            "restart_wall_time_s": time.perf_counter() - t0}

    def _linear_start(self, model, data, seed) -> dict:
        """``init="linear"``: exact KalmanEM on the model's linear special case (float64), embedded in the
        activation's linear regime through the model's ``embed_linear`` (module docstring)."""
        from .kalman_em import KalmanEM

        t0 = time.perf_counter()
        alt = "use init='model' (start from the model as given)"
        lin = require(model, "linear_special_case", needed_by="MonteCarloEM(init='linear')", alternative=alt)()
        embed = require(model, "embed_linear", needed_by="MonteCarloEM(init='linear')", alternative=alt)
        lin = lin.to(torch.float64)
        d64 = Data(data.observations.to(torch.float64), data.mask,
                   None if data.inputs is None else data.inputs.to(torch.float64))
        fit = KalmanEM(num_iterations=self.init_iterations, tol=1e-9, init=self.init_linear).fit_prepared(lin, d64, seed)
        embed(require(lin, "linear_gaussian", needed_by="MonteCarloEM(init='linear')", alternative=alt)(),
              gain=self.init_gain)
        return {"init": "linear", "init_linear": self.init_linear, "init_exact_log_evidence": float(fit.trace.log_evidence.values[-1]),
                "init_iterations": int(fit.diagnostics["num_iterations"]), "init_gain": self.init_gain,
                "init_wall_time_s": time.perf_counter() - t0}

    def _nar_start(self, model, data, seed) -> dict:
        """``init="nar"``: a least-squares autoregression on random tanh features of the lags
        (:func:`~ppl_rnn.inference.nar_start.fit_nar`, the feature map drawn from ``seed``), embedded through
        the model's ``embed_nar`` (module docstring, "Nonlinear warm start")."""
        from .nar_start import fit_nar
        from .reference import LinearAR

        t0 = time.perf_counter()
        embed = require(model, "embed_nar", needed_by="MonteCarloEM(init='nar')",
                        alternative="use init='linear' or init='model'")
        D, H = data.observations.shape[-1], model.hidden_dim
        p = self.init_order
        if p is None:
            ar = LinearAR(order="aic", max_order=max(1, min(30, (H - 1) // D)))
            p = int(max(ar._fit_ar(data, torch.float64)[1]))
        M = H - p * D
        if M < 1:
            raise ConfigurationError(
                f"init='nar' with {p} lags on {D} outputs needs hidden_dim > {p * D} (the lags) to leave units for "
                f"the tanh features; the model has hidden_dim={H}. Use a model with hidden_dim = {p * D} + the "
                f"number of features (e.g. {p * D + 20}), or set init_order below {H // D}.")
        params = fit_nar(data, p, M, ridge=self.init_ridge, feature_scale=self.init_feature_scale,
                         seed=0 if seed is None else int(seed), dtype=model.dtype)
        embed(params, gain=self.init_gain)
        return {"init": "nar", "init_order": p, "init_features": M, "init_sigma": params.sigma.tolist(),
                "init_gain": self.init_gain, "init_wall_time_s": time.perf_counter() - t0}

    def _evidence_se(self, model, data, post, N) -> float:
        r"""Monte Carlo standard error of the E-step's log-evidence estimate (module docstring, "Standard
        error"): from the E-step filter's own genealogy where its posterior carries the filter's record with
        ancestors (:func:`~ppl_rnn.inference.evidence_se.genealogy_log_evidence_var`, summed over the
        independent sequences); otherwise ``se_runs`` independent particle filters with :math:`N/R` particles
        each, run as one batched filter on ``R`` copies of the data; :math:`\widehat{SE}_N =
        \mathrm{sd}_R\sqrt{(N/R)/N}`."""
        if post.evidence_kind == "exact" or self.se_runs < 2 or N is None:
            return 0.0
        rec = post.diagnostics.get("record") if isinstance(post.diagnostics, Mapping) else None
        if getattr(rec, "ancestors", None) is not None and getattr(rec, "log_weights", None) is not None:
            from .evidence_se import genealogy_log_evidence_var

            return float(genealogy_log_evidence_var(rec).sum().sqrt())
        from .smc import ParticleFilter

        sm, R = self.smoother, self.se_runs
        n = max(N // R, 8)
        opts = {k: getattr(sm, k) for k in ("proposal", "resampling", "ess_threshold", "dtype") if hasattr(sm, k)}
        rep = Data(data.observations.repeat(R, 1, 1), data.mask.repeat(R, 1, 1),
                   None if data.inputs is None else data.inputs.repeat(R, 1, 1))
        le = ParticleFilter(n, **opts).infer_prepared(model, rep, None).log_evidence.detach()
        le = le.to(torch.float64).reshape(R, -1).sum(1)
        return float(le.std()) * math.sqrt(n / N)

    def _fit(self, model, data, seed, resume=None):
        info = {}
        dtype = _DTYPES[self.dtype]
        work, wdata = model, data
        if dtype is not None and dtype != model.dtype:
            work = model.copy().to(dtype)
            wdata = Data(data.observations.to(dtype), data.mask, None if data.inputs is None else data.inputs.to(dtype))
        if resume is not None:  # continue the earlier fit: no warm start, no restarts
            if not isinstance(resume.state.trainer, MCEMState):
                raise ConfigurationError(
                    f"resume: the earlier fit's state has no MonteCarloEM part (found "
                    f"{type(resume.state.trainer).__name__}); resume a fit made by MonteCarloEM.")
            load_resumed_parameters(work, resume, self.name)
            info = {k: v for k, v in resume.diagnostics.items() if k not in ("num_iterations", "stopped")}
            res = self._run(work, wdata, seed, info, resume)
        else:
            res = self._fit_new(work, wdata, seed, info)
        if work is not model:
            model.load_state_dict(work.state_dict())
            res = dataclasses.replace(res, model=model)
        return res

    def _fit_new(self, work, wdata, seed, info):
        if self.init == "linear":
            info.update(self._linear_start(work, wdata, seed))
            info["initial_model"] = work.copy()
        elif self.init == "nar":
            info.update(self._nar_start(work, wdata, seed))
            info["initial_model"] = work.copy()
        if self.num_restarts > 1:
            chosen, restart_info = self._restarts(work, wdata, seed)
            work.load_state_dict(chosen.state_dict())
            info.update(restart_info)
        return self._run(work, wdata, seed, info)

    def _run(self, model, data, seed, info, resume=None):
        mode = self._resolve_mstep(model)
        if self.anneal_noise is not None:
            for name in ("noise_scales", "set_noise_scales"):
                require(model, name, needed_by="MonteCarloEM(anneal_noise=...)", alternative="use anneal_noise=None")
        n_obs = max(data.num_observed, 1)
        st = _Progress(MCEMState(omega=self.overrelax) if resume is None else resume.state.trainer)

        def evaluate(k):
            N, P = self._sizes(k)
            if st.boost > 1:
                N = None if N is None else N * st.boost
                P = P * st.boost
            post, paths, le = self._estep(model, data, N, P)
            se = self._evidence_se(model, data, post, N) if math.isfinite(le) else math.nan
            gamma = self._gamma(k)  # of the M-step from these paths (recorded on the last row too: resumable)
            scalars = {"log_evidence": le, "objective": st.obj, "num_particles": -1 if N is None else N,
                       "num_paths": P, "gamma": gamma}
            if self.overrelax != 1.0:  # the stretch of the M-step that produced these parameters
                scalars["overrelax"] = st.omega_of
            # over-relaxation's guard with an exact E-step: the exact evidence must not fall at all
            strict = post.evidence_kind == "exact" and self.overrelax != 1.0
            return EMStep(value=le, se=se, state=(post, paths), scalars=scalars, strict=strict)

        def update(k, step):
            before = model.copy() if self.ascent_z is not None else None
            _mstep(k, step)
            if before is not None:
                return self._ascent_test(model, before, data, st, k)
            return None

        def _mstep(k, step):
            paths, gamma = step.state[1], step.scalars["gamma"]
            bank = [(p, w * (1 - gamma)) for p, w in st.bank if w * (1 - gamma) >= 1e-3] + [(paths, gamma)]
            st.bank = bank
            tot = sum(w for _, w in bank)
            allp = torch.cat([p for p, _ in bank], 0)
            wts = torch.cat([torch.full((p.shape[0],), w / tot / p.shape[0], dtype=allp.dtype) for p, w in bank])
            old = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                   if self.overrelax != 1.0 else None)
            if mode == "closed_form":
                st.obj = float(model.closed_form_mstep(allp, data.observations, data.mask, data.inputs,
                                                          weights=wts, transition_steps=self.gradient_steps,
                                                          learn_initial=self.learn_initial))
            else:
                st.obj = self._gradient_mstep(model, data, allp, wts, st, n_obs)
            if old is not None:
                if st.grow:  # the last stretched step was accepted: omega grows back towards overrelax
                    st.omega = min(self.overrelax, st.omega * _OMEGA_GROWTH)
                st.grow, st.prev_omega_of, st.omega_of = True, st.omega_of, st.omega
                _overrelax(model, old, st.omega)
                with torch.no_grad():  # the objective at the stretched parameters
                    st.obj = float(_q_hat(model, allp, wts, data))
            if self.anneal_noise is not None and k < self.anneal_noise[1]:
                infl = 1.0 + (self.anneal_noise[0] - 1.0) * (1.0 - k / self.anneal_noise[1])
                model.set_noise_scales(process=model.noise_scales()["process"].detach() * infl)

        def on_reject(k):
            if st.fall_back():  # a stretched step fell: retry theta_k with a plain EM step, same particles
                return True
            if st.boost * 2 > self.max_boost:
                return False
            st.boost *= 2
            return True

        loop = EMLoop(method=self.name, evidence_kind="estimate", num_iterations=self.num_iterations,
                      rule=ConvergenceRule(self.tol, self.window, self.z), n_obs=n_obs,
                      reject_se=self.reject_se, progress=self.progress, desc="MonteCarloEM")
        return loop.run(model, evaluate=evaluate, update=update, seed=seed, on_reject=on_reject,
                        posterior=lambda step: step.state[0], attrs={"mstep": mode},
                        diagnostics={"mstep": mode, **info}, resume=resume,
                        snapshot=lambda: st.freeze(keep_bank=self.saem is not None),
                        data_shape=tuple(data.observations.shape))

    def _ascent_test(self, model, before, data, st, k) -> dict:
        r"""The ascent test (module docstring): fresh paths :math:`x^{(s)}` at :math:`\theta_k` (``before``), the
        per-path differences :math:`d_s=\log p_{\theta'}(x^{(s)},y)-\log p_{\theta_k}(x^{(s)},y)`; the M-step's
        :math:`\theta'` (``model``) is kept if :math:`\bar d - z\,\mathrm{sd}(d)/\sqrt S > 0`, else ``model``
        is reset to :math:`\theta_k` and the particles and paths double (up to ``max_boost``)."""
        from .complete_data import complete_data_log_likelihood

        N, P = self._sizes(k)
        N = None if N is None else N * st.boost
        _, fresh, _ = self._estep(before, data, N, P * st.boost)
        with torch.no_grad():
            d = (complete_data_log_likelihood(model, fresh, data).sum(-1)
                 - complete_data_log_likelihood(before, fresh, data).sum(-1)).reshape(-1).to(torch.float64)
        dq = float(d.mean())
        se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else math.inf
        ok = dq - self.ascent_z * se > 0
        if not ok:
            model.load_state_dict(before.state_dict())
            st.obj = math.nan  # no M-step kept: the refused step's Q-hat is not theta_k's
            if not st.fall_back() and st.boost * 2 <= self.max_boost:
                st.boost *= 2
        return {"ascent_dq": dq, "ascent_se": se, "ascent_kept": int(ok)}

    def _gradient_mstep(self, model, data, paths, wts, st, n_obs) -> float:
        r"""``gradient_steps`` Adam steps on :math:`-\hat Q/n_{obs}` (the optimiser, kept in ``st``, carries its
        moments across iterations); returns :math:`\hat Q` after them."""
        if st.opt is None:
            st.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
            if st.opt_state is not None:  # a resumed fit: the earlier run's moments
                st.opt.load_state_dict(copy.deepcopy(st.opt_state))
        opt = st.opt
        for _ in range(self.gradient_steps):
            opt.zero_grad()
            (-_q_hat(model, paths, wts, data) / n_obs).backward()
            opt.step()
        with torch.no_grad():
            return float(_q_hat(model, paths, wts, data))


_OMEGA_GROWTH = 1.1  # after a fallback to plain EM, omega grows by this factor per accepted step


def _q_hat(model, paths: torch.Tensor, wts: torch.Tensor, data: Data) -> torch.Tensor:
    r""":math:`\hat Q(\theta)=\sum_s w_s\log p_\theta(h^{(s)}, y_{obs})` at the model's current parameters."""
    from .complete_data import complete_data_log_likelihood

    return (wts.to(model.dtype) * complete_data_log_likelihood(model, paths, data).sum(-1)).sum()


@torch.no_grad()
def _overrelax(model, old: dict, omega: float) -> None:
    r"""In place: every unconstrained parameter :math:`\theta\leftarrow\theta_\text{old}+\omega(\theta-\theta_\text{old})`
    (``old``: the values before the M-step, by name), i.e. the M-step's move stretched by :math:`\omega`."""
    for n, p in model.named_parameters():
        if n in old:
            p.copy_(old[n] + omega * (p - old[n]))


__all__ = ["MonteCarloEM", "MCEMState"]
