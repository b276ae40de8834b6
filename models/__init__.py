"""The model suite. Every model is a :class:`ppl_rnn.StateSpaceModel`."""

from .ar import ARStateSpace
from .elman import ElmanSSM
from .linear_gaussian import LinearGaussianSSM

__all__ = ["ElmanSSM", "LinearGaussianSSM", "ARStateSpace"]
