"""The model suite. Every model is a :class:`ppl_rnn.StateSpaceModel`."""

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
