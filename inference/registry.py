"""The one registry of inference-method names: ``name -> (factory, description)``.

Every place that names a method by a string — the CLI (``--method``, ``--methods``), the TOML configs of
``ppl-rnn compare`` (``type = "..."``), the demo and the notebooks — goes through this module, so each
method has exactly **one spelling**: snake_case, unique, self-describing, and equal to the method object's
``name`` (what results and ArviZ exports carry as ``method`` / ``inference_method``). SVI is one method
with several guides; its presets are ``svi_<guide>`` (the guide's own name in
:data:`ppl_rnn.inference.svi.GUIDES`), so ``make_method("svi_ekf").name == "svi"`` with ``guide="ekf"``.

**Adding a method is one line** (issue 13's RTRL and GlobalSearch, or your own)::

    register_method("rtrl", "ppl_rnn.inference.rtrl:RTRL", "real-time recurrent learning (online gradient)")

The factory is a callable or a ``"module:attribute"`` string imported on first use (so registering costs
no import and creates no import circle). ``kind`` is ``"train"`` (for ``pr.fit``, the default),
``"infer"`` (filters and smoothers, for ``pr.infer``) or ``"reference"`` (baseline rows of a comparison);
``fixed`` are options a preset sets (the caller may not override them); ``progress=False`` for factories
without a ``progress`` option.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import InferenceMethod

__all__ = ["MethodEntry", "METHODS", "register_method", "make_method", "method_names", "describe",
           "is_reference"]

KINDS = ("train", "infer", "reference")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its name, factory (callable or ``"module:attribute"``), one-line description,
    kind (``train`` / ``infer`` / ``reference``), preset options and whether it takes ``progress=``."""

    name: str
    factory: Callable[..., InferenceMethod] | str
    description: str
    kind: str = "train"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True

    def resolve(self) -> Callable[..., InferenceMethod]:
        """The factory itself (``"module:attribute"`` read from the loaded module: ``ppl_rnn.inference`` loads
        every module its entries name; register a callable for a module of your own)."""
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        if module not in sys.modules:
            raise ConfigurationError(f"method {self.name!r}: its module {module!r} is not loaded; import it first, or "
                                     f"register the factory itself (a callable) instead of {self.factory!r}.")
        return getattr(sys.modules[module], attr)

    @property
    def target(self) -> str:
        """Where to read the options: ``help(...)`` of this."""
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            return f"{module}.{attr}"
        return f"{self.factory.__module__}.{self.factory.__qualname__}"


