"""The ``ppl-rnn`` command line: simulate, fit, forecast, compare, demo, models.

Every command writes a run directory (netCDF results, PNG figures, ``report.md``) and prints a readable
table. Bad arguments give a one-line error and exit status 2. Ctrl-C stops cleanly: finished comparison
cells stay in ``<out>/cells`` and a rerun of the same command resumes from them.

The method names (``--method`` / ``--methods`` / ``type =`` in a TOML config) are the training and reference
methods of the one registry, :mod:`ppl_rnn.inference.registry` (``ppl-rnn --help`` lists them). The model
names (``--model`` / ``model = "..."`` in a TOML config) are those of :data:`ppl_rnn.models.MODELS`
(``ppl-rnn models`` lists them, each with the first sentence of its class docstring); ``compare`` takes several
(``--model elman,gru`` or ``--model elman --model gru``) and then compares model x method x seed.

Data: ``fit``, ``forecast`` and ``compare`` scale the series by default with statistics of the **training part
only** (``--scale standard``: :math:`(y - \\bar y_{train}) / s_{train}`, the statistics of
``ppl_rnn.workbench.datasets``; ``--scale none`` keeps raw units) and say so in the report. ``fit`` and
``forecast`` put the fitted model beside persistence and AR by AIC (:data:`FIT_REFERENCES`, scored exactly by the
same yardstick) with :func:`ppl_rnn.workbench.report.verdict`'s sentence on whether it beats them (± the
yardstick's SE, paired CRPS per lead), and give log-evidence, RMSE and CRPS also in raw units:
:math:`\\log p_{raw} = \\log p_{scaled} - \\sum_d \\log s_d` per step, errors times :math:`s`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

from ppl_rnn.errors import ConfigurationError, PplRnnError
from ppl_rnn.inference.registry import describe, is_reference, make_method, method_names

__all__ = ["main", "build_parser", "CLI_KINDS", "make_model", "model_names", "describe_models"]


# ---------------------------------------------------------------------------------------------
# method names: the one registry, ppl_rnn.inference.registry (shared with the demo, compare configs, notebooks)

#: the method kinds the fit/forecast/compare commands accept
CLI_KINDS = ("train", "reference")
#: methods compared when neither --methods nor a config names them
DEFAULT_COMPARE = ("mcem", "svi_markov_gaussian", "bptt", "linear_ar", "persistence")


def _make(name: str, *, progress: bool = False, **options):
    """A method by its registry name, for the commands: only training and reference methods."""
    if name in method_names() and name not in method_names(CLI_KINDS):
        raise ConfigurationError(f"{name!r} is a filter/smoother, not a training method; choose one of: "
                                 f"{', '.join(method_names(CLI_KINDS))}.")
    return make_method(name, progress=progress, **options)


# ---------------------------------------------------------------------------------------------
# model names: ppl_rnn.models.MODELS (name -> class); how the CLI's model options map onto each class

#: per model: what ``--hidden N`` sets, and its default N (the state dimension follows from it)
MODEL_SIZES = {
    "elman": ("hidden units", 4),
    "jordan": ("hidden units (plus one context unit per observed dimension)", 4),
    "echo_state": ("reservoir units", 20),
    "gru": ("hidden units", 4),
    "lstm": ("units (state (h, c): 2N)", 2),
    "ctrnn": ("neurons", 4),
    "mtrnn": ("neurons, max(1, N//3) of them slow (N >= 2)", 6),
    "second_order": ("hidden units", 4),
    "stacked": ("bottom-layer units, a second layer of max(1, N//2)", 4),
    "deep_markov": ("latent dimensions", 4),
    "linear_gaussian": ("state dimensions", 2),
}
_ALL = frozenset(MODEL_SIZES)
#: the CLI's model options beyond --hidden / --model-seed, and the models that take each
MODEL_OPTIONS = {
    "activation": frozenset({"elman", "jordan", "second_order", "stacked"}),
    "weight_init": frozenset({"elman"}),
    "layers": frozenset({"stacked"}),
    "emission": frozenset({"deep_markov"}),
    "process_noise": _ALL - {"deep_markov"},
    "obs_noise": _ALL,
    "weight_scale": frozenset({"elman", "jordan", "gru", "lstm", "ctrnn", "mtrnn", "second_order",
                               "stacked"}),  # ppl-rnn simulate's --weight-scale
}
#: the [model] keys of a TOML config
MODEL_KEYS = ("name", "hidden", "model_seed", *MODEL_OPTIONS)
#: the architectures ``--model auto`` searches over (one start search, :meth:`Recommended.fit_models`)
AUTO_MODELS = ("elman", "gru", "linear_gaussian")

#: defaults that differ from the class's own: the Elman network keeps the CLI's long-standing start
_CLI_DEFAULTS = {"elman": {"process_noise": 0.3, "obs_noise": 0.3}}


def _registry():
    from ppl_rnn.models import MODELS

    return MODELS


def model_names(text) -> list[str]:
    """Model names from ``"gru"``, ``"elman,gru"`` or a list of such; an unknown name is a
    :class:`ConfigurationError` saying ``Did you mean ...?`` and listing the choices."""
    items = [text] if isinstance(text, str) else list(text or [])
    names = [n.strip() for t in items for n in str(t).split(",") if n.strip()]
    known = list(_registry())
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n.lower().replace("-", "_"), known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown model {n!r}.{hint} Choose one of: {', '.join(known)} "
                                     "(ppl-rnn models lists them).")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigurationError(f"model {dup[0]!r} is named twice; name each model once.")
    return names


def _summary(cls) -> str:
    """The first sentence of a class docstring, without its '(module docstring)' pointer."""
    doc = " ".join((cls.__doc__ or cls.__name__).split())
    first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0]
    return re.sub(r"\s*\((see )?(the )?module docstring\)", "", first).rstrip(".")


def describe_models() -> str:
    """One line per model of the suite: name, class, first sentence of its docstring, what --hidden sets."""
    reg = _registry()
    w = max(map(len, reg)) + 2
    lines = []
    for name, cls in reg.items():
        size, n = MODEL_SIZES.get(name, ("hidden dimensions", 4))
        opts = [f"--{k.replace('_', '-')}" for k, takers in MODEL_OPTIONS.items() if name in takers
                and k != "weight_scale"]
        lines.append(f"  {name:<{w}}{cls.__name__}: {_summary(cls)}")
        lines.append(f"  {'':<{w}}--hidden N = {size} (default {n}); also {', '.join(opts)}")
    return "\n".join(lines)


def make_model(name: str, options=None, obs_dim: int = 1, *, strict: bool = True):
    """The model ``name`` of :data:`ppl_rnn.models.MODELS` with the CLI's model options (``hidden``,
    ``model_seed`` and :data:`MODEL_OPTIONS`; a dict or an argparse namespace; ``None`` = the model's default).

    ``strict``: an option the model does not take is an error (False: such options are ignored; ``compare``
    with several models hands each shared option only to the models that take it)."""
    names = model_names(name)
    if len(names) != 1:
        raise ConfigurationError(f"this command takes one model; found {', '.join(names) or 'none'} (compare takes "
                                 "several).")
    name = names[0]
    g = {k: v for k, v in (options if isinstance(options, dict) else vars(options or argparse.Namespace())).items()
         if v is not None}
    for k in MODEL_OPTIONS:
        if strict and k in g and name not in MODEL_OPTIONS[k]:
            raise ConfigurationError(f"--{k.replace('_', '-')} does not apply to model {name!r}; it applies to: "
                                     f"{', '.join(m for m in MODEL_SIZES if m in MODEL_OPTIONS[k])}.")
    g = {**_CLI_DEFAULTS.get(name, {}), **g}
    kw = {k: g[k] for k in MODEL_OPTIONS if k in g and name in MODEL_OPTIONS[k] and k != "layers"}
    for k in ("process_noise", "obs_noise", "weight_scale"):
        if k in kw:
            kw[k] = float(kw[k])
    if name == "elman" and "weight_scale" not in kw:
        kw["weight_scale"] = 1.1 if kw.get("weight_init") == "rotation" else 0.9
    seed = int(g.get("model_seed", 1))
    n = int(g.get("hidden", MODEL_SIZES.get(name, ("", 4))[1]))
    cls = _registry()[name]
    if name == "mtrnn":
        if n < 2:
            raise ConfigurationError(f"--hidden for mtrnn is fast + slow neurons and must be >= 2; found {n}.")
        return cls(n - max(1, n // 3), max(1, n // 3), obs_dim=obs_dim, seed=seed, **kw)
    if name == "stacked":
        layers = g.get("layers")
        if strict and layers is not None and "hidden" in g:
            raise ConfigurationError("give stacked either --hidden or --layers, not both.")
        return cls(tuple(int(x) for x in (layers or (n, max(1, n // 2)))), obs_dim=obs_dim, seed=seed, **kw)
    if name == "linear_gaussian":
        import torch

        eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
        cov = {}
        if "process_noise" in kw:
            cov["Q"] = kw["process_noise"] ** 2 * eye(n)
        if "obs_noise" in kw:
            cov["R"] = kw["obs_noise"] ** 2 * eye(obs_dim)
        return cls(n, obs_dim, seed=seed, **cov)
    return cls(n, obs_dim=obs_dim, seed=seed, **kw)


# ---------------------------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _die(msg: str) -> None:
    sys.stderr.write(f"ppl-rnn: error: {msg}\n")
    raise SystemExit(2)


def _ints(text: str) -> list[int]:
    try:
        v = [int(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,10; found {text!r}") from None
    if not v:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return v


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _settings(pairs) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            _die(f"--set expects key=value (e.g. --set num_iterations=20); found {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="unkelbach-synthetic",
                   help="a data set name (unkelbach-synthetic, respiration, sunspots, santafe-laser, gas-furnace) or "
                        "a .csv/.npy file with one column per observed dimension (default: %(default)s)")
    g.add_argument("--data-seed", type=int, default=0, help="noise seed of the synthetic data set (default: 0)")
    g.add_argument("--max-steps", type=int, default=None, help="use only the first N steps of the series")
    g.add_argument("--train-steps", type=int, default=None,
                   help="training steps; the rest is the held-out test part (default: the data set's split, or 80%%)")
    g.add_argument("--scale", choices=("standard", "robust", "none"), default="standard",
                   help="scale the series by the training part's mean and standard deviation (standard), median and "
                        "inter-quartile range (robust), or keep raw units (none); the statistics come from the "
                        "training steps only, and scores are also reported in raw units (default: %(default)s)")


def _add_model_args(p, several: bool = False):
    g = p.add_argument_group("model (ppl_rnn.models; `ppl-rnn models` lists them; an option a model does not take is "
                             "an error)")
    if several:
        g.add_argument("--model", action="append", default=None, metavar="NAME[,NAME...]",
                       help="model name(s), repeatable or comma-separated; several models compare model x method x "
                            "seed (default: elman)")
    else:
        g.add_argument("--model", default="elman", metavar="NAME",
                       help="model name (default: %(default)s; see `ppl-rnn models`); fit and forecast also take "
                            "`auto`: one start search over " + ", ".join(AUTO_MODELS) + " with the default method")
    g.add_argument("--hidden", type=int, default=None,
                   help="the model's size: hidden units, reservoir units, ... (default per model; see `ppl-rnn models`)")
    g.add_argument("--activation", choices=("tanh", "identity"), default=None,
                   help="elman, jordan, second_order, stacked (default: tanh)")
    g.add_argument("--model-seed", type=int, default=1, help="seed of the random initial weights (default: 1)")
    g.add_argument("--process-noise", type=float, default=None,
                   help="initial process-noise scale q (default: 0.3 for elman, the model's own default otherwise)")
    g.add_argument("--obs-noise", type=float, default=None,
                   help="initial observation-noise scale r (default: 0.3 for elman, the model's own default otherwise)")
    g.add_argument("--weight-init", choices=("gaussian", "rotation"), default=None,
                   help="elman: random recurrent weights gaussian (scale 0.9/sqrt(hidden)) or rotation (a random "
                        "rotation near the identity, gain 1.1: slow oscillatory modes, what the synthetic benchmark "
                        "trains from; see ElmanSSM) (default: gaussian)")
    g.add_argument("--layers", type=_ints, default=None, metavar="N1,N2,...",
                   help="stacked: layer sizes, bottom first (default: --hidden N and N//2)")
    g.add_argument("--emission", choices=("gaussian", "student_t", "bernoulli"), default=None,
                   help="deep_markov: the emission family (default: gaussian)")


def _add_yardstick_args(p, defaults: bool = True):
    p.add_argument("--se-tol", type=float, default=0.01 if defaults else None,
                   help="target Monte Carlo standard error of the held-out log-evidence per step, nats (default: 0.01)")
    p.add_argument("--max-particles", type=int, default=32000 if defaults else None,
                   help="cap of the yardstick's particles per run (default: 32000)")


def _add_out(p, cmd):
    p.add_argument("--out", default=None, help=f"run directory (default: runs/{cmd}-<timestamp>)")


def _methods_help() -> str:
    return "method names (ppl_rnn.inference.registry):\n" + describe(CLI_KINDS)


def _models_help() -> str:
    return "model names (ppl_rnn.models.MODELS; details: ppl-rnn models): " + ", ".join(_registry())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppl-rnn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stochastic recurrent networks as Pyro programs: simulate, fit, forecast and compare inference "
                    "methods and models (architectures) with one yardstick (held-out log-evidence by a particle filter, forecast "
                    "CRPS and interval coverage).",
        epilog="examples:\n"
               "  ppl-rnn demo                                   # the full comparison (< 10 min on 2 cores)\n"
               "  ppl-rnn demo --quick                           # a 1-minute version\n"
               "  ppl-rnn simulate --hidden 4 --steps 500 --out runs/sim\n"
               "  ppl-rnn fit --data unkelbach-synthetic --method mcem --set num_iterations=10\n"
               "  ppl-rnn fit --model gru --hidden 6 --method mcem --set num_iterations=10\n"
               "  ppl-rnn models                                 # the model suite, one line each\n"
               "  ppl-rnn forecast --data respiration --max-steps 2000 --method ekf_em --horizon 15\n"
               "  ppl-rnn compare --methods mcem,svi_markov_gaussian,bptt,linear_ar --seeds 0,1 --horizons 1,10\n"
               "  ppl-rnn compare --model elman,gru,echo_state --methods mcem,linear_ar --seeds 0,1\n"
               "  ppl-rnn compare --config comparison.toml --executor dask\n\n" + _models_help() + "\n\n" +
               _methods_help() +
               "\n\nEvery command writes a run directory with netCDF results, PNG figures and report.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("simulate", help="draw states and observations from a random network of the suite",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Simulate a model of the suite with random weights; by default a stochastic "
                                   "Elman network h_t = tanh(W h_{t-1} + b) + e_t, y_t = C h_t + d + v_t.",
                       epilog="examples:\n  ppl-rnn simulate --hidden 4 --steps 500 --sequences 2 --seed 0 --out runs/sim\n"
                              "  ppl-rnn simulate --model lstm --steps 300\n\n" + _models_help())
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=500, help="time steps (default: 500)")
    p.add_argument("--sequences", type=int, default=1, help="independent sequences (default: 1)")
    p.add_argument("--obs-dim", type=int, default=1, help="observed dimensions (default: 1)")
    p.add_argument("--weight-scale", type=float, default=None,
                   help="scale of the recurrent weights (default: 1.5 for elman, the model's own default otherwise)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    _add_out(p, "simulate")

    for name, hlp, extra in (
        ("fit", "train the model (by default with the recommended start search) and score it on the held-out part "
                "beside persistence and AR by AIC",
         "  ppl-rnn fit --data santafe-laser --max-steps 1500 --train-steps 1000\n"
         "  ppl-rnn fit --data santafe-laser --max-steps 1500 --train-steps 1000 --model auto\n"
         "  ppl-rnn fit --data unkelbach-synthetic --method svi_markov_gaussian --set num_steps=300 --set lr=0.02\n"
         "  ppl-rnn fit --model echo_state --hidden 30 --method mcem --set num_iterations=20"),
        ("forecast", "train, then forecast the steps after the training part with intervals (in the data's units)",
         "  ppl-rnn forecast --data respiration --max-steps 2000 --method ekf_em --horizon 15"),
    ):
        p = sub.add_parser(name, help=hlp, description=hlp[0].upper() + hlp[1:] + ".",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="example:\n" + extra + "\n\n" + _models_help() + "\n\n" + _methods_help())
        _add_data_args(p)
        _add_model_args(p)
        p.add_argument("--method", default="recommended", metavar="NAME",
                       help="method name (default: recommended, what pr.fit(model, y) runs: a start search chosen on "
                            "a held-back tail of the training part, never silently below AR by AIC; see the list "
                            "below)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option, repeatable "
                       "(e.g. --set num_iterations=20)")
        p.add_argument("--seed", type=int, default=0, help="seed of the fit (default: 0)")
        p.add_argument("--num-particles", type=int, default=500,
                       help="particles per run in the yardstick filter's first round (raised until its standard "
                            "error is below --se-tol; default: 500)")
        _add_yardstick_args(p)
        p.add_argument("--horizon" if name == "forecast" else "--horizons", type=int if name == "forecast" else _ints,
                       default=15 if name == "forecast" else [1, 10],
                       help="forecast steps (default: 15)" if name == "forecast" else "forecast leads (default: 1,10)")
        _add_out(p, name)

    p = sub.add_parser("compare", help="fit every method with every seed and score all with one yardstick",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare inference methods on one model or several (--model elman,gru): each "
                                   "model, method and seed fits a fresh copy; each fit is scored by the same "
                                   "evaluator. Finished cells are saved at once; a "
                                   "rerun resumes.",
                       epilog="examples:\n"
                              "  ppl-rnn compare --methods mcem,meanfield_em,svi_markov_gaussian,ekf_em,bptt,linear_ar,"
                              "persistence\n"
                              "  ppl-rnn compare --model elman,gru,lstm --hidden 4 --methods mcem,linear_ar\n"
                              "  ppl-rnn compare --config comparison.toml --executor dask\n\n"
                              "a TOML config (command-line flags override it):\n"
                              "  [data]\n  name = \"unkelbach-synthetic\"\n  train_steps = 1000\n  scale = \"standard\""
                              "   # or \"none\" (raw units)\n"
                              "  [model]            # options shared by the models\n  name = [\"elman\", \"gru\"]"
                              "   # or a top-level model = \"gru\" (without a [model] table)\n  hidden = 4\n"
                              "  [models.\"GRU-8\"]   # optional: a labelled model with its own options\n"
                              "  type = \"gru\"\n  hidden = 8\n"
                              "  [compare]\n  seeds = [0, 1]\n  horizons = [1, 5, 10]\n  num_particles = 500\n  se_tol = 0.01\n"
                              "  [methods.MCEM]\n  type = \"mcem\"\n  num_iterations = 10\n"
                              "  [methods.\"AR(5)\"]\n  type = \"linear_ar\"\n  order = 5\n\n" + _models_help()
                              + "\n\n" + _methods_help())
    p.add_argument("--config", type=Path, default=None, help="TOML file describing the comparison")
    _add_data_args(p)
    _add_model_args(p, several=True)
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (default with no config: "
                        f"{','.join(DEFAULT_COMPARE)})")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default: 0)")
    p.add_argument("--horizons", type=_ints, default=None, help="forecast leads (default: 1,10)")
    p.add_argument("--num-particles", type=int, default=None,
                   help="particles per run in the yardstick filter's first round (default: 500)")
    _add_yardstick_args(p, defaults=False)
    p.add_argument("--executor", choices=("local", "dask"), default=None, help="local (default) or dask")
    p.add_argument("--address", default=None, help="dask scheduler address, e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers for --executor dask (default: 2)")
    _add_out(p, "compare")

    p = sub.add_parser("demo", help="the main comparison: all methods on the synthetic benchmark and a breathing trace",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare MCEM, mean-field EM, SVI (two guides), EKF-EM and BPTT with persistence "
                                   "and linear-AR reference rows on unkelbach-synthetic and on a respiration trace "
                                   "(forecasts 0.2-0.6 s ahead at 25 Hz). Writes report.md saying which method won "
                                   "and why.",
                       epilog="examples:\n  ppl-rnn demo\n  ppl-rnn demo --quick --out runs/demo-quick\n"
                              "  ppl-rnn demo --workers 2     # cells in parallel on a dask LocalCluster")
    p.add_argument("--quick", action="store_true", help="tiny settings (about a minute; for tests)")
    p.add_argument("--workers", type=int, default=2, help="run cells on a dask LocalCluster with this many worker "
                                                          "processes (default: 2; 1 = in-process)")
    p.add_argument("--no-respiration", action="store_true", help="skip the breathing trace")
    _add_out(p, "demo")

    sub.add_parser("models", help="list the model suite (name, class, one line from its docstring, --hidden)",
                   description="The models --model accepts (ppl_rnn.models.MODELS), with the first sentence of each "
                               "class's docstring and what --hidden sets.")
    return parser


# ---------------------------------------------------------------------------------------------
# helpers shared by the commands


def _out_dir(args, cmd) -> Path:
    out = Path(args.out) if args.out else Path("runs") / f"{cmd}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


class Scaling(NamedTuple):
    """How the CLI scaled the data: ``scaled = (raw - offset) / scale`` per observed dimension, with
    ``offset``/``scale`` computed on the **training part only** (``train_steps`` steps of every sequence) by
    ``ppl_rnn.workbench.datasets``' own statistics (``how``: ``"standard"`` mean and standard deviation,
    ``"robust"`` median and inter-quartile range, ``"none"`` raw units: offset 0, scale 1)."""

    how: str
    offset: tuple
    scale: tuple
    train_steps: int

    @property
    def scaled(self) -> bool:
        return self.how != "none"

    def log_scale(self) -> float:
        """:math:`\\sum_d \\log s_d`: a log-density per step in raw units is the scaled one minus this."""
        import math

        return float(sum(math.log(v) for v in self.scale))

    def sentence(self) -> str:
        """The report's one sentence on the scaling ('' for raw units)."""
        if not self.scaled:
            return ""
        what = ("mean", "standard deviation") if self.how == "standard" else ("median", "inter-quartile range")
        fmt = lambda v: ", ".join(f"{x:.4g}" for x in v)  # noqa: E731
        return (f"Scaled by the training part's {what[0]} {fmt(self.offset)} and {what[1]} {fmt(self.scale)} "
                f"(steps 0-{self.train_steps - 1} only; the test part never enters them); `--scale none` keeps "
                "raw units.")

    def attrs(self) -> dict:
        return {"scaling": self.how, "scaling_offset": list(self.offset), "scaling_scale": list(self.scale),
                "scaling_train_steps": self.train_steps}


