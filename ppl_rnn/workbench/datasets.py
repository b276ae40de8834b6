r"""Data sets: real series from installed packages and the project's synthetic benchmark.

``load(name, **kw)`` returns a frozen :class:`Dataset` record. Every record holds ``values`` as a float
tensor ``(num_sequences, num_steps, obs_dim)`` (a single series has ``num_sequences = 1``), ``inputs``
``(num_sequences, num_steps, input_dim)`` or None, and its documentation: ``sampling_interval`` (in
``time_unit``), ``units``, ``source``, ``licence``, ``description``. ``record.split()`` cuts every sequence in
time into a training part and the test part that continues it (the convention of
:func:`ppl_rnn.workbench.evaluate.evaluate`: the test set continues the same sequences).

======================== ====================== ========= =================== ========================
name                     shape (B, T, D) [+ u]  interval  package (extra)     licence
======================== ====================== ========= =================== ========================
``santafe-laser``        (1, 10093, 1)          a.u.      reservoirpy (data)  MIT (as shipped)
``gas-furnace``          (1, 296, 1) + u (1)    9 s       timeseries-toolbox  MIT (as shipped)
``sunspots``             (1, 309, 1)            1 year    statsmodels         public domain
``respiration``          (1, 127475, 1) full    0.04 s    biopeaks==1.4.1     GPL-3.0 (read in place)
``unkelbach-synthetic``  (1, 1500, 1) 1000+500  1 step    none (simulated)    MIT (this project)
======================== ====================== ========= =================== ========================

Preprocessing without leakage. Every real loader takes ``train_steps=`` (an int; default: 80 % of the loaded
steps), the end of the training part. The scaling statistics (``scale=``: ``"none"`` raw values,
``"standard"`` mean and standard deviation, ``"robust"`` median and inter-quartile range) come from
``values[:, :train_steps]`` **only**, the record's ``train_steps`` is that cut (so ``record.split()`` cuts
there), and ``meta["stats_steps"]`` remembers it; splitting earlier than the statistics' end warns, since the
test part would then have informed the scaling. The record keeps ``offset`` and ``scale`` so that
``raw = values * scale + offset`` (``input_offset``/``input_scale`` for inputs). Defaults: ``"none"`` except
``respiration`` (``"robust"``). A test (``tests/core/test_datasets.py``) changes the test part of the raw
data and checks that the training part, its offset and its scale are unchanged bit for bit.

The breathing trace (``respiration``) is decimated from 1000 Hz to 25 Hz with **causal** anti-aliasing
FIR filters (8x then 5x; a sample depends on the raw signal up to its own time and never on a later raw
sample, so the training part cannot carry information about the test part; the filters' constant group
delay of 0.48 s is part of the signal as a real-time tracker would see it). The first second of the
recording (``_RESP_EDGE_S``: the filters' start-up transient; with a zero-phase filter sample 0 was
-2.86 against ~0 after scaling) is never returned: ``start_s`` must be at least 1 s. The loader takes a
window ``window=(start_s, length_s)`` (or ``start_s=`` with ``duration_s=`` / ``max_steps=``) and
``train_s=`` / ``train_steps=`` for the split. The first minutes of the recording are irregular
breathing; :data:`REGULAR_BREATHING_WINDOW` (730-910 s) holds regular cycles of about 3.3 s
(see its comment), and :data:`REGULAR_BREATHING_TRAIN_S` (the first 120 s of it) is the training part used
by the demo and ``benchmarks/real_tables.py``.

The real data sets come from optional packages (the ``data`` extra). A missing one raises
:class:`MissingExtraError` (an :class:`ImportError`) that names the extra: ``pip install 'ppl_rnn[data]'``.
Nothing GPL is copied into this repository: ``respiration`` is read from the installed biopeaks package.

The synthetic benchmark, ``unkelbach-synthetic``
-----------------------------------------------
Sequences drawn from one **fixed** stochastic Elman network (:class:`ppl_rnn.models.ElmanSSM`, tanh) in the
spirit of Unkelbach, Yi & Schmidhuber (2009):

.. math::
    h_0 \sim N(0, 0.5^2 I_4),\quad h_t = \tanh(W h_{t-1} + b) + e_t,\ e_t\sim N(0, 0.15^2 I_4),\quad
    y_t = C h_t + v_t,\ v_t \sim N(0, 0.1^2)

* hidden size 4, observation size 1, no inputs; process noise ``q = 0.15``, observation noise ``r = 0.1``,
  ``m0 = 0``, ``s0 = 0.5``, ``d = 0``.
* ``W = R blockdiag(1.2 rot(2π/20), 1.2 rot(2π/11)) Rᵀ`` with ``R`` a random orthogonal matrix: two rotations
  with gain 1.2 (periods of about 20 and 11 steps), which ``tanh`` limits to sustained nonlinear
  oscillations — the deterministic network neither collapses to a fixed point nor saturates (about 3-4 % of
  ``|h| > 0.95``). ``R``, ``b ~ 0.1 N(0, I)`` and ``C`` (a random unit vector) are drawn from a fixed
  generator (seed 0) and never change; ``seed=`` changes only the noise draw (initial state, process and
  observation noise).
* ``train_steps=1000`` then ``test_steps=500`` steps that continue the same sequence(s)
  (``num_sequences=1`` by default); ``record.split()`` cuts at ``train_steps``.
* Why it is the benchmark: the process noise diffuses the phase of the oscillation, so a deterministic
  network (zero process noise, the BPTT limit) loses track of the signal within a few periods while a
  filter of the stochastic model keeps it (measured in ``benchmarks/README.md``, "What the methods do on the
  synthetic benchmark"). ``std(y)`` is about 0.52, the one-step predictive
  standard deviation given the true state about 0.18, and the linear part of ``W`` has eigenvalues
  ``1.01 ± 0.65i`` and ``1.14 ± 0.37i``: smooth, periodic enough to be learnable from 1000 steps.
* The record carries the generating model (``true_model``, float dtype of the values) and the hidden
  states (``states`` ``(B, T, 4)``), so the true model's held-out log-evidence and the smoothing error
  are available as references.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppl_rnn.errors import ConfigurationError, DataError, PplRnnError
from ppl_rnn.rng import check_seed

__all__ = ["Dataset", "MissingExtraError", "load", "DATASETS", "REGULAR_BREATHING_WINDOW",
           "REGULAR_BREATHING_TRAIN_S"]

DATASETS = ("santafe-laser", "gas-furnace", "sunspots", "respiration", "unkelbach-synthetic")
_EXTRA = "pip install 'ppl_rnn[data]'"
_SCALES = ("none", "standard", "robust")


class MissingExtraError(PplRnnError, ImportError):
    """An optional package needed by a data set is not installed (install the ``data`` extra)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set (see the module docstring for the catalogue).

    name: registry name
    values: ``(B, T, D)`` float tensor, NaN = missing
    inputs: ``(B, T, I)`` float tensor or None
    sampling_interval: time between steps, in ``time_unit`` (None where unknown)
    time_unit: ``"s"``, ``"year"``, ``"step"``, ...
    units: what ``values`` measure (after scaling)
    input_units: what ``inputs`` measure (None without inputs)
    source, licence, description: provenance, terms, and what the series is
    offset, scale: ``raw = values * scale + offset`` (per obs dim)
    input_offset, input_scale: the same for inputs
    train_steps: default split point of :meth:`split` (None: 80 % of the steps)
    states: ``(B, T, H)`` true hidden states (synthetic data) or None
    true_model: the generating model (synthetic data) or None
    meta: any further facts (original sampling rate, column, ...)
    """

    name: str
    values: torch.Tensor
    inputs: torch.Tensor | None
    sampling_interval: float | None
    time_unit: str | None
    units: str
    source: str
    licence: str
    description: str
    input_units: str | None = None
    offset: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    input_offset: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    train_steps: int | None = None
    states: torch.Tensor | None = None
    true_model: Any = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return self.values.shape[0]

    @property
    def num_steps(self) -> int:
        return self.values.shape[1]

    @property
    def obs_dim(self) -> int:
        return self.values.shape[2]

    @property
    def input_dim(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[2]

    def __repr__(self) -> str:
        u = "" if self.inputs is None else f", inputs={tuple(self.inputs.shape)}"
        dt = "?" if self.sampling_interval is None else f"{self.sampling_interval:g} {self.time_unit}"
        return (f"Dataset({self.name!r}, values={tuple(self.values.shape)}{u}, sampling_interval={dt}, "
                f"units={self.units!r}, licence={self.licence!r})")

    def _slice(self, sl: slice, part: str) -> Dataset:
        return dataclasses.replace(
            self,
            values=self.values[:, sl].clone(),
            inputs=None if self.inputs is None else self.inputs[:, sl].clone(),
            states=None if self.states is None else self.states[:, sl].clone(),
            train_steps=None,
            description=f"{self.description} [{part}: steps {sl.start or 0}..{(sl.stop or self.num_steps) - 1}]",
        )

    def split(self, train_fraction: float | None = None, *, train_steps: int | None = None) -> tuple[Dataset, Dataset]:
        """Cut every sequence in time: ``(train, test)`` with ``test`` continuing ``train``.

        ``train_steps`` (an int) or ``train_fraction`` (in (0, 1)) choose the cut; by default the record's
        ``train_steps`` (synthetic data) or 80 % of the steps.
        """
        T = self.num_steps
        if train_steps is not None and train_fraction is not None:
            raise ConfigurationError("give train_fraction or train_steps, not both.")
        if train_steps is None:
            if train_fraction is None:
                train_steps = self.train_steps if self.train_steps is not None else int(round(0.8 * T))
            else:
                if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not (
                    0.0 < train_fraction < 1.0
                ):
                    raise ConfigurationError(f"train_fraction must be in (0, 1); found {train_fraction!r}.")
                train_steps = int(round(train_fraction * T))
        if isinstance(train_steps, bool) or not isinstance(train_steps, int) or not (1 <= train_steps < T):
            raise ConfigurationError(
                f"train_steps must be an int in [1, {T - 1}] (the series has {T} steps); found {train_steps!r}.")
        stats = self.meta.get("stats_steps")
        if stats is not None and train_steps < stats and self.meta.get("scale", "none") != "none":
            warnings.warn(
                f"{self.name}: splitting at step {train_steps}, but the scaling statistics were computed on steps "
                f"0..{stats - 1}, so the test part informed the preprocessing. Load with train_steps={train_steps} "
                "to keep the test part out of it.", UserWarning, stacklevel=2)
        return self._slice(slice(0, train_steps), "train"), self._slice(slice(train_steps, T), "test")

    train_test_split = split


# ---------------------------------------------------------------------------------------------
# helpers


def _require(module: str, dataset: str, package: str | None = None):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"load({dataset!r}) needs the optional package {package or module!r}, which is not installed "
            f"({e}). Install the data extra: {_EXTRA}"
        ) from e


def scaling_stats(x: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    r"""``(offset, scale)`` per last dim of ``x`` ``(T, D)`` (NaN skipped), for :math:`(x - \text{offset}) /
    \text{scale}`: ``"standard"`` mean and standard deviation, ``"robust"`` median and interquartile range,
    ``"none"`` 0 and 1. A zero scale becomes 1. Callers pass the training part only."""
    if how == "none":
        return np.zeros(x.shape[-1]), np.ones(x.shape[-1])
    if how == "standard":
        off, sc = np.nanmean(x, 0), np.nanstd(x, 0)
    else:
        q25, off, q75 = np.nanpercentile(x, [25, 50, 75], axis=0)
        sc = q75 - q25
    sc = np.where(sc > 0, sc, 1.0)
    return off, sc


def _train_cut(n: int, train_steps) -> int:
    """The training part's end for ``n`` loaded steps: ``train_steps`` or 80 % of them."""
    if train_steps is None:
        return max(1, min(n - 1, int(round(0.8 * n))))
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or not (1 <= train_steps < n):
        raise ConfigurationError(
            f"train_steps must be an int in [1, {n - 1}] (the loaded series has {n} steps); found {train_steps!r}.")
    return train_steps


