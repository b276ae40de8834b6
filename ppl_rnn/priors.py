r"""Priors on a model's parameters, the Pyro way, and the unconstrained parameter space samplers move in.

A model is **Bayesian** when some of its parameters are :class:`pyro.nn.PyroSample` priors: the user assigns
``model.q = PyroSample(dist.HalfNormal(1.0))`` on a :class:`~pyro.nn.PyroModule` attribute (or calls
:func:`with_priors`). Its ``forward`` is then a Pyro program with one sample site per parameter (site name = the
dotted module path, e.g. ``"q"`` or ``"cell.W"``) besides the latent ``h_t`` and observed ``y_t`` sites, so Pyro's
own NUTS can sample :math:`p(\theta, h\mid y)` on a small problem (the oracle of the particle-MCMC samplers).

Samplers never read a parameter by its name: they get the priors from :func:`parameter_priors` (the PyroSample
declarations of the modules) and work in the unconstrained space of :class:`ParameterSpace`. With
:math:`T_i` = ``biject_to(prior_i.support)`` and :math:`\theta_i = T_i(z_i)`,

.. math:: \log \pi(z) = \sum_i \log p_i\big(T_i(z_i)\big) + \log\big|\det \partial T_i(z_i)/\partial z_i\big|

is the prior density of :math:`z\in\mathbb R^D` (``ParameterSpace.log_prior``), and a sampler targets
:math:`\log\pi(z) + \log p(y\mid \theta(z))`, the likelihood estimated by the ordinary particle filter on a
*fixed* model: a copy whose prior sites are plain tensors at :math:`\theta` (``ParameterSpace.load``), so the
filter's loop draws no parameter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_
from torch.distributions import biject_to

from .data import model_dtype
from .errors import ConfigurationError

#: attribute where :func:`with_priors` remembers the values the parameters had (the samplers' start point)
START_ATTR = "_ppl_rnn_prior_start"
#: a non-persistent 0-dim buffer that keeps a model's dtype when every parameter became a prior
DTYPE_BUFFER = "_ppl_rnn_dtype"
#: attribute marking a fixed model made by :meth:`ParameterSpace.fixed` (the names of its fixed sites)
FIXED_ATTR = "_ppl_rnn_fixed_sites"


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def _module(model, path: str):
    return model.get_submodule(path) if path else model


def _prior_of(module, prior):
    """A PyroSample's prior: a Distribution, or a callable of the module returning one."""
    if hasattr(prior, "sample") and hasattr(prior, "log_prob"):
        return prior
    if callable(prior):
        d = prior(module)
        if hasattr(d, "sample") and hasattr(d, "log_prob"):
            return d
    raise ConfigurationError(
        f"a PyroSample prior must be a distribution (or a callable of the module returning one); found {prior!r}. "
        "Assign e.g. model.q = PyroSample(dist.HalfNormal(1.0)).")


def parameter_priors(model) -> dict[str, dist.Distribution]:
    """``{site name: prior}`` of every :class:`~pyro.nn.PyroSample` parameter of ``model`` (module order; empty
    for a model without priors). Site names are dotted module paths, as in the model's Pyro trace."""
    out: dict[str, dist.Distribution] = {}
    for path, mod in model.named_modules():
        samples = mod.__dict__.get("_pyro_samples", None)
        if not samples:
            continue
        for attr, prior in samples.items():
            out[f"{path}.{attr}" if path else attr] = _prior_of(mod, prior)
    return out


def _default_prior(name: str, value: torch.Tensor, constraint, scale: float) -> dist.Distribution:
    shape = value.shape
    s = torch.tensor(scale, dtype=value.dtype)
    base = getattr(constraint, "base_constraint", constraint)  # independent(real, n) -> real
    if isinstance(base, type(constraints.real)) and type(base) is type(constraints.real):
        d = dist.Normal(torch.zeros((), dtype=value.dtype), s)
    elif isinstance(base, constraints.greater_than) and float(base.lower_bound) == 0.0:
        d = dist.HalfNormal(s)
    elif isinstance(base, constraints.interval):
        d = dist.Uniform(torch.as_tensor(base.lower_bound, dtype=value.dtype),
                         torch.as_tensor(base.upper_bound, dtype=value.dtype))
    else:
        raise ConfigurationError(
            f"with_priors: parameter {name!r} has constraint {constraint}; a default prior exists only for real, "
            f"positive and interval parameters. Pass priors={{{name!r}: <a distribution on that support>}} (or None "
            "to keep it fixed).")
    return _shaped(name, d, shape)