def load_data(name_or_path: str, *, seed: int = 0, max_steps: int | None = None, train_steps: int | None = None,
              scale: str = "standard"):
    """``(train, test, record, scaling)`` for a data set name or a CSV/NPY file (record None for files).

    The series is loaded in raw units, cut at ``train_steps`` (default: the data set's split, or 80 %), and
    scaled by ``scale`` with statistics of the **training part only** (:class:`Scaling`; ``"none"``: raw)."""
    import numpy as np
    import torch

    from . import datasets

    if scale not in ("standard", "robust", "none"):
        raise ConfigurationError(f"--scale must be standard, robust or none; found {scale!r}.")
    if name_or_path in datasets.DATASETS:
        kw = {"seed": seed} if name_or_path == "unkelbach-synthetic" else {"scale": "none"}  # raw: scaled below
        if name_or_path == "respiration" and max_steps is not None:
            kw["max_steps"] = max_steps
        rec = datasets.load(name_or_path, **kw)
        T = rec.num_steps if max_steps is None else min(max_steps, rec.num_steps)
        ts = train_steps
        if ts is None:
            ts = rec.train_steps if rec.train_steps is not None and rec.train_steps < T else int(round(0.8 * T))
        if not 1 <= ts < T:
            raise ConfigurationError(f"--train-steps must be in [1, {T - 1}] for these {T} steps; found {ts}.")
        values = rec.values[:, :T]
    else:
        rec = None
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigurationError(f"--data {name_or_path!r} is neither a data set name "
                                     f"({', '.join(datasets.DATASETS)}) nor an existing .csv/.npy file.")
        arr = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
        arr = np.asarray(arr, dtype=float)
        if arr.ndim == 1:
            arr = arr[:, None]
        if max_steps is not None:
            arr = arr[:max_steps]
        T = arr.shape[0]
        ts = train_steps if train_steps is not None else int(round(0.8 * T))
        if not 1 <= ts < T:
            raise ConfigurationError(f"--train-steps must be in [1, {T - 1}] for this {T}-step series; found {ts}.")
        values = torch.as_tensor(arr, dtype=torch.get_default_dtype())[None]
    train_raw = values[:, :ts].double().numpy()
    off, sc = datasets.scaling_stats(train_raw.reshape(-1, train_raw.shape[-1]), scale)  # the training part only
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=values.dtype)  # noqa: E731
    values = (values - t(off)) / t(sc) if scale != "none" else values
    scaling = Scaling(scale, tuple(float(x) for x in off), tuple(float(x) for x in sc), int(ts))
    return values[:, :ts], values[:, ts:], rec, scaling


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# commands