def _record(name, values, inputs=None, *, scale="none", dtype=None, train_steps=None, meta=None,
            **fields) -> Dataset:
    """Build a record from numpy ``values`` (T, D) and ``inputs`` (T, I), scaled with statistics of
    ``values[:train_steps]`` only (default: the first 80 % of the steps)."""
    if scale not in _SCALES:
        raise ConfigurationError(f"scale must be one of {_SCALES}; found {scale!r}.")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ConfigurationError(f"dtype must be torch.float32 or torch.float64; found {dtype!r}.")
    values = np.asarray(values, dtype=np.float64)
    n_train = _train_cut(values.shape[0], train_steps)
    off, sc = scaling_stats(values[:n_train], scale)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    rec = dict(values=t((values - off) / sc)[None], offset=t(off), scale=t(sc), inputs=None)
    if inputs is not None:
        inputs = np.asarray(inputs, dtype=np.float64)
        ioff, isc = scaling_stats(inputs[:n_train], scale)
        rec.update(inputs=t((inputs - ioff) / isc)[None], input_offset=t(ioff), input_scale=t(isc))
    if scale != "none":
        fields["units"] = f"{fields['units']}, {scale}-scaled (raw = values * scale + offset)"
    meta = dict(meta or {}, stats_steps=n_train, scale=scale)
    return Dataset(name=name, **rec, train_steps=n_train, meta=meta, **fields)