#: the registry, in registration order (the order the CLI lists them)
METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, factory, description: str, *, kind: str = "train", fixed: Mapping | None = None,
                    progress: bool = True) -> MethodEntry:
    """Register ``name`` (snake_case, unique); see the module docstring. Returns the entry."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"method name must be snake_case (lower-case letters, digits, underscores, "
                                 f"starting with a letter); found {name!r}.")
    if name in METHODS:
        raise ConfigurationError(f"method name {name!r} is already registered ({METHODS[name].description}); "
                                 "one spelling per method: choose another name.")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise ConfigurationError(f"factory for {name!r} must be callable or a 'module:attribute' string; "
                                 f"found {factory!r}.")
    if kind not in KINDS:
        raise ConfigurationError(f"kind must be one of {KINDS}; found {kind!r}.")
    entry = MethodEntry(name, factory, str(description), kind, dict(fixed or {}), bool(progress))
    METHODS[name] = entry
    return entry


def method_names(kind: str | tuple[str, ...] | None = None) -> list[str]:
    """Registered names, in registration order; ``kind`` filters (a kind or a tuple of kinds)."""
    kinds = KINDS if kind is None else ((kind,) if isinstance(kind, str) else tuple(kind))
    return [n for n, e in METHODS.items() if e.kind in kinds]


def is_reference(name: str) -> bool:
    """Whether ``name`` is a reference (baseline) row rather than a trained network."""
    return name in METHODS and METHODS[name].kind == "reference"


def describe(kind: str | tuple[str, ...] | None = None, *, width: int = 24) -> str:
    """One line per method: ``name  description`` (for ``--help``)."""
    return "\n".join(f"  {n:<{width}} {METHODS[n].description}" for n in method_names(kind))


def _lookup(name: str) -> MethodEntry:
    if name not in METHODS:
        close = difflib.get_close_matches(str(name).lower().replace("-", "_"), list(METHODS), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}.{hint}")
    return METHODS[name]


def make_method(name: str, *, progress: bool = False, **options) -> InferenceMethod:
    """Build the method registered as ``name`` with constructor ``options``; ``progress=True`` turns on its
    per-iteration progress bar where it has one."""
    entry = _lookup(name)
    clash = sorted(set(options) & set(entry.fixed))
    if clash:
        raise ConfigurationError(f"method {name!r} fixes {', '.join(f'{k}={entry.fixed[k]!r}' for k in clash)}; "
                                 f"drop {', '.join(clash)} or choose another method name.")
    kw = {**entry.fixed, **options}
    if progress and entry.progress and "progress" not in kw:
        kw["progress"] = True
    try:
        method = entry.resolve()(**kw)
    except TypeError as e:
        raise ConfigurationError(f"bad options for method {name!r} ({e}); its options are the keyword arguments "
                                 f"of {entry.target} (see help({entry.target})).") from e
    return method


#: the flat options ``make_method("mcem", ...)`` accepts (CLI, TOML configs, notebooks), by the part they build
MCEM_FLAT_OPTIONS = {
    "stopping": ("tol", "window", "z"),
    "schedule": ("particle_schedule",),
    "averaging": ("saem",),
    "mstep": ("gradient_steps", "lr", "learn_initial", "anneal_noise"),
    "acceptance": ("reject_se", "max_boost", "se_runs", "ascent_z", "overrelax"),
    "start": ("init", "init_iterations", "init_gain", "init_linear", "init_order", "init_ridge", "init_feature_scale",
              "num_restarts", "restart_iterations", "restart_kind"),
}


def _mcem_schedule(spec):
    from .mcem import ParticleSchedule

    if spec is None or isinstance(spec, ParticleSchedule):
        return spec
    if callable(spec):
        return ParticleSchedule(fn=spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        if all(isinstance(x, (tuple, list)) and len(x) == 2 for x in spec):
            return ParticleSchedule(particles=(spec[0][0], spec[1][0]), paths=(spec[0][1], spec[1][1]))
        return ParticleSchedule(particles=tuple(spec))
    raise ConfigurationError(f"particle_schedule must be None, (start, end), ((N0, P0), (N1, P1)) or a callable; "
                             f"found {spec!r}.")


def _mcem_mstep(kind="auto", **kw):
    from .msteps import AutoMStep, ClosedFormMStep, GradientMStep, MStep

    if isinstance(kind, MStep):
        if kw:
            raise ConfigurationError(f"pass either mstep={kind!r} or {', '.join(sorted(kw))} to 'mcem', not both.")
        return kind
    if kind not in ("auto", "closed_form", "gradient"):
        raise ConfigurationError(f"mstep must be one of ['auto', 'closed_form', 'gradient'] or an M-step object; "
                                 f"found {kind!r}.")
    steps, lr, learn = kw.get("gradient_steps", 10), kw.get("lr", 0.01), kw.get("learn_initial", True)
    anneal = kw.get("anneal_noise")
    closed = ClosedFormMStep(transition_steps=steps, learn_initial=learn)
    grad = GradientMStep(steps=steps, lr=lr, **({"optimizer": "adam"} if "lr" in kw else {}))  # lr: Adam's
    if kind == "auto":
        return AutoMStep(closed_form=closed, gradient=grad, anneal_noise=anneal)
    return dataclasses.replace(closed if kind == "closed_form" else grad, anneal_noise=anneal)


def _mcem_start(init="model", init_iterations=200, init_gain=0.01, init_linear="ar", init_order=None,
                init_ridge=1e-7, init_feature_scale=1.0, num_restarts=1, restart_iterations=10,
                restart_kind="perturb"):
    from .starts import FromModel, LinearStart, MultiStart, NARStart

    if init not in ("model", "linear", "nar"):
        raise ConfigurationError(f"init must be one of ['linear', 'model', 'nar']; found {init!r}.")
    base = {"model": lambda: FromModel(),
            "linear": lambda: LinearStart(iterations=init_iterations, begin=init_linear, gain=init_gain),
            "nar": lambda: NARStart(order=init_order, gain=init_gain, ridge=init_ridge,
                                    feature_scale=init_feature_scale)}[init]()
    if num_restarts == 1:
        return base
    return MultiStart(num_starts=num_restarts, iterations=restart_iterations, kind=restart_kind, base=base)


def _mcem(*, num_particles: int | None = None, num_paths: int | None = None, backward: str | None = None, **kw):
    """MonteCarloEM from flat options (what the CLI, TOML configs and notebooks pass): ``num_particles``,
    ``num_paths``, ``backward`` configure its particle smoother; the options of :data:`MCEM_FLAT_OPTIONS` build
    its parts (``tol``/``window``/``z``: ``stopping``; ``particle_schedule``: ``schedule``; ``saem``:
    ``averaging``; ``mstep="auto"|"closed_form"|"gradient"`` with ``gradient_steps`` (Levenberg-Marquardt steps
    of the closed form, Adam steps of the gradient step), ``lr``, ``learn_initial``, ``anneal_noise``: ``mstep``;
    ``reject_se``/``max_boost``/``se_runs``/``ascent_z``/``overrelax``: ``acceptance``; ``init="model"|"linear"|
    "nar"`` with ``init_*`` and ``num_restarts``/``restart_iterations``/``restart_kind``: ``start``). The part
    objects themselves may be passed instead, not both."""
    from .acceptance import Acceptance
    from .em_common import ConvergenceRule
    from .mcem import SAEM, MonteCarloEM
    from .particle_smoother import ParticleSmoother

    smo = {k: v for k, v in (("num_particles", num_particles), ("num_paths", num_paths), ("backward", backward))
           if v is not None}
    if smo and "smoother" in kw:
        raise ConfigurationError("pass either smoother= or num_particles/num_paths/backward to 'mcem', not both.")
    if smo:
        kw["smoother"] = ParticleSmoother(**smo)
    flat = {part: {k: kw.pop(k) for k in keys if k in kw} for part, keys in MCEM_FLAT_OPTIONS.items()}
    for part, opts in flat.items():
        if opts and kw.get(part) is not None and part != "mstep":
            raise ConfigurationError(f"pass either {part}= or {', '.join(sorted(opts))} to 'mcem', not both.")
    st = flat["stopping"]
    if st:
        kw["stopping"] = ConvergenceRule(st.get("tol", 1e-5), st.get("window", 5), st.get("z", 2.0))
    if flat["schedule"]:
        kw["schedule"] = _mcem_schedule(flat["schedule"]["particle_schedule"])
    if flat["averaging"]:
        saem = flat["averaging"]["saem"]
        kw["averaging"] = None if saem is None or callable(saem) else SAEM(saem)
        if callable(saem):
            kw["averaging"] = saem
    if flat["mstep"] or isinstance(kw.get("mstep"), str):
        kw["mstep"] = _mcem_mstep(kw.get("mstep") or "auto", **flat["mstep"])
    if flat["acceptance"]:
        kw["acceptance"] = Acceptance(**flat["acceptance"])
    if flat["start"]:
        kw["start"] = _mcem_start(**flat["start"])
    return MonteCarloEM(**kw)


# --- training methods (pr.fit) -------------------------------------------------------------------------
register_method("mcem", _mcem, "Monte Carlo EM, particle-smoother E-step (Unkelbach et al. 2009)")
register_method("meanfield_em", "ppl_rnn.inference.meanfield_em:MeanFieldEM", "mean-field EM (Ma & Ji 1998)")
register_method("ekf_em", "ppl_rnn.inference.ekf_em:EKFEM", "EM with an extended Kalman smoother E-step")
register_method("kalman_em", "ppl_rnn.inference.kalman_em:KalmanEM", "exact EM (linear-Gaussian models only)")
register_method("svi_markov_gaussian", "ppl_rnn.inference.svi:SVI", "SVI with the structured Markov Gaussian guide",
                fixed={"guide": "markov_gaussian"})
register_method("svi_mean_field", "ppl_rnn.inference.svi:SVI", "SVI with the mean-field Gaussian guide",
                fixed={"guide": "mean_field"})
register_method("svi_amortized", "ppl_rnn.inference.svi:SVI", "SVI with the amortised bidirectional-GRU guide",
                fixed={"guide": "amortized"})
register_method("svi_ekf", "ppl_rnn.inference.svi:SVI", "SVI with the extended-Kalman-smoother guide",
                fixed={"guide": "ekf"})
register_method("bptt", "ppl_rnn.inference.bptt:BPTT", "deterministic network by backpropagation through time")
register_method("rtrl", "ppl_rnn.inference.rtrl:RTRL", "deterministic network by real-time recurrent learning (online)")
register_method("global_search_cma", "ppl_rnn.inference.global_search:GlobalSearch",
                "deterministic network by CMA-ES on the weight vector (cma package)", fixed={"strategy": "cma"})
register_method("global_search_genetic", "ppl_rnn.inference.global_search:GlobalSearch",
                "deterministic network by a genetic algorithm on the weight vector", fixed={"strategy": "genetic"})
register_method("global_search_annealing", "ppl_rnn.inference.global_search:GlobalSearch",
                "deterministic network by simulated annealing on the weight vector", fixed={"strategy": "annealing"})
register_method("global_search_swarm", "ppl_rnn.inference.global_search:GlobalSearch",
                "deterministic network by particle swarm optimisation on the weight vector", fixed={"strategy": "swarm"})
# --- reference rows (baselines of a comparison) ----------------------------------------------------------
register_method("linear_ar", "ppl_rnn.inference.reference:LinearAR", "reference: linear AR(order) by least squares",
                kind="reference", progress=False)
register_method("persistence", "ppl_rnn.inference.reference:Persistence",
                "reference: random walk (forecast = last value)", kind="reference", progress=False)
# --- filters and smoothers (pr.infer) --------------------------------------------------------------------
register_method("particle_filter", "ppl_rnn.inference.smc:ParticleFilter", "particle filter (SMC)", kind="infer")
register_method("particle_smoother", "ppl_rnn.inference.particle_smoother:ParticleSmoother",
                "particle smoother (FFBSi / backward MCMC)", kind="infer")
register_method("kalman_filter", "ppl_rnn.inference.kalman:KalmanFilter", "exact Kalman filter (linear-Gaussian)",
                kind="infer", progress=False)
register_method("kalman_smoother", "ppl_rnn.inference.kalman:KalmanSmoother",
                "exact Kalman (RTS) smoother (linear-Gaussian)", kind="infer", progress=False)
register_method("extended_kalman_filter", "ppl_rnn.inference.ekf:ExtendedKalmanFilter", "extended Kalman filter",
                kind="infer", progress=False)
register_method("extended_kalman_smoother", "ppl_rnn.inference.ekf:ExtendedKalmanSmoother",
                "extended Kalman (RTS) smoother", kind="infer", progress=False)