def cmd_simulate(args) -> None:
    import numpy as np
    import xarray as xr

    from . import plots
    from .report import write_report

    opts = vars(args).copy()
    if args.model == "elman" and args.weight_scale is None:
        opts["weight_scale"] = 1.5  # the long-standing simulate default: lively dynamics
    m = make_model(args.model, opts, args.obs_dim)
    out = _out_dir(args, "simulate")
    sim = m.simulate(args.steps, args.sequences, seed=args.seed)
    y, h = sim.observations.double().numpy(), sim.states.double().numpy()
    ds = xr.Dataset({"observations": (("sequence", "time", "obs"), y), "states": (("sequence", "time", "hidden"), h)},
                    attrs={"model": repr(m.__class__.__name__), "model_name": args.model, "seed": args.seed,
                           "hidden": m.hidden_dim, "activation": str(getattr(m, "activation", ""))})
    ds.to_netcdf(out / "simulation.nc", engine="h5netcdf")

    class _P:  # states plotted as a "posterior" with zero variance
        mean, var, kind, method = sim.states, sim.states * 0, "simulated", "simulation"

    plots.plot_states(_P, None, title="simulated hidden states", path=out / "states.png")
    plots.plot_forecast(sim.observations[:, :1], sim.observations[None, :, 1:], start=1, history=None,
                        label="observations", title="simulated observations", path=out / "observations.png")
    rows = ["| sequence | mean(y) | sd(y) | mean |h| |", "|---|---|---|---|"]
    lines = [f"{'sequence':>8}  {'mean(y)':>8}  {'sd(y)':>8}  {'mean |h|':>8}"]
    for b in range(args.sequences):
        r = (b, float(np.mean(y[b])), float(np.std(y[b])), float(np.mean(np.abs(h[b]))))
        rows.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} |")
        lines.append(f"{r[0]:8d}  {r[1]:8.3f}  {r[2]:8.3f}  {r[3]:8.3f}")
    write_report(out / "report.md", title="ppl-rnn simulate", sections=[
        {"heading": "Simulation", "text": f"{type(m).__name__} ({args.model}, state dimension {m.hidden_dim}), "
         f"{args.steps} steps, {args.sequences} sequence(s), noise seed {args.seed}.\n\n" + "\n".join(rows),
         "figures": [("hidden states", "states.png"), ("observations", "observations.png")]}])
    _print("\n".join(lines))
    _print(f"\nwrote {out}/simulation.nc, states.png, observations.png, report.md")