# ---------------------------------------------------------------------------------------------
# the loaders


def _santafe(*, scale="none", dtype=None, train_steps=None) -> Dataset:
    rds = _require("reservoirpy.datasets", "santafe-laser", "reservoirpy")
    x = np.asarray(rds.santafe_laser(), dtype=np.float64).reshape(-1, 1)
    return _record(
        "santafe-laser", x, scale=scale, dtype=dtype, train_steps=train_steps, sampling_interval=None, time_unit=None,
        units="laser intensity (a.u., integer counts)",
        source="reservoirpy.datasets.santafe_laser() (Santa Fe Time Series Competition, data set A; "
               "Weigend & Gershenfeld 1993; copy from J. McNames' data sets)",
        licence="MIT (reservoirpy); the competition data are freely redistributed for research",
        description="Far-infrared NH3 laser in a chaotic state (Lorenz-like pulsations); 10093 steps, "
                    "a classical nonlinear forecasting benchmark.",
    )


def _gas_furnace(*, scale="none", dtype=None, train_steps=None) -> Dataset:
    _require("TimeSeriesSRC", "gas-furnace", "timeseries-toolbox")
    path = importlib.resources.files("TimeSeriesSRC").joinpath("TestData").joinpath("Series_J_Gas_Furnace.csv")
    if not path.is_file():
        raise DataError(f"gas-furnace: {path} is missing from the installed timeseries-toolbox; reinstall it "
                        f"({_EXTRA}).")
    import pandas as pd

    with path.open("r") as f:
        df = pd.read_csv(f)
    if list(df.columns) != ["InputGasRate", "CO2"]:
        raise DataError(f"gas-furnace: unexpected columns {list(df.columns)} in {path}; expected "
                        "['InputGasRate', 'CO2'].")
    return _record(
        "gas-furnace", df[["CO2"]].to_numpy(), df[["InputGasRate"]].to_numpy(), scale=scale, dtype=dtype,
        train_steps=train_steps,
        sampling_interval=9.0, time_unit="s",
        units="CO2 concentration in the outlet gas (%)",
        input_units="coded methane feed rate (0.6 - 0.04 x cubic feet per minute)",
        source="Box & Jenkins (1976) Time Series Analysis, Series J; file TestData/Series_J_Gas_Furnace.csv "
               "of the timeseries-toolbox package (import TimeSeriesSRC)",
        licence="MIT (timeseries-toolbox); textbook data",
        description="Gas furnace: input = methane feed rate, output = CO2 concentration; 296 steps at 9 s; "
                    "the classical input-output system-identification series.",
    )


