"""Domain exceptions.

Every error says the rule that was broken, what was found, and how to fix it. Errors about
user input derive from :class:`ValueError` so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PplRnnError(Exception):
    """Base class of every ppl_rnn error."""


class DataError(PplRnnError, ValueError):
    """Malformed observations or inputs (wrong rank, shape, dtype, or non-finite values other than NaN)."""


class ConfigurationError(PplRnnError, ValueError):
    """A method or model was configured with an invalid option."""


class ModelCapabilityError(PplRnnError, TypeError):
    """A method needs something of the model that the model does not provide
    (for example a Gaussian transition for the EKF, or a linear-Gaussian form for Kalman)."""


class DegenerateWeightsError(PplRnnError, RuntimeError):
    """All particles of a sequence received zero weight at some time step."""

    def __init__(self, message: str, *, sequence: int | None = None, time_step: int | None = None):
        super().__init__(message)
        self.sequence = sequence
        self.time_step = time_step


class DivergenceError(PplRnnError, RuntimeError):
    """A fit produced non-finite parameters or objective. ``last_good`` holds the last finite result."""

    def __init__(self, message: str, *, iteration: int | None = None, last_good=None):
        super().__init__(message)
        self.iteration = iteration
        self.last_good = last_good