#: the reference rows every fit is put beside (scored exactly by their own likelihood; they fit instantly)
FIT_REFERENCES = ("persistence", "AR by AIC")


def _reference_method(label: str):
    from ppl_rnn.inference.reference import LinearAR, Persistence

    return Persistence() if label == "persistence" else LinearAR(order="aic")


def _cell(ev, f, label: str, seed: int):
    """One evaluation as a cell of a :func:`ppl_rnn.compare` grid (the fields ``compare.run_cell`` adds)."""
    from .compare import final_objective

    ev = ev.copy()
    ev["wall_time_s"] = ((), float(f.wall_time_s))
    ev["own_objective"] = ((), final_objective(f))
    ev["num_particles"] = ((), float(ev.attrs.get("num_particles", float("nan"))))
    ev.attrs.update(own_evidence_kind=str(f.evidence_kind), error="", converged=int(bool(f.converged)),
                    method=label, seed=int(seed), model_label="")
    return ev


def _fit_and_score(args, out):
    """Fit the model, score it and the reference rows (:data:`FIT_REFERENCES`) with the same yardstick.

    Returns ``(train, test, record, fit, evaluation, grid, reference_labels, scaling)``: ``grid`` is a
    :func:`ppl_rnn.compare`-shaped Dataset (the fitted row labelled ``--method``, then the references) that
    :func:`ppl_rnn.workbench.report.verdict` and the tables read."""
    import numpy as np
    import torch

    from ppl_rnn.verbs import fit

    from . import plots
    from .compare import assemble_grid
    from .evaluate import evaluate

    auto = args.model == "auto"
    if not auto:
        model_names(args.model)  # an unknown name fails before the data are loaded
    tr, te, rec, scaling = load_data(args.data, seed=args.data_seed, max_steps=args.max_steps,
                                     train_steps=args.train_steps, scale=args.scale)
    method = _make(args.method, progress=True, **_settings(args.set))
    if auto:  # one search over the architectures of AUTO_MODELS (the default trainer's fit_models)
        if not callable(getattr(method, "fit_models", None)):
            raise ConfigurationError(f"--model auto searches over {', '.join(AUTO_MODELS)} and needs a method that "
                                     f"searches over models (the default, recommended); found --method {args.method}.")
        models = [make_model(n, args, tr.shape[-1], strict=False) for n in AUTO_MODELS]
        model = models[0]
        _print(f"searching {', '.join(AUTO_MODELS)} with {args.method} on {tuple(tr.shape)} training steps ...")
        f = fit(models, tr, method=method, seed=args.seed)
        _print(f"chose {f.diagnostics.get('search_choice')} ({type(f.model).__name__})")
    else:
        model = make_model(args.model, args, tr.shape[-1])
        _print(f"fitting {args.model} ({type(model).__name__}, state dimension {model.hidden_dim}) with "
               f"{args.method} on {tuple(tr.shape)} training steps ...")
        f = fit(model, tr, method=method, seed=args.seed)
    search = f.diagnostics.get("search")
    if search is not None:  # the default trainer's start search: every candidate's tail score, its cost, the choice
        _print(search[["label", "tail_crps", "tail_log_score_per_step", "tail_log_score_per_step_se", "rounds",
                             "iterations", "wall_time_s", "chosen"]].to_dataframe().to_string(float_format=lambda v: f"{v:.3f}"))
        _print(f.diagnostics["search_verdict"])
    horizons = [args.horizon] if hasattr(args, "horizon") else args.horizons
    horizons = sorted({1, *horizons})
    ekw = dict(horizons=horizons, num_particles=args.num_particles, se_tol=args.se_tol,
               max_particles=args.max_particles, seed=args.seed)
    ev = evaluate(f.model, tr, te, **ekw)
    ev.attrs.update(scaling.attrs())
    ev.to_netcdf(out / "evaluation.nc", engine="h5netcdf")
    torch.save(f.model, out / "model.pt")
    if f.trace is not None:
        try:
            from .compare import clean_trace

            clean_trace(f.trace).to_netcdf(out / "trace.nc", engine="h5netcdf")
            plots.plot_traces({args.method: f.trace}, kinds={args.method: f.evidence_kind}, path=out / "trace.png")
        except Exception:
            pass
    cells = {(args.method, args.seed): _cell(ev, f, args.method, args.seed)}
    refs = []
    for label in FIT_REFERENCES:
        rf = fit(model, tr, method=_reference_method(label), seed=args.seed)
        if label == "AR by AIC":
            orders = sorted({int(o) for o in np.atleast_1d(rf.diagnostics.get("order", []))})
            label = f"AR({','.join(map(str, orders))}) by AIC" if orders else label
        if label == args.method:
            continue
        refs.append(label)
        cells[(label, args.seed)] = _cell(evaluate(rf.model, tr, te, **ekw), rf, label, args.seed)
    names = [args.method, *refs]
    B, T1, D = tr.shape
    grid = assemble_grid(cells, names, [args.seed], horizons, int(ev.sizes["draw"]), B, T1, te.shape[1], D,
                     te.double().numpy())
    grid.attrs.update(scaling.attrs())
    grid.to_netcdf(out / "references.nc", engine="h5netcdf")
    return tr, te, rec, f, ev, grid, refs, scaling