def _sunspots(*, scale="none", dtype=None, train_steps=None) -> Dataset:
    sm = _require("statsmodels.datasets.sunspots", "sunspots", "statsmodels")
    df = sm.load_pandas().data
    return _record(
        "sunspots", df[["SUNACTIVITY"]].to_numpy(), scale=scale, dtype=dtype, train_steps=train_steps,
        sampling_interval=1.0, time_unit="year", units="yearly mean sunspot number (Wolf number)",
        source="statsmodels.datasets.sunspots (NOAA National Geophysical Data Center)",
        licence="public domain",
        description=f"Yearly sunspot numbers {int(df['YEAR'].iloc[0])}-{int(df['YEAR'].iloc[-1])} "
                    f"({len(df)} steps); the ~11-year solar cycle.",
        meta={"first_year": int(df["YEAR"].iloc[0])},
    )


_RESP_FS = 1000  # Hz, from the OpenSignals header
_RESP_TARGET = 25  # Hz
_RESP_COLUMN = 5  # 0-based: columns nSeq, I1, I2, O1, O2, A2 (RESPBIT), A3 (ECGBIT)
_RESP_EDGE_S = 1.0  # the causal filters' start-up transient (24 output samples = 0.96 s), never returned
_RESP_DELAY_S = 0.48  # the two FIR filters' constant group delay (80 + 50x8 raw samples)

