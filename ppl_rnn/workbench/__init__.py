"""The user layer (floor 3): evaluate (the one yardstick), compare, ensembles (pooled predictives), forecast, paired forecast comparisons, choosing among fits, reports, ArviZ export,
datasets, plots, the CLI and the demo. It may import everything below it; nothing below imports it.
``plots`` imports matplotlib, so it is loaded only when used (``ppl_rnn.workbench.plots``)."""

from . import datasets
from .arviz_export import to_inference_data
from .compare import compare
from .ensemble import Ensemble, fit_ensemble
from .evaluate import evaluate
from .forecasting import forecast
from .paired import forecast_difference
from .selection import select_by_forecast

__all__ = ["datasets", "to_inference_data", "compare", "evaluate", "forecast", "forecast_difference",
           "select_by_forecast", "Ensemble", "fit_ensemble"]