def _raw_units_table(grid, refs, scaling) -> str:
    """Markdown table of the held-out log-evidence and the forecast errors in the data's raw units (rows as in
    the yardstick table), or '' when the data were not scaled or have several dimensions."""
    import numpy as np

    from .report import summarise

    if not scaling.scaled or len(scaling.scale) != 1:
        return ""
    sd, shift = scaling.scale[0], scaling.log_scale()
    hs = [int(h) for h in grid["horizon"].values]
    head = (["method", "held-out log-ev/step (raw units)"] + [f"CRPS {h} (raw units)" for h in hs]
            + [f"RMSE {h} (raw units)" for h in hs])
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    fmt = lambda x: f"{x:.4g}" if np.isfinite(x) else "—"  # noqa: E731
    for r in sorted(summarise(grid), key=lambda r: -np.nan_to_num(r["heldout_logev_per_step"], nan=-np.inf)):
        name = r["method"] + (" *" if r["method"] in refs else "")
        rows.append("| " + " | ".join([name, fmt(r["heldout_logev_per_step"] - shift)]
                                      + [fmt(r[f"crps@{h}"] * sd) for h in hs]
                                      + [fmt(r[f"rmse@{h}"] * sd) for h in hs]) + " |")
    return "\n".join(rows)


def _units_words(scaling) -> str:
    """How the scaled scores translate to raw units (one paragraph; '' without scaling)."""
    if not scaling.scaled:
        return ""
    if len(scaling.scale) == 1:
        sd = scaling.scale[0]
        return (f"Log-evidence per step is in scaled units; in raw units add −log σ = {-scaling.log_scale():.4f} "
                f"nats/step (σ = {sd:.4g}). RMSE and CRPS in raw units are the scaled ones times σ.")
    return (f"Log-evidence per step is in scaled units; in raw units add −Σ log σ_d = {-scaling.log_scale():.4f} "
            "nats/step. RMSE and CRPS pool the dimensions in scaled units (each divided by its own σ_d).")