#: ``(start_s, length_s)`` of a stretch of regular breathing in the recording: from 730 s (after a burst of
#: irregular breathing and movement at 640-725 s) cycles of about 3.3 s follow each other with a steady
#: amplitude until about 1020 s (one disturbed cycle near 940 s); the window is 730-910 s (three minutes). The first 240 s of recording are irregular
#: (varying depth and rate, movement artefacts at 53, 137-152 and 230-237 s).
REGULAR_BREATHING_WINDOW = (730.0, 180.0)
#: the training part of :data:`REGULAR_BREATHING_WINDOW`: its first 2 minutes (3000 steps at 25 Hz, about 36
#: breathing cycles); the remaining 60 s (1500 steps) are the test part.
REGULAR_BREATHING_TRAIN_S = 120.0


def _respiration_raw(path, nrows: int | None) -> np.ndarray:
    """The raw 1000 Hz belt signal (the first ``nrows`` samples); a separate function so that tests can
    change the raw data (the leakage test)."""
    import pandas as pd

    with path.open("r") as f:
        return pd.read_csv(f, sep="\t", comment="#", header=None, usecols=[_RESP_COLUMN], nrows=nrows,
                           dtype=np.float64, engine="c")[_RESP_COLUMN].to_numpy()


def _check_seconds(name, v, *, positive=False, minimum=0.0):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum or (
            positive and v == 0):
        what = "a positive" if positive else f"a number >= {minimum:g} of"
        raise ConfigurationError(f"{name} must be {what} seconds; found {v!r}.")
    return float(v)


