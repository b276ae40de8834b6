r"""The model contract: a state-space model is a Pyro program built from three conditionals.

.. math::
    h_0 &\sim p_\theta(h_0 \mid u_0)                       &&\texttt{initial(u0)} \\
    h_t &\sim p_\theta(h_t \mid h_{t-1}, u_t),\ t\ge 1     &&\texttt{transition(t, h\_prev, u\_t)} \\
    y_t &\sim p_\theta(y_t \mid h_t, u_t)                  &&\texttt{emission(t, h, u\_t)}

Time is 0-based in code (``t = 0 … T-1``). Each method returns a torch distribution batched over any
leading dims of its arguments (particles, sequences) with event dim ``hidden_dim`` (resp. ``obs_dim``).
``u_t`` is ``None`` for a model without inputs, else a tensor ``(..., input_dim)`` that broadcasts
against ``h``.

:meth:`StateSpaceModel.forward` composes the three into an ordinary Pyro program (``pyro.plate`` over
sequences, ``pyro.markov`` over time, sites ``h_{t}`` and ``y_{t}``), so SVI, ``Predictive`` and
``poutine`` see it as any Pyro model, while SMC, EKF and Kalman read the conditionals directly. The joint
log-density is

.. math:: \log p(h_{0:T-1}, y_{0:T-1}) = \log p(h_0) + \sum_{t\ge1}\log p(h_t\mid h_{t-1}) + \sum_t \log p(y_{t,o}\mid h_t)

where :math:`y_{t,o}` are the observed (non-NaN) entries; see :mod:`ppl_rnn.masking`.

Capabilities (what a method may exploit beyond the three conditionals: the linear-Gaussian form, diagonal-
Gaussian ``(loc, scale)`` shortcuts, a linear-Gaussian emission, analytic Jacobians, a closed-form M-step, noise
scales, a flat weight vector, a linear warm start) are declared in :mod:`ppl_rnn.capabilities` and found only
through :func:`ppl_rnn.capabilities.capability`, which applies the defining-class rule to all of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.distributions import transform_to

from .data import model_dtype, validate_inputs, validate_observations
from .errors import ConfigurationError, DataError
from .masking import PartiallyObserved, masked_log_prob
from .priors import sample_parameter_sites
from .rng import seeded
from .scope import library_scope, local_param_ready


@dataclass(frozen=True)
class LinearGaussianParams:
    r"""A time-invariant linear-Gaussian state-space model.

    .. math::
        h_0 \sim N(m_0, P_0),\quad h_t = A h_{t-1} + B u_t + b + e_t,\ e_t\sim N(0,Q),\quad
        y_t = C h_t + D u_t + d + v_t,\ v_t\sim N(0,R).

    ``B``/``D`` are ``None`` for a model without inputs (``D`` alone is None when the emission has no input
    term). ``diagonal_noise``: the model's family has diagonal ``Q``, ``R``, ``P0`` (an M-step then fits the
    diagonals, each output over the steps where it is observed).
    """

    A: torch.Tensor
    b: torch.Tensor
    Q: torch.Tensor
    C: torch.Tensor
    d: torch.Tensor
    R: torch.Tensor
    m0: torch.Tensor
    P0: torch.Tensor
    B: torch.Tensor | None = None
    D: torch.Tensor | None = None
    diagonal_noise: bool = False


@dataclass(frozen=True)
class ElmanForm:
    r"""The stochastic Elman form (capability ``elman_form``):

    .. math:: h_0\sim N(m_0,\operatorname{diag}s_0^2),\quad
              h_t = \phi(W h_{t-1} + U u_t + b) + N(0, \operatorname{diag} q^2),\quad
              y_t = C h_t + d + N(0, \operatorname{diag} r^2)

    ``activation`` names :math:`\phi` (``"tanh"`` or ``"identity"``); ``U`` is None without inputs.
    """

    W: torch.Tensor
    b: torch.Tensor
    C: torch.Tensor
    d: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    m0: torch.Tensor
    s0: torch.Tensor
    activation: str
    U: torch.Tensor | None = None


@dataclass(frozen=True)
class NARParams:
    r"""A nonlinear autoregression with random tanh features (capability ``embed_nar``):

    .. math:: y_t = c + A x_{t-1} + V \tanh(P x_{t-1} + \beta) + e_t,\quad e_t\sim N(0, \operatorname{diag}\sigma^2),
              \quad x_{t-1} = (y_{t-1}, \dots, y_{t-p})

    ``c`` ``(D,)``, ``A`` ``(D, pD)``, ``P`` ``(M, pD)``, ``beta`` ``(M,)``, ``V`` ``(D, M)``, ``sigma`` ``(D,)``.
    ``x`` stacks the lags lag-major: entries ``k*D .. k*D+D-1`` hold :math:`y_{t-1-k}`. The initial state:
    ``y0`` ``(D,)`` the first observation and ``x0`` ``(pD,)`` the lags before it,
    :math:`x_{-1} = (y_{-1},\dots,y_{-p})` (backcast), with standard deviations ``y0_sd`` and ``x0_sd``.
    """

    c: torch.Tensor
    A: torch.Tensor
    P: torch.Tensor
    beta: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    y0: torch.Tensor
    y0_sd: torch.Tensor
    x0: torch.Tensor
    x0_sd: torch.Tensor

    @property
    def order(self) -> int:
        """:math:`p`, the number of lags."""
        return self.A.shape[1] // self.A.shape[0]

    @property
    def num_features(self) -> int:
        """:math:`M`, the number of tanh features."""
        return self.P.shape[0]


@dataclass(frozen=True)
class Simulation:
    """Draws from the model's prior.

    states: ``(B, T, H)`` hidden trajectories :math:`h_{0:T-1}`
    observations: ``(B, T, D)`` observations :math:`y_{0:T-1}`
    inputs: ``(B, T, I)`` or None
    """

    states: torch.Tensor
    observations: torch.Tensor
    inputs: torch.Tensor | None = None


def set_param(module, name: str, value: torch.Tensor) -> None:
    """Set the constrained value of ``module``'s own ``PyroParam`` ``name`` in place (no grad; the
    ``nn.Parameter`` object is kept, so optimiser state stays attached). For models' own capability code:
    inference never calls it with a name it did not get from the model."""
    constraint = module._pyro_params[name][0]
    unc = getattr(module, f"{name}_unconstrained")
    with torch.no_grad():
        new = transform_to(constraint).inv(value.detach().to(unc.dtype))
        unc.copy_(new.reshape(unc.shape))


def pack_params(module, names: tuple[str, ...]) -> torch.Tensor:
    """The constrained values of ``module``'s parameters ``names`` as one flat detached vector (for a model's
    ``weights`` capability)."""
    return torch.cat([getattr(module, n).detach().reshape(-1) for n in names])


@torch.no_grad()
def unpack_params(module, names: tuple[str, ...], vector: torch.Tensor) -> None:
    """Inverse of :func:`pack_params`: set the parameters ``names`` from a flat vector, in place."""
    cur = [getattr(module, n) for n in names]
    v = torch.as_tensor(vector, dtype=cur[0].dtype).reshape(-1)
    total = sum(c.numel() for c in cur)
    if v.numel() != total:
        raise ConfigurationError(f"vector has {v.numel()} entries; this model's weights() has {total}. Pass a "
                                 "vector like model.weights().")
    i = 0
    for n, c in zip(names, cur, strict=True):
        set_param(module, n, v[i:i + c.numel()].reshape(c.shape))
        i += c.numel()


def size_argument(owner: str, hidden_dim: Any, alias: str, alias_value: Any, *, check: bool = True) -> Any:
    """The size a suite model's constructor was given. Every single-size model takes it as ``hidden_dim``, its
    first positional parameter; the architecture's own name for it (``hidden_units``, ``reservoir_dim``,
    ``units``, ``latent_dim``, ``layer_sizes``) is accepted as a keyword alias with the same meaning, e.g.
    ``JordanSSM(4) == JordanSSM(hidden_dim=4) == JordanSSM(hidden_units=4)``. Giving both, or neither, is a
    :class:`~ppl_rnn.errors.ConfigurationError`. ``check``: also require an int >= 1."""
    if hidden_dim is not None and alias_value is not None:
        raise ConfigurationError(
            f"{owner}: hidden_dim and {alias} name the same argument (the model's size); found both "
            f"hidden_dim={hidden_dim!r} and {alias}={alias_value!r}. Pass only one, e.g. {owner}(hidden_dim=...).")
    value = hidden_dim if hidden_dim is not None else alias_value
    if value is None:
        raise ConfigurationError(f"{owner} needs its size, hidden_dim (alias {alias}); found none. Pass it first, "
                                 f"e.g. {owner}(4) or {owner}(hidden_dim=4).")
    if check and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{owner}: hidden_dim (alias {alias}) must be an int >= 1; found {value!r}.")
    return value


def input_at(inputs: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """``u_t`` from ``(B, T, I)`` inputs (None stays None)."""
    return None if inputs is None else inputs[:, t]


class StateSpaceModel(PyroModule):
    """Base class of every model. Subclasses set ``hidden_dim``, ``obs_dim``, ``input_dim`` and write
    :meth:`initial`, :meth:`transition` and :meth:`emission`.
    """

    hidden_dim: int
    obs_dim: int
    input_dim: int = 0
    #: helper methods each conditional is built from (overriding one counts as overriding the conditional
    #: for the defining-class rule of :mod:`ppl_rnn.capabilities`), e.g. ``{"transition": ("transition_mean",)}``
    conditional_parts: dict[str, tuple[str, ...]] = {}

    def __init__(self, hidden_dim: int, obs_dim: int, input_dim: int = 0, name: str = ""):
        super().__init__(name)
        for nm, v, lo in (("hidden_dim", hidden_dim, 1), ("obs_dim", obs_dim, 1), ("input_dim", input_dim, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigurationError(f"{nm} must be an int >= {lo}; found {v!r}.")
        self.hidden_dim = hidden_dim
        self.obs_dim = obs_dim
        self.input_dim = input_dim

    def __call__(self, *args, **kwargs):
        """Run the Pyro program on this model's own parameters, always: the call runs under Pyro's
        ``module_local_params`` (:func:`ppl_rnn.scope.library_scope`; the caller's setting is restored on exit),
        so the model's parameters are read from the module itself and never synchronised with Pyro's global
        parameter store. Without it, two models built in one session would share the store entries ``W``,
        ``r``, … under the same names, and the second model run by ``Predictive``, ``poutine.trace`` or
        ``pyro.infer.SVI`` would silently take the first one's values (or fail on a shape error).

        Every parameter access still emits a ``param`` message whose value carries ``.unconstrained()``, so
        ``poutine.trace(..., param_only=True)``, ``pyro.infer.SVI`` (any guide, ``AutoNormal`` included) and
        ``Predictive`` see and train the model's parameters as usual. A guide's own parameters live where the
        caller's setting puts them: under Pyro's default, two ``AutoNormal`` guides share the store names
        ``AutoNormal.*`` as in any Pyro program (``pyro.clear_param_store()`` between them, or build and run them
        under ``pyro.settings.context(module_local_params=True)``). A subclass's ``forward`` keeps its parameters
        on the module (``PyroParam``), where they belong to the instance; a bare ``pyro.param`` statement is
        global, as in any Pyro program."""
        local_param_ready(self)
        if pyro.settings.get("module_local_params"):
            return super().__call__(*args, **kwargs)
        # Enter the module's Pyro context under the caller's (global) setting first: entered in local mode,
        # Pyro would swap the global store for the module's own for the duration (``ParamStoreDict.scope``),
        # and that swap strips the ``.unconstrained`` handle from the global store's parameters, breaking a
        # caller's guide whose parameters live there (``SVI`` with ``AutoNormal`` under the default setting).
        with self._pyro_context, library_scope():
            return super().__call__(*args, **kwargs)

    # ---- the three conditionals ------------------------------------------------------------
    def initial(self, u0: torch.Tensor | None) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement initial(u0)")

    def transition(self, t: int, h_prev: torch.Tensor, u_t: torch.Tensor | None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement transition(t, h_prev, u_t)")

    def emission(self, t: int, h: torch.Tensor, u_t: torch.Tensor | None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement emission(t, h, u_t)")

    # ---- derived quantities ----------------------------------------------------------------
    def observation_log_prob(
        self, t: int, h: torch.Tensor, y_t: torch.Tensor, mask_t: torch.Tensor | None, u_t: torch.Tensor | None
    ) -> torch.Tensor:
        r""":math:`\log p(y_{t,o}\mid h_t)` over the observed entries (0 for a fully missing step)."""
        return masked_log_prob(self.emission(t, h, u_t), y_t, mask_t)

    def capability_applies(self, name: str) -> bool:
        """Whether the declared capability ``name`` holds for this instance (default True). Override to switch
        one off per instance (e.g. a linear form that exists only for one activation)."""
        return True

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self)

    def copy(self) -> StateSpaceModel:
        """A deep copy (fits return a fitted copy; the input model is never modified)."""
        return copy.deepcopy(self)

    # ---- the Pyro program ------------------------------------------------------------------
    def forward(self, observations=None, inputs=None, mask=None, *, num_steps=None, num_sequences=None):
        """The Pyro program. With ``observations=None`` it samples ``num_steps`` steps of
        ``num_sequences`` sequences from the prior (``y_t`` sites unobserved).

        ``observations`` may contain NaN (missing) or come with an explicit bool ``mask`` (True = observed).
        Returns the hidden trajectory ``(B, T, H)`` (with any leading vectorisation dims).
        """
        dtype = self.dtype
        if observations is not None:
            y, m = validate_observations(observations, obs_dim=self.obs_dim, dtype=dtype)
            if mask is not None:
                mask = torch.as_tensor(mask, dtype=torch.bool)
                if mask.dim() == 2:
                    mask = mask.unsqueeze(0)
                if mask.shape != y.shape:
                    raise DataError(f"mask has shape {tuple(mask.shape)}; expected {tuple(y.shape)} like observations.")
                m = m & mask
            B, T = y.shape[0], y.shape[1]
            if num_steps is not None and num_steps != T:
                raise DataError(f"num_steps={num_steps} but observations have {T} steps; drop num_steps.")
        else:
            if num_steps is None:
                raise DataError("forward() without observations needs num_steps (how many steps to sample).")
            T = int(num_steps)
            B = 1 if num_sequences is None else int(num_sequences)
            y = m = None
        u = validate_inputs(inputs, num_sequences=B, num_steps=T, input_dim=self.input_dim, dtype=dtype)
        hs = []
        sample_parameter_sites(self)  # a Bayesian model's parameter sites, outside the sequence plate
        with pyro.plate("sequences", B, dim=-1):
            h = None
            for t in pyro.markov(range(T)):
                u_t = input_at(u, t)
                if t == 0:
                    h = pyro.sample("h_0", self.initial(u_t))
                else:
                    h = pyro.sample(f"h_{t}", self.transition(t, h, u_t))
                hs.append(h)
                em = self.emission(t, h, u_t)
                if y is None:
                    pyro.sample(f"y_{t}", em)
                else:
                    m_t = m[:, t]
                    if bool(m_t.all()):
                        pyro.sample(f"y_{t}", em, obs=y[:, t])
                    elif bool(m_t.any()):
                        pyro.sample(f"y_{t}", PartiallyObserved(em, m_t), obs=y[:, t])
                    # a fully missing step has no observation site
        return torch.stack(hs, dim=-2)

    # ---- simulation ------------------------------------------------------------------------
    @torch.no_grad()
    def simulate(self, num_steps: int, num_sequences: int = 1, inputs=None, seed: int | None = None) -> Simulation:
        """Sample states and observations from the prior; vectorised over sequences."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ConfigurationError(f"num_steps must be a positive int; found {num_steps!r}.")
        if not isinstance(num_sequences, int) or num_sequences < 1:
            raise ConfigurationError(f"num_sequences must be a positive int; found {num_sequences!r}.")
        u = validate_inputs(inputs, num_sequences=num_sequences, num_steps=num_steps,
                            input_dim=self.input_dim, dtype=self.dtype)
        hs, ys = [], []
        with seeded(seed):
            h = None
            for t in range(num_steps):
                u_t = input_at(u, t)
                if t == 0:
                    h = self.initial_batched(u_t, (num_sequences,)).sample()
                else:
                    h = self.transition(t, h, u_t).sample()
                ys.append(self.emission(t, h, u_t).sample())
                hs.append(h)
        return Simulation(torch.stack(hs, 1), torch.stack(ys, 1), None if u is None else u[:, :num_steps])

    def initial_batched(self, u0: torch.Tensor | None, batch_shape: tuple[int, ...]) -> dist.Distribution:
        """``initial(u0)`` expanded to ``batch_shape`` (when it does not depend on inputs it is unbatched)."""
        d0 = self.initial(u0)
        return d0.expand(torch.Size(batch_shape)) if d0.batch_shape != torch.Size(batch_shape) else d0