def _data_words(tr, te, scaling) -> str:
    """The report's first paragraph: the split and the scaling sentence."""
    B, T1, D = tr.shape
    text = (f"Training part: steps 0-{T1 - 1}; held-out test part: steps {T1}-{T1 + te.shape[1] - 1} "
            f"({B} sequence(s), {D} observed dimension(s)).")
    return text + " " + (scaling.sentence() if scaling.scaled else "Raw units (`--scale none`).")


def _to_raw(x, scaling):
    """Scaled values back to raw units (a tensor or array whose last dim is the observed dimension)."""
    import numpy as np

    if not scaling.scaled:
        return x
    sc, off = np.asarray(scaling.scale), np.asarray(scaling.offset)
    if hasattr(x, "detach"):
        import torch

        return x * torch.as_tensor(sc, dtype=x.dtype) + torch.as_tensor(off, dtype=x.dtype)
    return np.asarray(x) * sc + off


def _score_sections(grid, refs, scaling) -> tuple[list[dict], str]:
    """The report sections on the yardstick (verdict beside the references, the table, raw units) and the
    terminal's text."""
    from .report import comparison_table, text_table, verdict

    words = verdict(grid, reference=refs)
    raw = _raw_units_table(grid, refs, scaling)
    text = (words + "\n\n" + comparison_table(grid, reference=refs)
            + "\n\n(* reference rows, fitted on the same training part and scored exactly by their own likelihood; "
            + ("scaled units" if scaling.scaled else "raw units") + ")")
    if raw:
        text += "\n\n" + _units_words(scaling) + "\n\n" + raw
    elif scaling.scaled:
        text += "\n\n" + _units_words(scaling)
    term = text_table(grid, reference=refs) + "\n\n" + words.replace("**", "")
    if scaling.scaled:
        term += "\n\n" + scaling.sentence().replace("`", "") + " " + _units_words(scaling)
    return [{"heading": "Score on the held-out part beside the reference rows (the common yardstick)",
             "text": text}], term


