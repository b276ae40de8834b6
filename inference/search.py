r"""The recommended strategy (the default trainer of ``pr.fit(model, y)``): a start search with held-back-tail
selection, guarded by the linear references.

**Split.** The training part :math:`y_{0:T-1}` is cut into a *head* :math:`y_{0:T_h-1}` and a held-back *tail*
:math:`y_{T_h:T-1}`, :math:`T - T_h = \max(\lceil\text{tail}\cdot T\rceil, \text{min\_tail})` (default 20 %, at
least 50 steps; at most half the series).

**Candidates.** For every given model, the starts its capabilities allow (read at run time, never by class):
the model as given (``FromModel``) and ``num_seeds - 1`` redraws of its recurrent weights by its ``perturb``
capability; ``LinearStart()`` where it declares ``linear_special_case`` and ``embed_linear``; ``NARStart()``
(``num_seeds`` feature maps) where it declares ``embed_nar`` and its hidden size leaves room for the features;
``num_seeds`` rotation-type restarts where it declares ``rotation_restart``. A model that declares none of
these gives one candidate: itself.

**Search: successive halving.** :func:`advance` moves a list of candidate fits on by a round's iterations of
the trainer's short version (:func:`~ppl_rnn.inference.starts.short_trainer`) on the head, continuing each
candidate's earlier short fit with ``resume=`` — one candidate after another for now; a batched runner (a
leading candidate dimension through filter, smoother and M-step) replaces that one function. After each round
every live candidate is scored and the better half (rounded up) goes on, until one is left. Round :math:`r`
(from 0) runs :math:`k\,2^r` iterations (:math:`k` = ``search_iterations``, at most the final fit's): half the
candidates, twice the iterations, so every round costs about the same, :math:`kK` short iterations for
:math:`K` candidates (Jamieson & Talwalkar 2016). Why rounds that grow: a warm start (linear, NAR) is good at
once and then plateaus, while a rotation-type start climbs for tens of iterations (measured on the laser:
``benchmarks/README.md``, "Default fit"); equal 5-iteration rounds dropped the climbers.

**Score.** Each candidate is scored on the tail given the head. ``score="crps"`` (the default) ranks by the
**mean CRPS of its forecasts** at the leads ``horizons`` (default 1–10) from every origin in the tail, the
yardstick's (:func:`ppl_rnn.workbench.selection.tail_forecast_score`, registered by the user layer through
:func:`register_tail_scorer`), lower is better,

.. math:: C = \frac1{|K|}\sum_{k\in K}\operatorname{mean}_{o}\ \text{CRPS}\big(p_\theta(y_{o+k}\mid y_{0:o}),
          \,y_{o+k}\big),\qquad T_h-1\le o\le T-1-k,

because the one-step likelihood EM maximises does not always reward dynamics that free-run well (on the laser
a NAR start won the one-step tail score and then forecast no better than AR). ``score="log_score"`` ranks by
the **one-step log score of the tail given the head**,

.. math:: S = \log p_\theta(y_{T_h:T-1}\mid y_{0:T_h-1}) = \sum_{t\ge T_h}\log p_\theta(y_t\mid y_{0:t-1}),

the sum of the particle filter's per-step log-likelihood increments over the tail steps of one filter run on
the whole training part (the filter's default proposal; exact Kalman for linear-Gaussian models and the exact
singular form of an autoregression). :math:`R` independent runs, batched as sequences of one filter call, give
the log-normal-CLT bias-corrected estimate and its standard error (as the yardstick,
:mod:`ppl_rnn.workbench.evaluate`):
:math:`\hat S = \sum_b(\bar\ell_b + s_b^2/2)`, :math:`\mathrm{SE}^2 = \sum_b(s_b^2/R + s_b^4/(2(R-1)))`.
Both are recorded whichever ranks.

**Choice and refit.** The best candidate of the last round continues: the trainer (default
``MonteCarloEM()``, ``num_iterations`` of it) runs on the whole training part from that candidate's head-trained
parameters. (Its head fit cannot be resumed on the whole part — a resumed fit needs data of the same shape — so
this is a fresh run from the chosen parameters.)

**Reference guard.** ``LinearAR(order="aic")`` (least squares on the head) and, where the model declares
``linear_special_case``, the linear state-space model of the same sizes fitted by exact ``KalmanEM`` on the head,
are scored on the same tail the same way (exactly). If no network candidate scores better than the best
reference by the ranking score, the result says so (a :class:`BelowReferenceWarning` and ``diagnostics["search_verdict"]``) and
returns the refitted network with the reference's score beside it, or, with ``below_reference="reference"``,
the reference itself refitted on the whole training part.

**Record.** ``FitResult.diagnostics``: ``search`` (an ``xarray.Dataset`` over ``candidate``: ``label``, ``kind``
(network/reference), ``model``, ``start``, ``seed``, ``tail_log_score``, ``tail_log_score_se``,
``tail_log_score_per_step`` and its ``_se``, ``tail_crps`` and ``tail_crps_by_lead`` (candidate, horizon; NaN
with ``score="log_score"``) (each at the candidate's last round), ``iterations`` (short iterations run on the
head), ``wall_time_s``, ``failed``, ``chosen``, ``rounds`` (rounds it ran), ``round_log_score_per_step`` and
``round_tail_crps`` (candidate, round; NaN after it was dropped)), ``search_choice``, ``search_verdict``,
``reference_tail_log_score`` / ``_per_step``, ``reference_tail_crps``, ``search_tail_steps``, ``search_wall_time_s``; the trace is the
final fit's. Pooling the top candidates into an ensemble is not offered yet.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import pyro
import torch
import xarray as xr

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data
from ppl_rnn.errors import (
    ConfigurationError,
    DataError,
    DegenerateWeightsError,
    DivergenceError,
    ModelCapabilityError,
)
from ppl_rnn.method import (
    InferenceMethod,
    check_choice,
    check_positive_float,
    check_positive_int,
    set_default_trainer,
)
from ppl_rnn.rng import seeded

from .starts import LinearStart, MultiStart, NARStart, short_trainer

__all__ = ["Recommended", "Candidate", "BelowReferenceWarning", "advance", "tail_log_score", "candidates_for",
           "split_tail"]


class BelowReferenceWarning(UserWarning):
    """No network candidate scored above the best linear reference on the held-back tail."""


def split_tail(num_steps: int, tail: float, min_tail: int) -> int:
    """The head length :math:`T_h`: the tail is ``max(ceil(tail * T), min_tail)`` steps, at most ``T // 2``."""
    n_tail = min(max(math.ceil(tail * num_steps), min_tail), num_steps // 2)
    if n_tail < 1 or num_steps - n_tail < 2:
        raise DataError(f"the training part has {num_steps} steps; the start search needs at least 4 to hold back a "
                        "tail. Pass a longer series, or a method (e.g. method=MonteCarloEM()).")
    return num_steps - n_tail


def _sliced(data: Data, stop: int, dtype: torch.dtype) -> Data:
    u = None if data.inputs is None else data.inputs[:, :stop].to(dtype)
    return Data(data.observations[:, :stop].to(dtype), data.mask[:, :stop], u)


@torch.no_grad()
def tail_log_score(model, data: Data, head_steps: int, *, num_particles: int = 1000, replicates: int = 4,
                   seed: int | None = 0) -> tuple[float, float, str]:
    r"""The one-step log score of the tail given the head (module docstring): ``(estimate, SE, how)``, totals
    over the tail steps (and sequences) of ``data``; ``how`` is ``"kalman"`` (exact, SE 0) or
    ``"particle_filter"``. A degenerate filter scores :math:`-\infty`."""
    from .kalman import kalman_filter
    from .smc import default_proposal, run_particle_filter

    form = capability(model, "singular_linear_gaussian") or capability(model, "linear_gaussian")
    if form is not None:
        p = form()
        dt = p.A.dtype
        u = None if data.inputs is None else data.inputs.to(dt)
        f = kalman_filter(p, data.observations.to(dt), data.mask, u)
        return float(f.log_lik[:, head_steps:].double().sum()), 0.0, "kalman"
    R = replicates
    d = _sliced(data, data.num_steps, model.dtype)
    rep = lambda x: None if x is None else x.repeat(R, *([1] * (x.dim() - 1)))  # noqa: E731
    B = d.num_sequences
    try:
        with seeded(seed), pyro.validation_enabled(False):
            rec = run_particle_filter(model, Data(rep(d.observations), rep(d.mask), rep(d.inputs)), num_particles,
                                      proposal=default_proposal())
    except (DegenerateWeightsError, DivergenceError):
        return -math.inf, math.inf, "particle_filter"
    ell = rec.log_lik.double().reshape(R, B, -1)[:, :, head_steps:].sum(-1)  # (R, B)
    if not bool(torch.isfinite(ell).all()):
        return -math.inf, math.inf, "particle_filter"
    m, s2 = ell.mean(0), ell.var(0, unbiased=True)
    est = float((m + 0.5 * s2).sum())
    se = math.sqrt(float((s2 / R + s2.square() / (2 * (R - 1))).sum()))
    return est, se, "particle_filter"


_TAIL_SCORERS: dict = {}


def register_tail_scorer(name: str, fn) -> None:
    """Make ``fn`` the tail score ``Recommended(score=name)`` uses (a hook: the forecast CRPS is computed by the
    yardstick of the user layer, :mod:`ppl_rnn.workbench.selection` registers ``"crps"``, so this floor imports
    nothing from it). ``fn(model, data, head_steps, *, horizons, num_particles, replicates, seed)`` returns a
    dict with ``log_score`` and ``log_score_se`` (totals over the tail, :func:`tail_log_score`'s meaning),
    ``crps`` (mean over ``horizons``, lower is better) and ``crps_by_lead``."""
    if not callable(fn):
        raise ConfigurationError(f"register_tail_scorer needs a callable; found {fn!r}.")
    _TAIL_SCORERS[str(name)] = fn


def _log_score_only(model, data: Data, head_steps: int, *, horizons, num_particles: int, replicates: int,
                    seed) -> dict:
    v, se, _ = tail_log_score(model, data, head_steps, num_particles=num_particles, replicates=replicates, seed=seed)
    return {"log_score": v, "log_score_se": se, "crps": math.nan, "crps_by_lead": [math.nan] * len(horizons)}


register_tail_scorer("log_score", _log_score_only)


@dataclasses.dataclass
class Candidate:
    """One candidate fit of the search (mutable: :func:`advance` moves it on).

    label: readable name (``"ElmanSSM/rotation#1"``); model: its current parameters; start: the start's name;
    seed: the seed of its start and short fits; fit: its last short :class:`~ppl_rnn.FitResult` (None before
    the first); wall_time_s: time spent on it so far; failed: why it dropped out (None while alive);
    model_index: which of the given models it comes from."""

    label: str
    model: object
    start: str
    seed: int
    model_index: int = 0
    fit: object = None
    wall_time_s: float = 0.0
    failed: str | None = None
    score: float = -math.inf
    score_se: float = math.nan
    crps: float = math.nan
    crps_by_lead: tuple = ()
    iterations: int = 0
    info: dict = dataclasses.field(default_factory=dict)


def advance(candidates: Sequence[Candidate], data: Data, trainer, iterations: int, *, progress: bool = False) -> None:
    """Move every live candidate on by ``iterations`` iterations of ``trainer``'s short version on ``data`` (in
    place: ``model``, ``fit``, ``wall_time_s``, ``failed``). A candidate with an earlier fit continues it with
    ``resume=`` where the trainer can resume; otherwise it starts from its current parameters. Candidates run
    one after another; this is the one function a batched runner (a leading candidate dimension) replaces."""
    from tqdm.auto import tqdm

    live = [c for c in candidates if c.failed is None]
    for c in tqdm(live, desc="start search", disable=not progress, leave=False):
        t0 = time.perf_counter()
        data_c = _sliced(data, data.num_steps, c.model.dtype)
        try:
            if c.fit is not None and getattr(trainer, "resumable", False) and c.fit.state is not None:
                done = int(c.fit.state.iteration)
                fr = short_trainer(trainer, done + iterations).fit_prepared(c.model, data_c, c.seed, resume=c.fit)
            else:
                fr = short_trainer(trainer, iterations).fit_prepared(c.model, data_c, c.seed)
        except (DivergenceError, DegenerateWeightsError) as e:
            c.failed = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            c.fit, c.model = fr, fr.model
            c.iterations += int(iterations)
        c.wall_time_s += time.perf_counter() - t0


def candidates_for(model, head: Data, seed: int, num_seeds: int, *, model_index: int = 0,
                   name: str | None = None, linear_iterations: int = 30) -> tuple[list[Candidate], dict, tuple | None]:
    """The candidate starts ``model``'s capabilities allow (module docstring), their starts applied on ``head``.
    Returns the candidates, ``{start: reason}`` for the starts left out, and ``(linear model, seconds)``: the
    exact ``KalmanEM`` fit (``linear_iterations``, from least-squares AR) of the linear special case that the
    linear start embeds (None where the model has none), which the search also scores as a reference."""
    name = name or type(model).__name__
    out, skipped = [], {}
    has = lambda cap: capability(model, cap) is not None  # noqa: E731

    def add(start: str, r: int, make):
        t0 = time.perf_counter()
        s = (int(seed) * 1_000_003 + 7919 * (r + 1) + 104_729 * model_index) % (2**31 - 1)
        try:
            m, info = make(s)
        except (ConfigurationError, ModelCapabilityError, DataError, DivergenceError, RuntimeError) as e:
            skipped[f"{start}#{r}"] = f"{type(e).__name__}: {str(e)[:160]}"
            return
        out.append(Candidate(label=f"{name}/{start}#{r}", model=m, start=start, seed=s, model_index=model_index,
                             wall_time_s=time.perf_counter() - t0, info=info))

    def given(s):
        return model.copy(), {}

    add("given", 0, given)
    if has("perturb"):
        for r in range(1, num_seeds):
            add("perturb", r, lambda s, r=r: (MultiStart(kind="perturb").candidate(model, s, r), {}))
    else:
        skipped["perturb"] = "the model declares no perturb capability"

    def applied(start_obj):
        def make(s):
            m = model.copy()
            info = start_obj.apply(m, _sliced(head, head.num_steps, m.dtype), s, None)
            info.pop("initial_model", None)
            return m, info
        return make

    linear = None
    if has("linear_special_case") and has("embed_linear"):
        def lin_start(s):
            # LinearStart's steps, with the exact linear fit kept: it is also the linear-SSM reference
            nonlocal linear
            from .kalman_em import KalmanEM

            t0 = time.perf_counter()
            lin = model.linear_special_case().to(torch.float64)
            fr = KalmanEM(num_iterations=linear_iterations, tol=1e-7, init="ar").fit_prepared(
                lin, _sliced(head, head.num_steps, torch.float64), s)
            m = model.copy()
            m.embed_linear(lin.linear_gaussian(), gain=LinearStart().gain)
            linear = (lin, time.perf_counter() - t0)
            return m, {"init": "linear", "init_exact_log_evidence": float(fr.trace.log_evidence.values[-1]),
                       "init_iterations": int(fr.diagnostics["num_iterations"])}
        add("linear", 0, lin_start)
    else:
        skipped["linear"] = "the model declares no linear_special_case / embed_linear capability"
    if has("embed_nar"):
        for r in range(num_seeds):
            add("nar", r, applied(NARStart()))
    else:
        skipped["nar"] = "the model declares no embed_nar capability"
    if has("rotation_restart"):
        for r in range(1, num_seeds + 1):
            add("rotation", r, lambda s, r=r: (MultiStart(kind="rotation").candidate(model, s, r), {}))
    else:
        skipped["rotation"] = "the model declares no rotation_restart capability"
    return out, skipped, linear


class Recommended(InferenceMethod):
    """The library's recommended training strategy (module docstring); ``pr.fit(model, y)`` uses it.

    Args:
        trainer: the trainer of the short runs and the final fit (default ``MonteCarloEM()``).
        num_iterations: iterations of the final fit (None: the trainer's own).
        num_seeds: seeds per randomised start (perturb, NAR feature maps, rotation).
        search_iterations: iterations of the first round of short runs on the head; each later round doubles
            them (successive halving's budget: half the candidates, twice the iterations).
        score: what ranks the candidates on the tail: ``"crps"`` (mean CRPS of the forecasts at ``horizons``,
            lower is better; the yardstick's, registered by the user layer) or ``"log_score"`` (the one-step
            log score).
        horizons: the forecast leads of the ``"crps"`` score (the leads the user cares about).
        tail: the held-back tail's fraction of the training part.
        min_tail: the tail's least length in steps.
        num_particles: particles per run of the tail-score filter.
        replicates: independent filter runs (>= 2) whose spread gives the tail score's SE.
        below_reference: what to return when no network beats the best linear reference on the tail:
            ``"network"`` (the refitted network, with a warning and the reference's score beside it) or
            ``"reference"`` (that reference refitted on the whole training part).
        halving: successive halving (module docstring); False: one round, the best after it continues.
        linear_iterations: exact ``KalmanEM`` iterations (from least-squares AR) of the linear special case, the
            linear start and the linear-SSM reference.
        progress: progress bar over the candidates.
    """

    name = "recommended"
    resumable = False

    def __init__(self, *, trainer: InferenceMethod | None = None, num_iterations: int | None = None,
                 num_seeds: int = 2, search_iterations: int = 5, score: str = "crps",
                 horizons=tuple(range(1, 11)), tail: float = 0.2, min_tail: int = 50,
                 num_particles: int = 1000, replicates: int = 4, below_reference: str = "network",
                 halving: bool = True, linear_iterations: int = 30, progress: bool = False):
        if trainer is not None and not isinstance(trainer, InferenceMethod):
            raise ConfigurationError(f"trainer must be a training method object such as MonteCarloEM(); found "
                                     f"{trainer!r}.")
        self.trainer = trainer
        self.num_iterations = None if num_iterations is None else check_positive_int(num_iterations,
                                                                                      "num_iterations")
        self.num_seeds = check_positive_int(num_seeds, "num_seeds")
        self.search_iterations = check_positive_int(search_iterations, "search_iterations")
        if not isinstance(score, str) or score not in ("crps", "log_score"):
            raise ConfigurationError(f"score must be 'crps' (forecast CRPS over horizons) or 'log_score' (one-step "
                                     f"log score); found {score!r}.")
        self.score = score
        hs = [horizons] if isinstance(horizons, int) else list(horizons)
        if not hs or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs):
            raise ConfigurationError(f"horizons must be positive integers (forecast leads), e.g. range(1, 11); "
                                     f"found {horizons!r}.")
        self.horizons = tuple(sorted(set(hs)))
        self.tail = check_positive_float(tail, "tail")
        if self.tail >= 0.5:
            raise ConfigurationError(f"tail must be a fraction below 0.5 of the training part; found {tail!r}. "
                                     "Use e.g. tail=0.2.")
        self.min_tail = check_positive_int(min_tail, "min_tail")
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.replicates = check_positive_int(replicates, "replicates", minimum=2)
        self.below_reference = check_choice(below_reference, "below_reference", ("network", "reference"))
        self.halving = bool(halving)
        self.linear_iterations = check_positive_int(linear_iterations, "linear_iterations")
        self.progress = bool(progress)

    def _trainer(self):
        from .mcem import MonteCarloEM

        tr = MonteCarloEM() if self.trainer is None else self.trainer
        if self.num_iterations is not None:
            tr = copy.copy(tr)
            for attr in ("num_iterations", "num_steps"):
                if hasattr(tr, attr):
                    setattr(tr, attr, self.num_iterations)
                    break
        return tr

    def _fit(self, model, data, seed):
        return self.fit_models([model], data, seed)

    def fit_models(self, models: Sequence, data: Data, seed: int | None):
        """The search over the starts of every model in ``models`` (copies the caller may change) on ``data``."""
        from .kalman_em import KalmanEM
        from .reference import LinearAR

        t_all = time.perf_counter()
        seed = 0 if seed is None else int(seed)
        trainer = self._trainer()
        final_iters = getattr(trainer, "num_iterations", getattr(trainer, "num_steps", self.search_iterations))
        k = min(self.search_iterations, int(final_iters))
        T = data.num_steps
        Th = split_tail(T, self.tail, self.min_tail)
        if self.score == "crps" and max(self.horizons) > T - Th:
            raise DataError(
                f"the start search holds back the last {T - Th} of {T} training steps, fewer than the largest forecast "
                f"lead it scores (horizons up to {max(self.horizons)}). Pass Recommended(horizons=range(1, "
                f"{T - Th + 1})) or Recommended(score='log_score'), or a longer series.")
        head = _sliced(data, Th, data.observations.dtype)
        names = [type(m).__name__ for m in models]
        names = [f"{n}[{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]
        cands, skipped, linears = [], {}, []
        for i, m in enumerate(models):
            c, s, lin = candidates_for(m, head, seed, self.num_seeds, model_index=i, name=names[i],
                                       linear_iterations=self.linear_iterations)
            if lin is not None:
                linears.append((names[i], m.hidden_dim, *lin))
            cands += c
            skipped.update({f"{names[i]}/{key}": v for key, v in s.items()})
        scorer = _TAIL_SCORERS.get(self.score)
        if scorer is None:
            raise ConfigurationError(
                f"score={self.score!r}: no such tail score is registered (the forecast CRPS comes from the "
                "yardstick of the user layer; `import ppl_rnn` registers it). Import ppl_rnn, or pass "
                "Recommended(score='log_score').")
        opts = dict(horizons=self.horizons, num_particles=self.num_particles, replicates=self.replicates, seed=seed)

        def score(c: Candidate, d: Data) -> None:
            t0 = time.perf_counter()
            try:
                r = scorer(c.model, d, Th, **opts)
            except (DegenerateWeightsError, DivergenceError):
                r = {"log_score": -math.inf, "log_score_se": math.inf, "crps": math.inf,
                     "crps_by_lead": [math.inf] * len(self.horizons)}
            c.score, c.score_se = float(r["log_score"]), float(r["log_score_se"])
            c.crps, c.crps_by_lead = float(r["crps"]), tuple(float(v) for v in r["crps_by_lead"])
            c.wall_time_s += time.perf_counter() - t0

        def key(c: Candidate) -> float:  # higher is better
            return -c.crps if self.score == "crps" else c.score

        live, rounds = list(cands), []
        while True:  # successive halving: advance, score, keep the better half, until one is left
            k_round = min(k * 2 ** len(rounds), int(final_iters))  # each round doubles the iterations
            advance(live, head, trainer, k_round, progress=self.progress)
            for c in live:
                if c.failed is None:
                    score(c, _sliced(data, T, c.model.dtype))
            rounds.append({id(c): (c.score, c.score_se, c.crps) for c in live if c.failed is None})
            live = sorted((c for c in live if c.failed is None and math.isfinite(key(c))), key=lambda c: -key(c))
            if not self.halving or len(live) <= 1:
                break
            live = live[:math.ceil(len(live) / 2)]
            if len(live) == 1:
                break
        if not live:
            raise DivergenceError(
                f"the start search: every one of the {len(cands)} candidates diverged or scored -inf on the tail "
                f"({[c.failed for c in cands]}). Use more particles (trainer=MonteCarloEM(smoother=...)) or a "
                "method without a search (method=MonteCarloEM()).", iteration=0, last_good=None)
        best = live[0]  # the best of the last round (sorted above)

        # references, fitted on the head and scored on the same tail
        refs = []
        t0 = time.perf_counter()
        ar = LinearAR(order="aic")
        arf = ar.fit_prepared(models[0], head, seed)
        orders = sorted({int(o) for o in np.atleast_1d(arf.diagnostics.get("order", []))})
        refs.append(Candidate(label=f"AR({','.join(map(str, orders))}) by AIC", model=arf.model, start="reference",
                              seed=seed))
        score(refs[-1], data)
        refs[-1].wall_time_s += time.perf_counter() - t0
        for _nm, H, lin, secs in linears[:1]:  # the linear special case of the first model that has one
            refs.append(Candidate(label=f"linear SSM (H={H}, KalmanEM)", model=lin, start="reference", seed=seed,
                                  wall_time_s=secs))
            score(refs[-1], _sliced(data, T, torch.float64))
        top_ref = max(refs, key=key)
        n_tail = (T - Th) * data.num_sequences
        beats = key(best) > key(top_ref)
        diff = (best.score - top_ref.score) / n_tail
        dse = math.sqrt(best.score_se ** 2 + top_ref.score_se ** 2) / n_tail
        if self.score == "crps":
            rel = (best.crps - top_ref.crps) / top_ref.crps
            measure = (f"mean CRPS over leads {self.horizons[0]}-{self.horizons[-1]} {best.crps:.4g} vs "
                       f"{top_ref.crps:.4g} ({rel:+.1%}); one-step log score {diff:+.3f} ± {dse:.3f} nats/step")
        else:
            close = " (within 2 SE: not a clear win)" if 0 <= diff < 2 * dse else ""
            measure = f"one-step log score {diff:+.3f} ± {dse:.3f} nats/step{close}"
        if beats:
            verdict = (f"{best.label} beats the best linear reference {top_ref.label} on the held-back tail "
                       f"({n_tail} steps): {measure}.")
        else:
            verdict = (f"no network candidate beats the best linear reference {top_ref.label} on the held-back tail "
                       f"({n_tail} steps): the best, {best.label}, is below it: {measure}.")
            warnings.warn(verdict + (" Returning the reference (below_reference='reference')."
                                     if self.below_reference == "reference" else
                                     " Returning the network; pass Recommended(below_reference='reference') to get "
                                     "the reference instead."), BelowReferenceWarning, stacklevel=3)

        # the final fit on the whole training part
        search_wall = time.perf_counter() - t_all
        if beats or self.below_reference == "network":
            work = models[best.model_index]
            work.load_state_dict(best.model.state_dict())
            res = trainer.fit_prepared(work, _sliced(data, T, work.dtype), seed)
            choice = best.label
        else:
            if top_ref is refs[0]:
                res = ar.fit_prepared(models[0], data, seed)
            else:  # the linear SSM, exact EM continued on the whole training part
                res = KalmanEM(num_iterations=self.linear_iterations, tol=1e-7, init="model").fit_prepared(
                    top_ref.model.copy(), _sliced(data, T, torch.float64), seed)
            choice = top_ref.label
        rows = cands + refs
        table = xr.Dataset(
            {"label": ("candidate", [c.label for c in rows]),
             "kind": ("candidate", ["reference" if c.start == "reference" else "network" for c in rows]),
             "model": ("candidate", [type(c.model).__name__ for c in rows]),
             "start": ("candidate", [c.start for c in rows]),
             "seed": ("candidate", [c.seed for c in rows]),
             "tail_log_score": ("candidate", [c.score for c in rows]),
             "tail_log_score_se": ("candidate", [c.score_se for c in rows]),
             "tail_log_score_per_step": ("candidate", [c.score / n_tail for c in rows]),
             "tail_log_score_per_step_se": ("candidate", [c.score_se / n_tail for c in rows]),
             "tail_crps": ("candidate", [c.crps for c in rows]),
             "tail_crps_by_lead": (("candidate", "horizon"), [list(c.crps_by_lead) or [math.nan] * len(self.horizons)
                                                             for c in rows]),
             "iterations": ("candidate", [c.iterations for c in rows]),
             "wall_time_s": ("candidate", [c.wall_time_s for c in rows]),
             "failed": ("candidate", [c.failed or "" for c in rows]),
             "chosen": ("candidate", [c.label == choice for c in rows]),
             "rounds": ("candidate", [sum(id(c) in r for r in rounds) if c.start != "reference" else len(rounds)
                                      for c in rows]),
             "round_log_score_per_step": (("candidate", "round"), [
                 [r[id(c)][0] / n_tail if id(c) in r else (c.score / n_tail if c.start == "reference" else math.nan)
                  for r in rounds] for c in rows]),
             "round_tail_crps": (("candidate", "round"), [
                 [r[id(c)][2] if id(c) in r else (c.crps if c.start == "reference" else math.nan)
                  for r in rounds] for c in rows])},
            coords={"candidate": np.arange(len(rows)), "round": np.arange(1, len(rounds) + 1),
                    "horizon": list(self.horizons)},
            attrs={"head_steps": Th, "tail_steps": T - Th, "search_iterations": k, "halving": int(self.halving),
                   "score": self.score,
                   "verdict": verdict,
                   "choice": choice})
        diag = {"search": table, "search_choice": choice, "search_verdict": verdict,
                "search_beats_reference": bool(beats), "search_skipped": skipped,
                "search_candidate_models": tuple(c.model for c in cands),
                "reference_label": top_ref.label, "reference_tail_log_score": top_ref.score,
                "reference_tail_log_score_per_step": top_ref.score / n_tail, "reference_tail_crps": top_ref.crps,
                "search_tail_steps": T - Th, "search_wall_time_s": search_wall}
        return dataclasses.replace(res, diagnostics={**dict(res.diagnostics), **diag},
                                   wall_time_s=time.perf_counter() - t_all)


set_default_trainer(Recommended)


def _register():
    from .registry import METHODS, register_method

    if "recommended" not in METHODS:
        register_method("recommended", Recommended,
                        "the default: start search on a held-back tail, guarded by AR by AIC (pr.fit without method)")


_register()
