r"""Capabilities: what a model offers a method beyond its three conditionals, declared once, found one way.

A method may exploit structure — the linear-Gaussian form (exact Kalman), a linear-Gaussian emission (the
fully adapted particle filter), diagonal-Gaussian ``(loc, scale)`` shortcuts, analytic Jacobians, a
closed-form M-step, noise scales to read and set, a flat weight vector, a linear warm start. Each is a
*capability*: a method of the model with a fixed name and signature, listed in :data:`CAPABILITIES` with the
promise it makes and the conditionals it **speaks for**.

One lookup, :func:`capability`, decides whether a model has one, with one rule for all of them:

1. the model's class (or a base) defines a method of that name;
2. **the defining-class rule**: for every conditional the capability speaks for, the class defining the
   capability is that conditional's defining class or a subclass of it — so a subclass that overrides
   ``transition`` never inherits a stale transition shortcut, Jacobian, M-step or linear form. A model lists
   helper methods its conditionals are built from in ``conditional_parts`` (e.g. ``ElmanSSM``'s
   ``transition_mean``), and overriding a part counts as overriding the conditional;
3. neither the capability nor a conditional it speaks for is patched on the instance;
4. the instance agrees: ``model.capability_applies(name)`` (default True; e.g. ``ElmanSSM`` has a linear-Gaussian
   form only with ``activation="identity"``).

Methods call :func:`capability` (None if absent) or :func:`require` (a :class:`ModelCapabilityError` that
names the capability, why it is missing and the fix). They never read a parameter by name and never check a
model's class. A project may declare further capabilities with :func:`declare`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigurationError, ModelCapabilityError

CONDITIONALS = ("initial", "transition", "emission")
_ALL = CONDITIONALS


@dataclass(frozen=True)
class Capability:
    """A declared capability: a model method ``name`` with ``signature`` that keeps ``promise``, valid only
    while the conditionals in ``speaks_for`` are the ones it was written for."""

    name: str
    signature: str
    promise: str
    speaks_for: tuple[str, ...]
    #: whether it also depends on the helpers a conditional is built from (``conditional_parts``): a
    #: Jacobian does, the noise scales do not
    reads_parts: bool = True


CAPABILITIES: dict[str, Capability] = {}


def declare(name: str, signature: str, promise: str, speaks_for: tuple[str, ...], *,
            reads_parts: bool = True) -> Capability:
    """Add a capability to :data:`CAPABILITIES` (each name once)."""
    bad = [c for c in speaks_for if c not in CONDITIONALS]
    if bad or not speaks_for:
        raise ConfigurationError(f"speaks_for must be a non-empty subset of {CONDITIONALS}; found {speaks_for!r}.")
    if name in CAPABILITIES:
        raise ConfigurationError(f"capability {name!r} is already declared; pick another name.")
    cap = Capability(name, signature, promise, tuple(speaks_for), reads_parts)
    CAPABILITIES[name] = cap
    return cap


# ---- the declared capabilities ------------------------------------------------------------------------
declare("linear_gaussian", "() -> LinearGaussianParams",
        "the model is exactly the linear-Gaussian SSM returned (exact Kalman filter/smoother, KalmanEM)", _ALL)
declare("singular_linear_gaussian", "() -> LinearGaussianParams",
        "the process the model stands for is exactly the linear-Gaussian SSM returned, whose Q and R may be "
        "singular (an autoregression in companion form: exact lags, no observation noise); the model's "
        "conditionals regularise it with a negligible noise. The yardstick scores and forecasts with this form "
        "(exact Kalman filtering), so its held-out score is the process's own likelihood", _ALL)
declare("set_linear_gaussian", "(params: LinearGaussianParams) -> None",
        "sets the parameters from a linear-Gaussian fit, projected onto the model's family (KalmanEM's "
        "write-back); afterwards linear_gaussian() returns that projection", _ALL)
declare("linear_special_case", "() -> StateSpaceModel",
        "a new linear-Gaussian model (it has linear_gaussian and set_linear_gaussian) of the same sizes whose "
        "fit embed_linear can take over: the linear warm start", _ALL)
declare("embed_linear", "(params: LinearGaussianParams, *, gain: float) -> None",
        "sets this (nonlinear) model so that, in its activation's linear regime, it behaves as the given "
        "linear-Gaussian model (states scaled by gain)", _ALL)
declare("embed_nar", "(params: NARParams, *, gain: float) -> None",
        "sets this model so that it behaves as the given nonlinear autoregression (NARParams: linear lags plus "
        "tanh features of the lags), the lags carried in the activation's linear regime (scaled by gain): the "
        "nonlinear warm start", _ALL)
declare("transition_loc_scale", "(t, h_prev, u_t) -> (loc, scale)",
        "transition(t, h_prev, u_t) is Normal(loc, scale).to_event(1) (no distribution object is built)",
        ("transition",))
declare("emission_loc_scale", "(t, h, u_t) -> (loc, scale)",
        "emission(t, h, u_t) is Normal(loc, scale).to_event(1)", ("emission",))
declare("linear_gaussian_emission", "(t, u_t) -> (C, offset, R)",
        "emission(t, h, u_t) is N(C h + offset, R) for every h: C (..., D, H), offset (..., D), R (D, D) "
        "(the fully adapted particle filter, exact conditioning)", ("emission",))
declare("transition_jacobian", "(t, h_prev, u_t, mean=None) -> (..., H, H)",
        "the Jacobian of transition(...).mean with respect to h_prev (mean: that mean, if the caller has it)",
        ("transition",))
declare("emission_jacobian", "(t, h, u_t) -> (..., D, H)",
        "the Jacobian of emission(...).mean with respect to h", ("emission",))
declare("closed_form_mstep",
        "(trajectories, observations, mask, inputs=None, *, weights=None, transition_steps=5, "
        "learn_initial=True) -> float",
        "increases the Monte Carlo EM objective sum_s w_s log p(h^s, y) in place and returns it", _ALL)
declare("elman_form", "() -> ElmanForm",
        "the model is h_t = act(W h_{t-1} + U u_t + b) + N(0, diag q^2), y_t = C h_t + d + N(0, diag r^2), "
        "h_0 ~ N(m0, diag s0^2) (mean-field EM of Ma & Ji)", _ALL)
declare("set_elman_form", "(form: ElmanForm) -> None", "sets the parameters from an ElmanForm", _ALL)
declare("noise_scales", "() -> dict[str, Tensor]",
        "the noise scales by role ('initial', 'process', 'obs'): a vector of standard deviations or a "
        "lower-triangular scale matrix each", _ALL, reads_parts=False)
declare("set_noise_scales", "(**scales: Tensor) -> None",
        "sets the named noise scales (same roles and shapes as noise_scales())", _ALL, reads_parts=False)
declare("weights", "() -> Tensor",
        "a flat vector of the deterministic network's parameters (everything but the noise scales)", _ALL,
        reads_parts=False)
declare("set_weights", "(vector: Tensor) -> None", "sets the parameters from a vector like weights()", _ALL,
        reads_parts=False)
declare("perturb", "(scale: float, generator: torch.Generator) -> None",
        "moves the deterministic network's weights by a random step of relative size scale (restarts)",
        ("transition",), reads_parts=False)
declare("rotation_restart", "(generator: torch.Generator) -> None",
        "redraws the recurrent weights as a random rotation near the identity times a gain slightly above 1 "
        "(slow oscillatory modes in the saturating regime; restarts in another basin)",
        ("transition",), reads_parts=False)


# ---- the one lookup -----------------------------------------------------------------------------------
def _defining_class(cls: type, name: str) -> type | None:
    for k in cls.__mro__:
        if name in k.__dict__:
            return k
    return None


def _missing_reason(model, name: str) -> str | None:
    """None when ``model`` has capability ``name``; else why not (a sentence fragment)."""
    cap = CAPABILITIES.get(name)
    if cap is None:
        raise ConfigurationError(f"{name!r} is not a declared capability; the declared ones are "
                                 f"{sorted(CAPABILITIES)}. Declare new ones with ppl_rnn.capabilities.declare.")
    cls = type(model)
    owner = _defining_class(cls, name)
    if owner is None or getattr(model, name, None) is None:
        return f"{cls.__name__} does not define {name}{cap.signature}"
    inst = vars(model)
    if name in inst:
        return f"{name} is patched on the instance"
    parts = getattr(model, "conditional_parts", {}) or {}
    for cond in cap.speaks_for:
        for member in (cond, *(parts.get(cond, ()) if cap.reads_parts else ())):
            if member in inst:
                return f"{member} is patched on the instance, so {name} (defined by {owner.__name__}) may be stale"
            k = _defining_class(cls, member)
            if k is not None and not issubclass(owner, k):
                return (f"{k.__name__} overrides {member} but {name} is inherited from {owner.__name__}, so it may "
                        f"not describe the new {cond}")
    applies = getattr(model, "capability_applies", None)
    if applies is not None and not applies(name):
        return f"{name} does not apply to this {cls.__name__} instance ({model!r:.80})"
    return None


def capability(model, name: str) -> Callable | None:
    """The bound capability ``name`` of ``model`` when it may be used (see the module docstring), else None."""
    return None if _missing_reason(model, name) is not None else getattr(model, name)


def has_capabilities(model, *names: str) -> bool:
    """Whether ``model`` has every capability in ``names``."""
    return all(_missing_reason(model, n) is None for n in names)


def require(model, name: str, *, needed_by: str, alternative: str = "") -> Callable:
    """The bound capability, or a :class:`ModelCapabilityError` naming it, why it is missing and the fix."""
    why = _missing_reason(model, name)
    if why is None:
        return getattr(model, name)
    cap = CAPABILITIES[name]
    msg = (f"{needed_by} needs the model capability {name}{cap.signature} ({cap.promise}); {why}. "
           f"Declare it on the class that defines {', '.join(cap.speaks_for)} (see ppl_rnn.capabilities)")
    raise ModelCapabilityError(msg + (f", or {alternative}." if alternative else "."))


def declared_capabilities(model) -> list[str]:
    """The names of the capabilities ``model`` has (for listings and error messages)."""
    return [n for n in CAPABILITIES if _missing_reason(model, n) is None]


__all__ = ["Capability", "CAPABILITIES", "CONDITIONALS", "declare", "capability", "has_capabilities", "require",
           "declared_capabilities"]
