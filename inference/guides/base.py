r"""Base class of the state-space guides: Pyro programs over the sites ``h_0 … h_{T-1}`` of
:meth:`ppl_rnn.StateSpaceModel.forward`.

A guide :math:`q_\phi(h_{0:T-1}\mid y)` is called with the model's own arguments
``(observations, inputs=None, mask=None)`` and samples every ``h_t`` inside ``pyro.plate("sequences", B, dim=-1)``
with event dim ``hidden_dim``, so it pairs with the model in ``pyro.infer.Trace_ELBO`` and friends, and
broadcasts over an outer particle plate (vectorised ELBO particles). Parameters are module-local
(``PyroParam`` / ``nn.Parameter``), never in Pyro's global param store.

Sizes come from the model (:meth:`StateGuide.bind`, or the ``model`` constructor argument) and, for
non-amortised guides with per-sequence, per-step parameters, from the data (:meth:`StateGuide.setup`,
called by :class:`~ppl_rnn.inference.svi.SVI` before the optimiser is built; or lazily on the first call,
in which case build the optimiser after that call).
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from ppl_rnn.data import validate_inputs, validate_observations
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.scope import library_scope, local_param_ready

from ..ekf import extended_kalman_smoother


class StateGuide(PyroModule):
    """Common plumbing of the guides (see module docstring). Subclasses write ``_build(B, T)`` (create
    parameters) and ``_sample_states(y, mask, u) -> list of h_t`` (call ``pyro.sample("h_{t}", ...)``)."""

    #: the guide's parameters do not depend on the number of sequences / steps
    amortized: bool = False
    #: "forward" if h_t is sampled given h_{t-1} (or independently), "backward" if given h_{t+1}
    sample_order: str = "forward"

    def __init__(self, model=None):
        super().__init__()
        self._model_ref: list = [None]  # a list, so the model is not registered as a submodule
        self._dims: tuple[int, int, int] | None = None
        self._dtype: torch.dtype | None = None
        self._shape: tuple[int, int] | None = None
        if model is not None:
            self.bind(model)

    def __call__(self, *args, **kwargs):
        """Run the guide with its parameters kept on the module (as :meth:`ppl_rnn.StateSpaceModel.__call__`)."""
        with library_scope():
            local_param_ready(self)
            return super().__call__(*args, **kwargs)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def model(self):
        return self._model_ref[0]

    def bind(self, model) -> StateGuide:
        """Attach the guide to ``model`` (its sizes and dtype; the EKF guide also reads its parameters)."""
        dims = (model.hidden_dim, model.obs_dim, model.input_dim)
        if self._dims is not None and self._dims != dims:
            raise ConfigurationError(
                f"{type(self).__name__} was built for (hidden_dim, obs_dim, input_dim)={self._dims}; the model has "
                f"{dims}. Use a fresh guide for a different model."
            )
        self._model_ref[0] = model
        self._dims = dims
        self._dtype = model.dtype
        self._on_bind(model)
        return self

    def _on_bind(self, model) -> None:
        """Hook: build amortised networks once the sizes are known."""

    def setup(self, model, data) -> StateGuide:
        """Bind to ``model`` and build the parameters for ``data`` (a :class:`ppl_rnn.data.Data`)."""
        self.bind(model)
        self._ensure_built(data.num_sequences, data.num_steps, data.observations, data.mask, data.inputs)
        return self

    def _ensure_built(self, B: int, T: int, y=None, mask=None, u=None) -> None:
        if self.amortized:
            return
        if self._shape is None:
            self._build(B, T)
            self._shape = (B, T)
            if y is not None:
                self._init_from_data(y, mask, u)
        elif self._shape != (B, T):
            raise DataError(
                f"{type(self).__name__} has per-sequence, per-step parameters built for (num_sequences, num_steps)="
                f"{self._shape}; found {(B, T)}. Use AmortizedGuide (or EKFGuide) to infer new data without refitting."
            )

    def _init_from_data(self, y, mask, u) -> None:
        """Hook: data-dependent initialisation of freshly built parameters (e.g. ``init="eks"``)."""

    def _eks_moments(self, y, mask, u):
        """Smoothed means, covariances and lag-one cross-covariances of the EKS at the bound model."""
        with torch.no_grad():
            _, s = extended_kalman_smoother(self.model, y, mask, u, method=f"{type(self).__name__}(init='eks')")
        return s.mean, s.cov, s.cross_cov

    def _build(self, B: int, T: int) -> None:  # pragma: no cover - abstract for non-amortised guides
        raise NotImplementedError

    def _sample_states(self, y, mask, u) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the Pyro program --------------------------------------------------------------------
    def forward(self, observations=None, inputs=None, mask=None, *, num_steps=None, num_sequences=None):
        import pyro

        if self._dims is None:
            raise ConfigurationError(
                f"{type(self).__name__} does not know the model's sizes yet; pass model= to its constructor, or call "
                "guide.bind(model) / guide.setup(model, data) first (SVI does this for you)."
            )
        if observations is None:
            raise DataError(f"{type(self).__name__} is a guide for the posterior given observations; got observations=None.")
        H, D, I = self._dims
        y, m = validate_observations(observations, obs_dim=D, dtype=self._dtype)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            m = m & (mask.unsqueeze(0) if mask.dim() == 2 else mask)
        B, T = y.shape[0], y.shape[1]
        u = validate_inputs(inputs, num_sequences=B, num_steps=T, input_dim=I, dtype=self._dtype)
        self._ensure_built(B, T, y, m, None if u is None else u[:, :T])
        with pyro.plate("sequences", B, dim=-1):
            hs = self._sample_states(y, m, None if u is None else u[:, :T])
        return torch.stack(hs, dim=-2)

    def extra_repr(self) -> str:
        return "" if self._dims is None else f"hidden_dim={self._dims[0]}, obs_dim={self._dims[1]}"