def cmd_fit(args) -> None:
    from . import plots
    from .arviz_export import to_inference_data
    from .report import write_report

    out = _out_dir(args, "fit")
    tr, te, rec, f, ev, grid, refs, scaling = _fit_and_score(args, out)
    try:
        idata = to_inference_data(f, observations=tr, num_draws=100, seed=args.seed, onestep=False)
        idata.to_netcdf(str(out / "inference_data.nc"))
    except Exception as e:  # the export needs a smoother for the fitted model; report but go on
        _print(f"(ArviZ export skipped: {type(e).__name__}: {e})")
    units = " (raw units)" if scaling.scaled else ""
    plots.plot_forecast(_to_raw(tr, scaling), _to_raw(ev.onestep_y.values[:, :, :200], scaling),
                        truth=_to_raw(te[:, :200], scaling), label="one-step-ahead predictive",
                        title=f"{args.method}: one-step-ahead predictive on the held-out part{units}",
                        path=out / "onestep.png")
    figs = [("one-step-ahead predictive on the held-out part" + units, "onestep.png")]
    if (out / "trace.png").exists():
        figs.insert(0, ("training trace (the method's own objective)", "trace.png"))
    sections, term = _score_sections(grid, refs, scaling)
    sections[0]["text"] += f"\n\nFit time {f.wall_time_s:.1f} s; own objective kind: {f.evidence_kind}."
    sections[0]["figures"] = figs
    write_report(out / "report.md", title=f"ppl-rnn fit: {args.model} by {args.method} on {args.data}",
                 sections=sections, preamble=_data_words(tr, te, scaling))
    _print(term)
    _print(f"\nwrote {out}/evaluation.nc, references.nc, model.pt, report.md and figures")