def _shaped(name: str, d: dist.Distribution, shape: torch.Size) -> dist.Distribution:
    """``d`` with batch+event shape ``shape``: a scalar-shaped prior is expanded and made one event."""
    full = d.batch_shape + d.event_shape
    if full == shape:
        return d
    if full == torch.Size() and len(d.event_shape) == 0:
        return d.expand(shape).to_event(len(shape)) if len(shape) else d
    raise ConfigurationError(
        f"with_priors: the prior of {name!r} has shape {tuple(full)} (batch {tuple(d.batch_shape)} + event "
        f"{tuple(d.event_shape)}); the parameter has shape {tuple(shape)}. Give a scalar prior (expanded for you) "
        "or one with that shape, e.g. dist.Normal(0., 1.).expand(shape).to_event(len(shape)).")


def with_priors(model, scale: float = 1.0, priors: Mapping[str, dist.Distribution | None] | None = None, *,
                others: str = "default"):
    r"""A copy of ``model`` whose parameters carry priors (``PyroSample``), without rewriting its class.

    Default (weakly informative) priors, with :math:`s` = ``scale``: :math:`N(0, s^2)` on a real parameter
    (weights, biases, means), :math:`\text{HalfNormal}(s)` on a positive one (noise scales),
    :math:`\text{Uniform}(a, b)` on an ``interval(a, b)`` one; elementwise, one event per parameter.

    ``priors``: ``{name: distribution}`` overrides (a scalar prior is expanded to the parameter's shape), and
    ``{name: None}`` keeps that parameter fixed at its value. ``others``: ``"default"`` gives every parameter not
    named in ``priors`` its default prior, ``"fixed"`` keeps them fixed. Names are those of
    ``model.named_parameters()`` without the ``_unconstrained`` suffix (e.g. ``"W"``, ``"q"``, ``"cell.weight"``).
    The parameters' current values are remembered as the samplers' start point
    (:meth:`ParameterSpace.to_unconstrained`). The input model is untouched.
    """
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ConfigurationError(f"with_priors: scale must be a positive number; found {scale!r}.")
    if others not in ("default", "fixed"):
        raise ConfigurationError(f"with_priors: others must be 'default' or 'fixed'; found {others!r}.")
    priors = dict(priors or {})
    new = copy.deepcopy(model)
    to_pyro_module_(new, recurse=True)
    found: dict[str, tuple] = {}  # name -> (module, attr, value, constraint)
    for path, mod in new.named_modules():
        pp = mod.__dict__.get("_pyro_params", {})
        for pname, _ in list(mod.named_parameters(recurse=False)):
            attr = pname[: -len("_unconstrained")] if pname.endswith("_unconstrained") and \
                pname[: -len("_unconstrained")] in pp else pname
            constraint = pp[attr][0] if attr in pp else constraints.real
            value = getattr(mod, attr).detach().clone()
            found[f"{path}.{attr}" if path else attr] = (mod, attr, value, constraint)
    unknown = sorted(set(priors) - set(found))
    if unknown:
        raise ConfigurationError(
            f"with_priors: priors names {unknown}, which are not parameters of {type(model).__name__}; its "
            f"parameters are {sorted(found)}.")
    start = dict(getattr(new, START_ATTR, {}) or {})
    for name, (mod, attr, value, constraint) in found.items():
        if name in priors:
            d = priors[name]
            if d is None:
                continue
            if not (hasattr(d, "sample") and hasattr(d, "log_prob")):
                raise ConfigurationError(f"with_priors: priors[{name!r}] must be a distribution or None; found {d!r}.")
            d = _shaped(name, d, value.shape)
        elif others == "default":
            d = _default_prior(name, value, constraint, float(scale))
        else:
            continue
        setattr(mod, attr, PyroSample(d))
        start[name] = value
    torch.nn.Module.__setattr__(new, START_ATTR, start)
    if found and not any(True for _ in new.parameters()) and DTYPE_BUFFER not in dict(new.named_buffers()):
        # no parameter left to carry the model's dtype (``model.dtype``, the dtype data are prepared in)
        new.register_buffer(DTYPE_BUFFER, torch.zeros((), dtype=next(iter(found.values()))[2].dtype),
                            persistent=False)
    return new


