"""Pyro guides for :class:`~ppl_rnn.inference.svi.SVI`, each usable with any ``StateSpaceModel``."""

from .amortized import AmortizedGuide
from .base import StateGuide
from .ekf_guide import EKFGuide
from .markov_gaussian import MarkovGaussianGuide
from .mean_field import MeanFieldGuide

__all__ = ["StateGuide", "MeanFieldGuide", "MarkovGaussianGuide", "AmortizedGuide", "EKFGuide"]