def _respiration(*, window: tuple[float, float] | None = None, start_s: float | None = None,
                 duration_s: float | None = None, max_steps: int | None = None, train_s: float | None = None,
                 train_steps: int | None = None, scale="robust", dtype=None) -> Dataset:
    _require("biopeaks", "respiration", "biopeaks==1.4.1")
    path = importlib.resources.files("biopeaks").joinpath("tests").joinpath("testdata").joinpath("OSmontage0J.txt")
    if not path.is_file():
        raise DataError(f"respiration: {path} is not in the installed biopeaks; the data set needs "
                        f"biopeaks==1.4.1 (pip install 'biopeaks==1.4.1' or {_EXTRA}).")
    if window is not None:
        if start_s is not None or duration_s is not None:
            raise ConfigurationError("give window=(start_s, length_s) or start_s/duration_s, not both.")
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ConfigurationError(f"window must be (start_s, length_s) in seconds; found {window!r}.")
        start_s, duration_s = window
    start_s = _check_seconds("start_s", _RESP_EDGE_S if start_s is None else start_s, minimum=_RESP_EDGE_S)
    duration_s = _check_seconds("duration_s", duration_s, positive=True)
    train_s = _check_seconds("train_s", train_s, positive=True)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigurationError(f"max_steps must be a positive int; found {max_steps!r}.")
    if train_s is not None and train_steps is not None:
        raise ConfigurationError("give train_s or train_steps, not both.")
    if train_s is not None:
        train_steps = int(round(train_s * _RESP_TARGET))
    from scipy.signal import decimate

    stop_s = None
    if duration_s is not None:
        stop_s = start_s + duration_s
    if max_steps is not None:
        s2 = start_s + max_steps / _RESP_TARGET
        stop_s = s2 if stop_s is None else min(stop_s, s2)
    factor = _RESP_FS // _RESP_TARGET  # 40 raw samples per output step
    k0 = int(round(start_s * _RESP_TARGET))  # first output step (on the 25 Hz grid of the full recording)
    k_first = max(0, k0 - 10 * _RESP_TARGET)  # 10 s before it feed the causal filters (>= their 0.96 s memory)
    k_stop = None if stop_s is None else int(round(stop_s * _RESP_TARGET))
    nrows = None if k_stop is None else k_stop * factor
    raw = _respiration_raw(path, nrows)
    raw = raw[k_first * factor:]
    if raw.size < 2 * _RESP_FS + (k0 - k_first) * factor:
        raise ConfigurationError(f"start_s={start_s:g} leaves less than 2 s of the 5100 s recording.")
    # 1000 Hz -> 25 Hz in two anti-aliased causal FIR stages, 8 then 5: output j depends on raw[: 40 j + 1] only
    x = decimate(decimate(raw, 8, ftype="fir", zero_phase=False), 5, ftype="fir", zero_phase=False)
    x = x[k0 - k_first:]
    if k_stop is not None:
        x = x[: k_stop - k0]
    x = x.reshape(-1, 1)
    n = x.shape[0]
    return _record(
        "respiration", x, scale=scale, dtype=dtype, train_steps=train_steps,
        sampling_interval=1.0 / _RESP_TARGET, time_unit="s",
        units="breathing-belt signal (RESPBIT ADC counts)",
        source="biopeaks 1.4.1 test data tests/testdata/OSmontage0J.txt (BITalino/OpenSignals recording, "
               "channel A2 = RESPBIT, column 5), read from the installed package",
        licence="GPL-3.0 (biopeaks); read in place, never copied into ppl_rnn",
        description=f"Respiratory inductance belt, 85 min recorded at 1000 Hz, decimated to 25 Hz "
                    f"(causal anti-aliasing FIR, 8x then 5x, group delay {_RESP_DELAY_S:g} s); {n} steps "
                    f"({n / _RESP_TARGET:g} s) from t={start_s:g} s of the recording.",
        meta={"original_rate_hz": _RESP_FS, "column": _RESP_COLUMN, "start_s": start_s,
              "filter_delay_s": _RESP_DELAY_S},
    )


# the fixed synthetic network -------------------------------------------------------------------
SYNTHETIC_HIDDEN = 4
SYNTHETIC_PERIODS = (20.0, 11.0)
SYNTHETIC_GAINS = (1.2, 1.2)
SYNTHETIC_PROCESS_NOISE = 0.15
SYNTHETIC_OBS_NOISE = 0.1
SYNTHETIC_INIT_SCALE = 0.5
_SYNTHETIC_NETWORK_SEED = 0


