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


def _mcem(*, num_particles: int | None = None, num_paths: int | None = None, backward: str | None = None, **kw):
    """MonteCarloEM; ``num_particles``, ``num_paths``, ``backward`` configure its particle smoother (unset:
    MonteCarloEM's default smoother, or ParticleSmoother's defaults for the ones not given)."""
    from .mcem import MonteCarloEM
    from .particle_smoother import ParticleSmoother

    smo = {k: v for k, v in (("num_particles", num_particles), ("num_paths", num_paths), ("backward", backward))
           if v is not None}
    if smo and "smoother" in kw:
        raise ConfigurationError("pass either smoother= or num_particles/num_paths/backward to 'mcem', not both.")
    if smo:
        kw["smoother"] = ParticleSmoother(**smo)
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