def cmd_forecast(args) -> None:
    from ppl_rnn.workbench.forecasting import forecast

    from . import plots
    from .arviz_export import to_inference_data
    from .report import write_report

    out = _out_dir(args, "forecast")
    tr, te, rec, f, ev, grid, refs, scaling = _fit_and_score(args, out)
    K = min(args.horizon, te.shape[1])
    fc = forecast(f.model, tr, horizon=K, num_samples=500, seed=args.seed)
    to_inference_data(fc, observations=tr).to_netcdf(str(out / "forecast.nc"))
    dt = getattr(rec, "sampling_interval", None) if rec is not None else None
    unit = getattr(rec, "time_unit", "step") if rec is not None else "step"
    units = " (raw units)" if scaling.scaled else ""
    samples = _to_raw(fc.samples, scaling)  # the forecast in the data's own units
    plots.plot_forecast(_to_raw(tr, scaling), samples, truth=_to_raw(te[:, :K], scaling), history=max(3 * K, 100),
                        dt=dt, time_unit=unit or "step", label=f"{args.method} forecast" + units,
                        path=out / "forecast.png")
    import torch

    q = samples.quantile(torch.tensor([0.05, 0.5, 0.95], dtype=samples.dtype), dim=0)
    truth = _to_raw(te, scaling)
    lines = [f"{'step':>4}  {'median':>8}  {'90% interval':>20}  {'observed':>8}" + units]
    rows = [f"| step | median{units} | 90% interval{units} | observed{units} |", "|---|---|---|---|"]
    for k in range(K):
        lo, md_, hi, obs = float(q[0, 0, k, 0]), float(q[1, 0, k, 0]), float(q[2, 0, k, 0]), float(truth[0, k, 0])
        lines.append(f"{k + 1:>4}  {md_:8.3f}  [{lo:8.3f}, {hi:8.3f}]  {obs:8.3f}")
        rows.append(f"| {k + 1} | {md_:.3f} | [{lo:.3f}, {hi:.3f}] | {obs:.3f} |")
    sections, term = _score_sections(grid, refs, scaling)
    sections[0]["heading"] = "Rolling-origin score on the held-out part beside the reference rows"
    write_report(out / "report.md", title=f"ppl-rnn forecast: {args.model} by {args.method} on {args.data}",
                 preamble=_data_words(tr, te, scaling), sections=[
        {"heading": f"Forecast of the {K} steps after the training part", "text": "\n".join(rows),
         "figures": [("forecast with 50%/90% intervals" + units, "forecast.png")]}, *sections])
    _print("\n".join(lines))
    _print("\n" + term)
    _print(f"\nwrote {out}/forecast.nc, forecast.png, report.md")


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    if not path.exists():
        _die(f"--config {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        _die(f"--config {str(path)!r} is not valid TOML: {e}")


def cmd_compare(args) -> None:
    from . import plots
    from .compare import compare, flatten_models, load_cell_trace
    from .report import comparison_table, text_table, verdict, write_report

    cfg = _load_toml(args.config) if args.config else {}
    unknown = set(cfg) - {"data", "model", "models", "compare", "methods"}
    if unknown:
        _die(f"unknown table(s) {sorted(unknown)} in {args.config}; allowed: data, model (or a top-level "
             "model = \"NAME\"), models, compare, methods")
    data_c, model_c, cmp_c = cfg.get("data", {}), cfg.get("model", {}), cfg.get("compare", {})
    model_c = {"name": model_c} if isinstance(model_c, (str, list)) else dict(model_c)  # model = "gru"
    extra = sorted(set(model_c) - set(MODEL_KEYS))
    if extra:
        raise ConfigurationError(f"unknown key {extra[0]!r} in [model] of {args.config}; allowed: "
                                 f"{', '.join(MODEL_KEYS)}")
    parser_defaults = build_parser()._subparsers._group_actions[0].choices["compare"]
    given = lambda k: getattr(args, k) != parser_defaults.get_default(k)  # noqa: E731
    data = args.data if given("data") or "name" not in data_c and "path" not in data_c else data_c.get(
        "name", data_c.get("path"))
    seed = args.data_seed if given("data_seed") else data_c.get("seed", 0)
    max_steps = args.max_steps if args.max_steps is not None else data_c.get("max_steps")
    train_steps = args.train_steps if args.train_steps is not None else data_c.get("train_steps")
    for k in MODEL_KEYS[1:]:
        if hasattr(args, k) and (given(k) or k not in model_c):  # (weight_scale: only in a config)
            model_c[k] = getattr(args, k)
    # the models: --model (repeatable, comma-separated) > [models.LABEL] tables > [model] name > elman
    model_specs = cfg.get("models", {})
    if args.model or not model_specs:
        model_specs = {n: {"type": n} for n in model_names(args.model or model_c.get("name") or "elman")}
    elif not isinstance(model_specs, dict) or not all(isinstance(v, dict) for v in model_specs.values()):
        raise ConfigurationError(f"[models] in {args.config} must hold tables such as [models.GRU] with "
                                 "type = \"gru\"")
    shared = {k: v for k, v in model_c.items() if k != "name" and v is not None}
    for k in MODEL_OPTIONS:  # with several models, a shared option goes to the models that take it (at least one)
        types = [s.get("type") for s in model_specs.values()]
        if k in shared and not any(t in MODEL_OPTIONS[k] for t in types):
            raise ConfigurationError(f"--{k.replace('_', '-')} applies to none of the models {', '.join(types)}; "
                                     f"it applies to: {', '.join(m for m in MODEL_SIZES if m in MODEL_OPTIONS[k])}")
    models = {}
    for label, spec in model_specs.items():
        spec = dict(spec)
        if "type" not in spec:
            raise ConfigurationError(f"[models.{label}] needs a type = \"...\" entry (one of: "
                                     f"{', '.join(_registry())})")
        t = model_names(spec.pop("type"))[0]
        extra = sorted(set(spec) - set(MODEL_KEYS[1:]))
        if extra:
            raise ConfigurationError(f"unknown key {extra[0]!r} in [models.{label}]; allowed: type, "
                                     f"{', '.join(MODEL_KEYS[1:])}")
        own = dict(shared)
        if len(model_specs) > 1:
            own = {k: v for k, v in own.items() if k not in MODEL_OPTIONS or t in MODEL_OPTIONS[k]}
            if t == "stacked" and "layers" in own:
                own.pop("hidden", None)
        models[label] = (t, {**own, **spec})
    if args.methods:
        specs = {t: {"type": t} for t in args.methods.split(",") if t}
    elif cfg.get("methods"):
        specs = cfg["methods"]
    else:
        specs = {t: {"type": t} for t in DEFAULT_COMPARE}
    methods, reference = {}, []
    for label, spec in specs.items():
        spec = dict(spec)
        if "type" not in spec:
            _die(f"[methods.{label}] needs a type = \"...\" entry (one of: {', '.join(method_names(CLI_KINDS))})")
        t = spec.pop("type")
        methods[label] = _make(t, progress=(args.executor or cmp_c.get("executor", "local")) == "local", **spec)
        if is_reference(t):
            reference.append(label)
    seeds = args.seeds or cmp_c.get("seeds", [0])
    horizons = args.horizons or cmp_c.get("horizons", [1, 10])
    num_particles = args.num_particles or cmp_c.get("num_particles", 500)
    se_tol = args.se_tol if args.se_tol is not None else cmp_c.get("se_tol", 0.01)
    max_particles = args.max_particles or cmp_c.get("max_particles", 32000)
    executor = args.executor or cmp_c.get("executor", "local")
    address = args.address or cmp_c.get("address")
    out = _out_dir(args, "compare")
    scale = args.scale if given("scale") else data_c.get("scale", "standard")
    tr, te, rec, scaling = load_data(str(data), seed=int(seed), max_steps=max_steps, train_steps=train_steps,
                                     scale=scale)
    if scaling.scaled:
        _print(scaling.sentence().replace("`", ""))
    built = {label: make_model(t, opts, tr.shape[-1]) for label, (t, opts) in models.items()}
    several = len(built) > 1
    model = built if several else next(iter(built.values()))
    what = f"{len(built)} models x " if several else f"{next(iter(models.values()))[0]}: "
    _print(f"comparing {what}{len(methods)} methods x {len(seeds)} seeds on {data}: train {tuple(tr.shape)}, "
           f"test {tuple(te.shape)}; cells in {out}/cells")
    ds = compare(model, tr, te, methods=methods, seeds=seeds, horizons=horizons, num_particles=num_particles,
                 se_tol=se_tol, max_particles=max_particles,
                 executor=None if executor == "local" else executor, address=address,
                 n_workers=args.workers, out=out, progress=True)
    plots.plot_comparison(ds, reference=tuple(reference), path=out / "comparison.png")
    if several:
        traces = {f"{ml} / {m}": load_cell_trace(out, m, seeds[0], model=ml) for ml in built for m in methods
                  if m not in reference}
    else:
        traces = {m: load_cell_trace(out, m, seeds[0]) for m in methods if m not in reference}
    flat = flatten_models(ds)
    kinds = {str(m): str(k) for m, k in zip(flat.method.values, flat.own_evidence_kind.values, strict=True)}
    plots.plot_traces(traces, kinds=kinds, path=out / "traces.png")
    write_report(out / "report.md", title=f"ppl-rnn compare on {data}", sections=[
        {"heading": "Result", "text": verdict(ds, reference=reference) + (
            f"\n\n{scaling.sentence()} {_units_words(scaling)}" if scaling.scaled else "")},
        {"heading": "Table (mean ± Monte Carlo SE of the yardstick; sd over seeds in its own column; "
                    "* = reference row)", "text": comparison_table(ds, reference=reference),
         "figures": [("held-out log-evidence and CRPS by method", "comparison.png"),
                     ("training traces", "traces.png")]}])
    _print(text_table(ds, reference=reference))
    _print(f"\nwrote {out}/compare.nc, report.md, comparison.png, traces.png")


def cmd_demo(args) -> None:
    from .demo import run_demo

    out = _out_dir(args, "demo")
    run_demo(out, quick=args.quick, workers=args.workers, respiration=not args.no_respiration, echo=_print)


def cmd_models(args) -> None:
    _print("models (--model NAME; ppl_rnn.models.MODELS):\n" + describe_models())


COMMANDS = {"simulate": cmd_simulate, "fit": cmd_fit, "forecast": cmd_forecast, "compare": cmd_compare,
            "demo": cmd_demo, "models": cmd_models}


def main(argv=None) -> int:
    """Entry point of ``ppl-rnn``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for k in ("steps", "sequences", "hidden", "workers", "num_particles", "horizon", "max_steps", "train_steps",
              "max_particles"):
        v = getattr(args, k, None)
        if v is not None and (not isinstance(v, int) or v < 1):
            _die(f"--{k.replace('_', '-')} must be a positive integer; found {v!r}")
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write("\nppl-rnn: interrupted. Finished results are on disk (comparison cells in <out>/cells); "
                         "rerun the same command to resume.\n")
        return 130
    except (PplRnnError, ValueError, ImportError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"ppl-rnn: error: {msg}\n")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
