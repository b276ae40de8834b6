"""The model suite. Every model is a :class:`ppl_rnn.StateSpaceModel`; each module's docstring gives its equations
and their source.

=========================  ==================================================================================
``ElmanSSM``               Elman network with process and observation noise (Unkelbach, Yi & Schmidhuber 2009)
``JordanSSM``              context fed back from the output layer; state = (hidden, context)
``EchoStateSSM``           fixed sparse random reservoir (spectral radius, leak rate); readout + noise trained,
                           closed-form M-step
``GRUSSM``, ``LSTMSSM``    gated cells as stochastic transitions (LSTM state = (h, c); noise on both or on h)
``CTRNNSSM``               Euler-discretised continuous-time network with per-neuron time constants
``MultipleTimescalesSSM``  MTRNN: a CTRNN with fast and slow groups
``SecondOrderSSM``         multiplicative input-by-state weights w_ijk
``StackedSSM``             cascaded recurrent layers (recurrent multilayer perceptron), noise in every layer
``DeepMarkovSSM``          gated transition and MLP emission (Krishnan et al.); Gaussian, Bernoulli or Student-t
``LinearGaussianSSM``      the exact linear-Gaussian model (Kalman oracle)
=========================  ==================================================================================

:data:`MODELS` maps a short name to each class (for listings such as ``ppl-rnn fit --model NAME``).

One constructor convention: ``Model(hidden_dim, obs_dim=1, input_dim=0, *, ...)``. ``hidden_dim`` is the size as
the architecture counts it (hidden units, reservoir units, LSTM units, latent dimensions, layer sizes), and the
architecture's own name for it stays a keyword alias (``JordanSSM(hidden_units=4)``, ``EchoStateSSM(reservoir_dim=50)``,
``LSTMSSM(units=4)``, ``DeepMarkovSSM(latent_dim=4)``, ``StackedSSM(layer_sizes=(4, 2))``); passing both is a
:class:`~ppl_rnn.errors.ConfigurationError`. The state dimension, the attribute ``model.hidden_dim``, can be larger:
``n + obs_dim`` for Jordan (context units), ``2n`` for the LSTM (``h``, ``c``), the sum of the layer sizes for the
stacked network (an int ``N`` there means layers ``(N, max(1, N // 2))``). The two-size MTRNN takes
``(fast_dim, slow_dim)`` or ``hidden_dim=N`` (``max(1, N // 3)`` slow neurons).

Every model runs on its own parameters under plain Pyro (``Predictive``, ``poutine``, ``pyro.infer.SVI``), however
many models a session builds: see :meth:`ppl_rnn.StateSpaceModel.__call__`.
"""

from .ar import ARStateSpace
from .ctrnn import CTRNNSSM, MultipleTimescalesSSM
from .deep_markov import DeepMarkovSSM
from .echo_state import EchoStateSSM
from .elman import ElmanSSM
from .gated import GRUSSM, LSTMSSM
from .jordan import JordanSSM
from .linear_gaussian import LinearGaussianSSM
from .second_order import SecondOrderSSM
from .stacked import StackedSSM

#: the recurrent model suite by name (for listings, e.g. ``ppl-rnn fit --model NAME``); each value is the class
MODELS = {
    "elman": ElmanSSM,
    "jordan": JordanSSM,
    "echo_state": EchoStateSSM,
    "gru": GRUSSM,
    "lstm": LSTMSSM,
    "ctrnn": CTRNNSSM,
    "mtrnn": MultipleTimescalesSSM,
    "second_order": SecondOrderSSM,
    "stacked": StackedSSM,
    "deep_markov": DeepMarkovSSM,
    "linear_gaussian": LinearGaussianSSM,
}

__all__ = ["ElmanSSM", "LinearGaussianSSM", "ARStateSpace", "JordanSSM", "EchoStateSSM", "GRUSSM", "LSTMSSM",
           "CTRNNSSM", "MultipleTimescalesSSM", "SecondOrderSSM", "StackedSSM", "DeepMarkovSSM", "MODELS"]
