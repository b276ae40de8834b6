r"""The one EM loop shared by every iterative trainer (KalmanEM, MeanFieldEM, EKFEM, BPTT, MonteCarloEM).

A trainer supplies two functions and :class:`EMLoop` does the rest (timer, trace, last good parameters,
progress bar, the convergence rule, the rejection of Monte Carlo steps, the :class:`ppl_rnn.FitResult`):

* ``evaluate(k) -> EMStep``: the E-step at the current parameters :math:`\theta_k` — the value
  :math:`\ell_k` judged by the convergence rule (a log-evidence, exact or estimated, or the trainer's
  objective), its Monte Carlo standard error :math:`s_k` (0 when exact or deterministic), extra trace
  columns and whatever the M-step needs (``state``);
* ``update(k, step) -> dict | None``: the M-step, :math:`\theta_k\to\theta_{k+1}` in place (it may return
  extra scalars for row ``k`` of the trace).

Iteration ``k = 0, 1, ..., K`` evaluates :math:`\theta_k`, records trace row ``k`` (row 0 = the initial
model; parameters :math:`\theta_k`), stops when ``k = K`` or the rule says so, else updates. ``K`` iterations
cost ``K`` updates and ``K + 1`` evaluations; the last evaluation gives ``FitResult.posterior``.

**The convergence rule** (:class:`ConvergenceRule`, one for all trainers). With window :math:`w`, let
:math:`\Delta_k = \bar\ell_{k-w+1..k} - \bar\ell_{k-2w+1..k-w}` be the rise of the mean of the last
:math:`w` values over the mean of the :math:`w` before (:math:`w` iterations apart), and
:math:`\sigma_k = \sqrt{\sum_{j=k-2w+1}^{k}s_j^2}/w` its standard error. The run has converged when

.. math:: \frac{|\Delta_k| + z\,\sigma_k}{w} \le \mathrm{tol}\cdot\max\big(|\bar\ell_{k-w+1..k}|,\ n_{obs}\big),

i.e. when the *upper confidence bound* (``z`` standard errors, default 2) of the change per iteration is
below a relative tolerance (relative to the objective, floored at one unit per observed entry, so an
objective near 0 does not make it unreachable). For an exact objective (:math:`s=0`, e.g. KalmanEM) this
is the classical relative-tolerance test on the change per iteration; for Monte Carlo EM it stops only
once the estimates are precise enough to *show* that the rise per iteration is below ``tol``: a run whose
mean rises by more than ``tol`` per iteration is not stopped (except with probability about
:math:`\Phi(-z)`), and a run whose noise hides its rise goes on to ``num_iterations``. ``tol = 0`` never
stops early. :math:`|\Delta|` (not :math:`\Delta`): a falling objective (possible for the approximate
objectives of mean-field EM and EKF-EM) has not converged either.

**Rejection** (Monte Carlo objectives, ``reject_se``): a new :math:`\theta_{k+1}` whose estimate falls
below the last accepted one by more than ``reject_se`` standard errors of the difference,
:math:`\ell_{k+1} < \ell_k - r\sqrt{s_k^2 + s_{k+1}^2}`, or whose E-step degenerates, is rejected: the row is
recorded with ``rejected = 1``, the parameters return to :math:`\theta_k`, the trainer's ``on_reject``
applies its rule for a refused step (Monte Carlo EM: :meth:`~ppl_rnn.inference.acceptance.AcceptanceWork.refuse`,
a plain retry of a stretched step or more particles; it returns False when it can do neither), and
:math:`\theta_k` is evaluated again.
Steps with :math:`s = 0` are not rejected, except a ``strict`` one (an exact value that must not fall, e.g.
the exact evidence after an over-relaxed EM step, whose plain counterpart cannot lower it): that one is
rejected as soon as :math:`\ell_{k+1} < \ell_k - 10^{-9}\max(1, |\ell_k|)` (the margin absorbs rounding). A run
that cannot raise its particles any further stops at the last accepted parameters
(``diagnostics["stopped"] = "rejected"``).

**Resuming** (``run(..., resume=earlier)``). A run that ends at its last iteration or by the rule records a
:class:`ppl_rnn.results.FitState` in ``FitResult.state``: :math:`\theta_K` (the working model's state), the
torch RNG state just before :math:`\theta_K` was evaluated, the rule's history, and the trainer's own
state (``snapshot()``). A resumed run restores them, evaluates :math:`\theta_K` again from that RNG state (the
same draws, so the same value and the same M-step input as the uninterrupted run had; this costs one
evaluation), overwrites trace row :math:`K` with it, and goes on with update :math:`K`: ``K`` then ``L - K``
iterations give the parameters and trace of ``L`` uninterrupted ones. The trace is the whole run.

**Divergence**: non-finite parameters after an update, or a non-finite value, raise
:class:`ppl_rnn.DivergenceError` naming the iteration and carrying the last good ``FitResult``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr

from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError, DivergenceError
from ppl_rnn.method import InferenceMethod, check_positive_float, check_positive_int
from ppl_rnn.results import FitResult, FitState, params_snapshot
from ppl_rnn.rng import seeded


def load_resumed_parameters(model, resume: FitResult, method: str) -> None:
    """Set ``model`` to the parameters of ``resume.state`` (:class:`ppl_rnn.results.FitState`), or raise a
    clear :class:`ConfigurationError` when they do not fit it (another class or other sizes)."""
    try:
        model.load_state_dict(resume.state.parameters)
    except RuntimeError as e:
        raise ConfigurationError(
            f"resume: the earlier {method} fit's parameters do not fit this model ({e}). Pass the same kind of "
            "model (same class and sizes) as the earlier fit.") from e


def params_finite(model) -> list[str]:
    """Names of the parameters with non-finite entries (empty when all are finite)."""
    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


class TraceRecorder:
    """Per-iteration trace (see module docstring). ``record(model, **scalars)`` appends one row."""

    def __init__(self):
        self.scalars: dict[str, list[float]] = {}
        self.params: dict[str, list[np.ndarray]] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def record(self, model, **scalars) -> None:
        snap = params_snapshot(model)
        scalars.setdefault("wall_time_s", time.perf_counter() - self.t0)
        for k in set(self.scalars) | set(scalars):
            self.scalars.setdefault(k, [math.nan] * self.n).append(float(scalars.get(k, math.nan)))
        for k, v in snap.items():
            self.params.setdefault(k, []).append(v.detach().cpu().numpy().astype(np.float64))
        self.n += 1

    def amend(self, **scalars) -> None:
        """Set scalars of the last row (new columns are NaN in the earlier rows)."""
        for k, v in scalars.items():
            col = self.scalars.setdefault(k, [math.nan] * self.n)
            col[-1] = float(v)

    @classmethod
    def from_dataset(cls, trace: xr.Dataset, param_names) -> TraceRecorder:
        """A recorder holding the rows of an earlier ``dataset()`` (``param_names``: the parameter variables,
        the rest being scalars), with its clock set so ``wall_time_s`` goes on from the last row."""
        rec = cls()
        names = set(param_names)
        rec.n = int(trace.sizes.get("iteration", 0))
        for k, v in trace.data_vars.items():
            arr = np.asarray(v.values)
            if k in names:
                rec.params[k] = [np.array(a, dtype=np.float64) for a in arr]
            else:
                rec.scalars[k] = [float(a) for a in arr]
        wall = rec.scalars.get("wall_time_s")
        if wall and math.isfinite(wall[-1]):
            rec.t0 -= wall[-1]
        return rec

    def last(self, name: str) -> float:
        return self.scalars[name][-1]

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.scalars.get(name, []), dtype=float)

    def dataset(self, upto: int | None = None, attrs: dict | None = None) -> xr.Dataset:
        """The trace as an ``xarray.Dataset`` (rows ``[0, upto)``; all rows by default)."""
        n = self.n if upto is None else upto
        data = {}
        for k, v in self.scalars.items():
            data[k] = (("iteration",), np.asarray(v[:n], dtype=float))
        for k, v in self.params.items():
            arr = np.stack(v[:n]) if n > 0 else np.zeros((0,))
            dims = ("iteration",) + tuple(f"{k}_dim_{i}" for i in range(arr.ndim - 1))
            data[k] = (dims, arr)
        return xr.Dataset(data, coords={"iteration": np.arange(n)}, attrs=dict(attrs or {}))


def check_finite(model, *, iteration: int, method: str, what: dict[str, float] | None = None,
                 last_good: Callable[[], FitResult] | None = None) -> None:
    """Raise :class:`DivergenceError` if a parameter of ``model`` or a value in ``what`` is not finite."""
    bad = params_finite(model)
    bad_vals = [k for k, v in (what or {}).items() if not math.isfinite(float(v))]
    if not bad and not bad_vals:
        return
    found = ", ".join([f"parameter {b}" for b in bad] + [f"{k}={what[k]}" for k in bad_vals])
    raise DivergenceError(
        f"{method} diverged at iteration {iteration}: non-finite {found}. The last finite parameters are in "
        "the exception's .last_good FitResult. Fixes: lower the learning rate / gradient steps, use more "
        "particles, or start from a better initialisation.",
        iteration=iteration, last_good=None if last_good is None else last_good(),
    )


@dataclass
class EMStep:
    """What ``evaluate(k)`` returns: the value judged by the rule, its Monte Carlo standard error (0: exact
    or deterministic), extra trace columns for row ``k`` and the state the M-step needs."""

    value: float
    se: float = 0.0
    scalars: dict = field(default_factory=dict)
    state: Any = None
    #: an exact value (``se == 0``) that must not fall below the last accepted one (module docstring)
    strict: bool = False


class ConvergenceRule:
    """The one convergence rule (module docstring): stop when the upper ``z``-standard-error bound of the
    change per iteration, over windows of ``window`` iterations, is at most ``tol`` times
    ``max(|objective|, n_obs)``. ``tol = 0``: never stop early."""

    def __init__(self, tol: float, window: int = 1, z: float = 2.0):
        self.tol = check_positive_float(tol, "tol", allow_zero=True)
        self.window = check_positive_int(window, "window")
        self.z = check_positive_float(z, "z", allow_zero=True)

    def converged(self, values, ses=None, n_obs: int = 1) -> bool:
        """Whether the run with per-iteration ``values`` (and standard errors ``ses``) has converged."""
        w = self.window
        if self.tol <= 0 or len(values) < 2 * w:
            return False
        v = np.asarray(values[-2 * w:], dtype=float)
        s = np.zeros(2 * w) if ses is None else np.asarray(ses[-2 * w:], dtype=float)
        if not (np.isfinite(v).all() and np.isfinite(s).all()):
            return False
        recent = v[w:].mean()
        delta = recent - v[:w].mean()
        sigma = math.sqrt(float((s * s).sum())) / w
        return (abs(delta) + self.z * sigma) / w <= self.tol * max(abs(recent), float(n_obs))

    def __repr__(self) -> str:
        return f"ConvergenceRule(tol={self.tol!r}, window={self.window!r}, z={self.z!r})"


class EMLoop:
    """The EM loop (module docstring). ``method`` names the trainer in messages and results.

    Args:
        method: the trainer's name (``FitResult.method``).
        evidence_kind: ``FitResult.evidence_kind``.
        num_iterations: the number of updates at most.
        rule: a :class:`ConvergenceRule`.
        reject_se: reject a step whose Monte Carlo estimate falls by more than this many standard errors
            (``None``: never reject).
        record_every: record a trace row every this many iterations (and always the last).
        progress: a one-line progress bar.
        n_obs: the number of observed entries (the rule's floor).
    """

    def __init__(self, *, method: str, evidence_kind: str, num_iterations: int, rule: ConvergenceRule,
                 n_obs: int, reject_se: float | None = None, record_every: int = 1, progress: bool = False,
                 desc: str | None = None):
        if not isinstance(rule, ConvergenceRule):
            raise ConfigurationError(f"rule must be a ConvergenceRule; found {rule!r}.")
        self.method, self.evidence_kind = method, evidence_kind
        self.num_iterations = check_positive_int(num_iterations, "num_iterations", minimum=0)
        self.rule, self.reject_se, self.n_obs = rule, reject_se, max(int(n_obs), 1)
        self.record_every = check_positive_int(record_every, "record_every")
        self.progress, self.desc = bool(progress), desc or method

    def run(self, model, *, evaluate: Callable[[int], EMStep], update: Callable[[int, EMStep], dict | None],
            seed, posterior: Callable[[EMStep], Any] | None = None, on_reject: Callable[[int], bool] | None = None,
            diagnostics: dict | None = None, attrs: dict | None = None, resume: FitResult | None = None,
            snapshot: Callable[[], Any] | None = None, data_shape: tuple = ()) -> FitResult:
        """Run the loop on ``model`` in place; returns the :class:`ppl_rnn.FitResult`.

        ``resume``: an earlier FitResult whose ``state`` this run continues (module docstring, "Resuming"):
        ``model`` must already hold the state's parameters and the trainer its own state; ``snapshot()``
        returns the trainer's state for the record of this run (``FitState.trainer``); ``data_shape`` goes
        into the record."""
        t0 = time.perf_counter()
        state = None if resume is None else resume.state
        if state is not None and state.iteration > self.num_iterations:
            raise ConfigurationError(
                f"resume: the earlier fit has done {state.iteration} iterations; num_iterations="
                f"{self.num_iterations} would end before it. Use num_iterations > {state.iteration} (a resumed "
                "fit runs up to the method's num_iterations in all).")
        if state is None:
            rec = TraceRecorder()
        else:
            rec = TraceRecorder.from_dataset(resume.trace, params_snapshot(model))
            t0 -= float(resume.wall_time_s)
        trace_attrs = {"method": self.method, "evidence_kind": self.evidence_kind, **(attrs or {})}
        diag = dict(diagnostics or {})
        values: list[float] = [] if state is None else list(state.values)
        ses: list[float] = [] if state is None else list(state.ses)
        good = model.copy()
        rng_before = None  # torch's RNG state before the last accepted evaluation (FitState.rng_state)
        last_step: EMStep | None = None
        converged, stopped = False, None
        rejecting = self.reject_se is not None
        after_reject = False  # the evaluation after a rejection is of the last accepted parameters: kept
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.num_iterations, desc=self.desc)

        def result(m, step, conv, upto=None, fit_state=None):
            return FitResult(model=m, trace=rec.dataset(upto, attrs=trace_attrs),
                             posterior=None if (step is None or posterior is None) else posterior(step),
                             wall_time_s=time.perf_counter() - t0, converged=conv, method=self.method,
                             evidence_kind=self.evidence_kind, diagnostics=diag, state=fit_state)

        def last_good():
            return result(good.copy(), None, False)

        def diverged(k, msg, cause=None):
            raise DivergenceError(
                f"{self.method} diverged at iteration {k}: {msg}. The last good fit is in .last_good; use more "
                "particles, a smaller step (learning rate, gradient steps) or a better initialisation.",
                iteration=k, last_good=last_good() if k else None) from cause

        def advance(k, step):
            """Update ``k`` (theta_k -> theta_{k+1}); returns k + 1."""
            try:
                extra = update(k, step)
            except DivergenceError as e:
                if e.last_good is None:
                    e.last_good = last_good()
                raise
            if extra and rec.n and k % self.record_every == 0:
                rec.amend(**extra)
            if bar is not None:
                bar.update(1)
            check_finite(model, iteration=k + 1, method=self.method, last_good=last_good)
            return k + 1

        k = 0 if state is None else state.iteration
        try:
            with seeded(seed), (torch.random.fork_rng(devices=[]) if state is not None else nullcontext()):
                ended = False
                if state is not None:  # theta_K again from the recorded RNG state: the step the earlier run ended on
                    torch.set_rng_state(state.rng_state)
                    rng_before = torch.get_rng_state()
                    step = last_step = evaluate(k)
                    if not math.isfinite(step.value):
                        diverged(k, f"the resumed evaluation is not finite ({step.value})")
                    scal = {n: v for n, v in step.scalars.items() if n != "wall_time_s"}
                    if "log_evidence_se" in rec.scalars:
                        scal["log_evidence_se"] = step.se
                    rec.amend(**scal)  # the earlier run's last row, with this run's scalars (e.g. its schedule)
                    if bar is not None:
                        bar.update(k)
                    ended = k == self.num_iterations
                    if not ended:
                        k = advance(k, step)
                while not ended:
                    rng_now = torch.get_rng_state()
                    try:
                        step = evaluate(k)
                        bad = not math.isfinite(step.value)
                    except DegenerateWeightsError as e:
                        if k == 0 or not rejecting:
                            if k == 0:
                                raise
                            diverged(k, f"the E-step's particle weights degenerated ({e})", e)
                        step, bad = EMStep(value=-math.inf, se=math.nan), True
                    reject = rejecting and k > 0 and (bad or (not after_reject and self._falls(values[-1], ses[-1], step)))
                    after_reject = reject
                    if reject:
                        rec.record(model, **{"log_evidence": step.value, **step.scalars,
                                             "log_evidence_se": step.se, "rejected": 1})
                        model.load_state_dict(good.state_dict())
                        if on_reject is None or not on_reject(k):
                            stopped = "rejected"
                            step = last_step
                            break
                        continue
                    if bad:
                        check_finite(model, iteration=k, method=self.method, what={"value": step.value},
                                     last_good=last_good)
                    scal = dict(step.scalars)
                    if step.se or rejecting:
                        scal["log_evidence_se"] = step.se
                    if rejecting:
                        scal["rejected"] = 0
                    values.append(float(step.value))
                    ses.append(float(step.se))
                    last_step, rng_before = step, rng_now
                    good = model.copy()
                    final = k == self.num_iterations
                    converged = self.rule.converged(values, ses, self.n_obs)
                    if final or converged or k % self.record_every == 0:
                        rec.record(model, **scal)
                    if bar is not None:
                        bar.set_postfix(value=f"{step.value:.2f}" + (f"+-{step.se:.2f}" if step.se else ""))
                    if final or converged:
                        break
                    k = advance(k, step)
        finally:
            if bar is not None:
                bar.close()
        diag.update(num_iterations=k, **({"stopped": stopped} if stopped else {}))
        fit_state = None
        if stopped is None and rng_before is not None:
            fit_state = FitState(method=self.method, iteration=k,
                                 parameters={n: v.detach().clone() for n, v in model.state_dict().items()},
                                 rng_state=rng_before, values=tuple(values), ses=tuple(ses),
                                 data_shape=tuple(data_shape), trainer=None if snapshot is None else snapshot())
        return result(model, last_step, converged, fit_state=fit_state)

    def _falls(self, prev: float, prev_se: float, step: EMStep) -> bool:
        """Whether ``step``'s estimate falls more than ``reject_se`` standard errors below ``prev`` (a
        ``strict`` exact value: whether it falls at all, beyond rounding; module docstring)."""
        s = math.sqrt(prev_se**2 + step.se**2) if math.isfinite(step.se) else math.nan
        if not (s > 0):
            if not math.isfinite(s):
                return True
            return step.strict and step.value < prev - 1e-9 * max(1.0, abs(prev))
        return step.value < prev - self.reject_se * s


class ClosedFormEM(InferenceMethod):
    """Options shared by the deterministic EM trainers (KalmanEM, MeanFieldEM): ``num_iterations``, ``tol``
    (the rule's relative tolerance; ``None``: the class's ``default_tol``), ``learn_initial``, ``progress``.
    Their state is the parameters alone, so ``pr.fit(..., resume=fit)`` continues them (``_fit(..., resume=)``)."""

    default_tol = 1e-7
    resumable = True

    def __init__(self, *, num_iterations: int = 100, tol: float | None = None, learn_initial: bool = True,
                 progress: bool = False):
        self.num_iterations = check_positive_int(num_iterations, "num_iterations")
        self.tol = check_positive_float(self.default_tol if tol is None else tol, "tol", allow_zero=True)
        self.learn_initial = bool(learn_initial)
        self.progress = bool(progress)