def synthetic_network(dtype: torch.dtype | None = None):
    """The fixed generating network of ``unkelbach-synthetic`` (see the module docstring)."""
    from ppl_rnn.models import ElmanSSM

    H = SYNTHETIC_HIDDEN
    g = torch.Generator().manual_seed(_SYNTHETIC_NETWORK_SEED)
    R, _ = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))

    def rot(period, gain):
        th = 2 * math.pi / period
        return gain * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)

    W = R @ torch.block_diag(*(rot(p, k) for p, k in zip(SYNTHETIC_PERIODS, SYNTHETIC_GAINS, strict=True))) @ R.T
    b = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
    C = torch.randn(1, H, generator=g, dtype=torch.float64)
    C = C / C.norm()
    m = ElmanSSM(H, 1, activation="tanh", process_noise=SYNTHETIC_PROCESS_NOISE, obs_noise=SYNTHETIC_OBS_NOISE,
                 init_scale=SYNTHETIC_INIT_SCALE).double()
    m.W, m.b, m.C = W, b, C
    m.d = torch.zeros(1, dtype=torch.float64)
    m.m0 = torch.zeros(H, dtype=torch.float64)
    return m.to(torch.get_default_dtype() if dtype is None else dtype)


def _unkelbach(*, seed: int = 0, num_sequences: int = 1, train_steps: int = 1000, test_steps: int = 500,
               dtype=None) -> Dataset:
    seed = check_seed(seed)
    if seed is None:
        raise ConfigurationError("unkelbach-synthetic needs an int seed (the noise draw); found None.")
    for nm, v in (("num_sequences", num_sequences), ("train_steps", train_steps), ("test_steps", test_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigurationError(f"{nm} must be a positive int; found {v!r}.")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ConfigurationError(f"dtype must be torch.float32 or torch.float64; found {dtype!r}.")
    gen = synthetic_network(torch.float64)  # simulate in float64: the same numbers whatever the dtype
    sim = gen.simulate(train_steps + test_steps, num_sequences, seed=seed)
    H = SYNTHETIC_HIDDEN
    return Dataset(
        name="unkelbach-synthetic",
        values=sim.observations.to(dtype), inputs=None, states=sim.states.to(dtype),
        sampling_interval=1.0, time_unit="step", units="a.u.",
        source="simulated by ppl_rnn.workbench.datasets from a fixed stochastic Elman network (Unkelbach, Yi & "
               "Schmidhuber 2009 model class)",
        licence="MIT (generated by this project)",
        description=(f"Stochastic Elman network, tanh, hidden {H}, obs 1, process noise "
                     f"{SYNTHETIC_PROCESS_NOISE}, obs noise {SYNTHETIC_OBS_NOISE}; {num_sequences} sequence(s) of "
                     f"{train_steps} training + {test_steps} test steps; noise seed {seed}."),
        offset=torch.zeros(1, dtype=dtype), scale=torch.ones(1, dtype=dtype),
        train_steps=train_steps, true_model=gen.to(dtype),
        meta={"seed": seed, "periods": SYNTHETIC_PERIODS, "gains": SYNTHETIC_GAINS},
    )


_LOADERS = {
    "santafe-laser": _santafe,
    "gas-furnace": _gas_furnace,
    "sunspots": _sunspots,
    "respiration": _respiration,
    "unkelbach-synthetic": _unkelbach,
}


def load(name: str, **kw) -> Dataset:
    """Load a data set by name (see the module docstring for names, options and provenance).

    Options: ``scale=``, ``dtype=`` and ``train_steps=`` (the training part, whose statistics alone scale
    the series) for every real series; ``window=(start_s, length_s)``, ``start_s=``, ``duration_s=``,
    ``max_steps=``, ``train_s=`` for ``respiration``; ``seed=``, ``num_sequences=``, ``train_steps=``, ``test_steps=``, ``dtype=`` for
    ``unkelbach-synthetic``.
    """
    if name not in _LOADERS:
        raise ConfigurationError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}.")
    loader = _LOADERS[name]
    try:
        return loader(**kw)
    except TypeError as e:
        import inspect

        if "unexpected keyword" in str(e):
            opts = [p for p in inspect.signature(loader).parameters]
            raise ConfigurationError(f"load({name!r}) got an unknown option ({e}); its options are {opts}.") from e
        raise