class ParameterSpace:
    r"""The unconstrained vector view :math:`z\in\mathbb R^D` of a Bayesian model's prior sites.

    ``names`` (site order of :func:`parameter_priors`), ``shapes`` (constrained shapes), ``dim`` (:math:`D`),
    ``priors``, ``transforms`` (:math:`T_i` = ``biject_to(support)``). ``z`` tensors are float64, batched over
    any leading dims. See the module docstring for the density.
    """

    def __init__(self, model):
        self.priors = parameter_priors(model)
        if not self.priors:
            raise ConfigurationError(
                f"{type(model).__name__} has no parameter priors (no PyroSample attributes), so there is no "
                "parameter posterior to sample. Give it priors: pr.with_priors(model) or "
                "model.q = pyro.nn.PyroSample(dist.HalfNormal(1.0)).")
        self.names = tuple(self.priors)
        self.shapes = {n: d.batch_shape + d.event_shape for n, d in self.priors.items()}
        self.transforms = {n: biject_to(d.support) for n, d in self.priors.items()}
        self._ushapes = {n: torch.Size(self.transforms[n].inverse_shape(self.shapes[n])) for n in self.names}
        self._sizes = [max(1, int(torch.Size(self._ushapes[n]).numel())) if len(self._ushapes[n]) else 1
                       for n in self.names]
        self.dim = int(sum(self._sizes))
        self._dtype = model_dtype(model)  # the dtype pr.infer prepares the data in

    def __repr__(self) -> str:
        return f"ParameterSpace(dim={self.dim}, names={list(self.names)})"

    # ---- vector <-> values ------------------------------------------------------------------
    def _split_z(self, z: torch.Tensor):
        if z.shape[-1] != self.dim:
            raise ConfigurationError(f"z has shape {tuple(z.shape)}; expected (..., {self.dim}) for this "
                                     f"ParameterSpace ({list(self.names)}).")
        lead = z.shape[:-1]
        out, i = {}, 0
        for n, size in zip(self.names, self._sizes, strict=True):
            out[n] = z[..., i:i + size].reshape(lead + self._ushapes[n])
            i += size
        return out

    def values(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""``{name: T(z_name)}`` constrained values ``(..., *shape)`` (differentiable in ``z``)."""
        return {n: self.transforms[n](u) for n, u in self._split_z(torch.as_tensor(z)).items()}

    def unconstrain(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`z` ``(..., D)`` float64 from constrained ``values`` ``{name: (..., *shape)}``."""
        parts = []
        for n in self.names:
            v = torch.as_tensor(values[n], dtype=torch.float64)
            u = self.transforms[n].inv(v)
            lead = u.shape[: u.dim() - len(self._ushapes[n])]
            parts.append(u.reshape(lead + (-1,)) if len(self._ushapes[n]) else u.unsqueeze(-1))
        return torch.cat(parts, -1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\pi(z)` ``(...,)`` (prior of :math:`T(z)` plus the log-Jacobian; -inf off the support)."""
        z = torch.as_tensor(z)
        lead = z.shape[:-1]
        total = torch.zeros(lead, dtype=z.dtype, device=z.device)
        for n, u in self._split_z(z).items():
            t = self.transforms[n]
            x = t(u)
            d = self.priors[n]
            lp = d.log_prob(x)
            lp = lp.reshape(lead + (-1,)).sum(-1) if lp.dim() > len(lead) else lp
            ladj = t.log_abs_det_jacobian(u, x)
            ladj = ladj.reshape(lead + (-1,)).sum(-1) if ladj.dim() > len(lead) else ladj
            total = total + lp.to(z.dtype) + ladj.to(z.dtype)
        return torch.nan_to_num(total, nan=-math.inf)

    # ---- models at theta ------------------------------------------------------------------------
    def to_unconstrained(self, model) -> torch.Tensor:
        r""":math:`z` ``(D,)`` float64 of ``model``: a fixed model made by this space gives its values; the Bayesian
        model gives its start values (remembered by :func:`with_priors`, else :math:`T(0)`)."""
        fixed = getattr(model, FIXED_ATTR, None)
        if fixed is not None:
            return self.unconstrain({n: _get(model, n).detach() for n in self.names})
        missing = [n for n in self.names if n not in parameter_priors(model)]
        if missing:
            raise ConfigurationError(f"ParameterSpace.to_unconstrained: the model has no prior sites {missing}; pass "
                                     "the Bayesian model this space was built from (or a fixed model it made).")
        start = getattr(model, START_ATTR, {}) or {}
        zero = self._split_z(torch.zeros(self.dim, dtype=torch.float64))
        vals = {n: (start[n] if n in start else self.transforms[n](zero[n])) for n in self.names}
        return self.unconstrain(vals)

    def fixed(self, model, z: torch.Tensor | None = None):
        """A copy of the Bayesian ``model`` whose prior sites are plain tensor buffers at :math:`T(z)` (``z`` None:
        the start values), in the model's dtype: the particle filter runs on it."""
        if getattr(model, FIXED_ATTR, None) is not None:
            new = copy.deepcopy(model)
        else:
            missing = [n for n in self.names if n not in parameter_priors(model)]
            if missing:
                raise ConfigurationError(f"ParameterSpace.fixed: the model has no prior sites {missing}; pass the "
                                         "Bayesian model this space was built from (or a fixed model it made).")
            new = copy.deepcopy(model)
            for n in self.names:
                path, attr = _split(n)
                mod = _module(new, path)
                delattr(mod, attr)
                mod.register_buffer(attr, torch.zeros(self.shapes[n], dtype=self._dtype))
            torch.nn.Module.__setattr__(new, FIXED_ATTR, self.names)
        return self.load(new, self.to_unconstrained(model) if z is None else z)

    def load(self, model, z: torch.Tensor):
        r"""The model at :math:`\theta = T(z)`. ``z`` ``(D,)``: a fixed model made by a ParameterSpace is updated
        **in place** (values set by assignment, so a ``z`` that requires grad leaves a differentiable model) and
        returned; the Bayesian model gives a fixed copy. ``z`` ``(K, D)``: a list of ``K`` fixed copies."""
        z = torch.as_tensor(z)
        if z.dim() == 2:
            return [self.fixed(model, zk) for zk in z]
        if z.dim() != 1:
            raise ConfigurationError(f"z has shape {tuple(z.shape)}; expected ({self.dim},) or (K, {self.dim}).")
        if getattr(model, FIXED_ATTR, None) is None:
            return self.fixed(model, z)
        for n, v in self.values(z).items():
            path, attr = _split(n)
            setattr(_module(model, path), attr, v.to(self._dtype))
        return model


def _get(model, name: str) -> torch.Tensor:
    path, attr = _split(name)
    return getattr(_module(model, path), attr)


def sample_parameter_sites(model) -> None:
    """Read every PyroSample parameter of ``model`` once (``StateSpaceModel.forward`` calls it before its sequence
    plate): inside the model's Pyro call each becomes one sample site, cached for the call, so it is not
    broadcast over the plate of sequences when a conditional first reads it."""
    for mod in model.modules():
        samples = mod.__dict__.get("_pyro_samples", None)
        for attr in samples or ():
            getattr(mod, attr)


def is_bayesian(model) -> bool:
    """Whether ``model`` has parameter priors (PyroSample sites)."""
    return bool(parameter_priors(model))


__all__ = ["with_priors", "parameter_priors", "ParameterSpace", "is_bayesian", "sample_parameter_sites"]
