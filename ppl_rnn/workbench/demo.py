"""``ppl-rnn demo`` (``make demo``): the project's main comparison.

Two problems, one model class (a stochastic Elman network, :class:`ppl_rnn.models.ElmanSSM`, tanh), the
same random initial weights for every method, and the one yardstick of :mod:`ppl_rnn.workbench.evaluate`:

1. ``unkelbach-synthetic``: 500 training and 250 test steps from a fixed 4-unit stochastic Elman network
   with process noise (the setting of Unkelbach, Yi & Schmidhuber 2009). The generating network itself is
   scored too ("true network"): the ceiling.
2. ``respiration``: a breathing-belt trace at 25 Hz, the regular-breathing window of the recording
   (:data:`ppl_rnn.workbench.datasets.REGULAR_BREATHING_WINDOW`: 2 minutes of training, the next minute held
   out, preprocessing from the training part only); forecasts 5, 10 and 15 steps ahead = 0.2, 0.4 and 0.6 s,
   the latency range of tumour-tracking radiotherapy (the reference paper's lung-tumour-motion setting).
   Rows: AR(p) with p chosen by AIC on the training part, persistence, KalmanEM's linear state-space model
   (exact EM on the network's linear special case, begun at AR fits in companion form: ``KalmanEM(init="ar")``)
   and the tanh network trained by Monte Carlo EM from the nonlinear warm start (``MonteCarloEM(start=NARStart())``:
   a least-squares autoregression on the AIC order's lags and 20 random tanh features of them, embedded in
   the network, which therefore has p + 20 units): the section says whether the nonlinearity earns its keep on
   this signal or a linear model is enough. Skipped with a message when the data package is missing.

Methods of the synthetic section: Monte Carlo EM (particle smoother E-step), mean-field EM, SVI with the structured Markov Gaussian
guide and with the mean-field guide, EKF-EM and BPTT (deterministic), plus persistence and a linear AR(5)
as reference rows. (SVI with the EKF guide is left out: at the time of writing one of its steps costs
seconds at T=300, far beyond the demo's budget.) Each method gets a fixed compute budget (iterations
listed in :data:`DEMO_METHODS` and :data:`BREATHING`); it is budgeted for about 6 minutes on 2 free cores
with two dask workers (timings in ``benchmarks/README.md``, "The demo"; ``--quick``: tiny settings, for tests).
A method that has not converged within its budget is scored as it stands; its trace shows it. Output: ``report.md`` (which method won and why, tables, figures), one
sub-directory per problem with ``compare.nc``, the cell files and PNGs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ppl_rnn.capabilities import require
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.method import InferenceMethod

from .paired import grid_difference
from .report import comparison_table, logev_margin, summarise, text_table, verdict, write_report

__all__ = ["run_demo", "demo_methods", "breathing_methods", "breathing_order", "LinearSpecialCase",
           "linear_or_nonlinear"]

#: the demo's methods: label -> (name in ppl_rnn.inference.registry, full settings, quick settings)
DEMO_METHODS = {
    "MCEM": ("mcem", dict(num_particles=300, num_paths=40, backward="mcmc", num_iterations=25),
             dict(num_particles=50, num_paths=10, backward="mcmc", num_iterations=2)),
    "mean-field EM": ("meanfield_em", dict(num_iterations=20), dict(num_iterations=2)),
    "SVI (Markov guide)": ("svi_markov_gaussian", dict(num_steps=60, lr=0.05), dict(num_steps=3, lr=0.05)),
    "SVI (mean-field guide)": ("svi_mean_field", dict(num_steps=80, lr=0.05), dict(num_steps=3, lr=0.05)),
    "EKF-EM": ("ekf_em", dict(num_iterations=4, num_samples=3), dict(num_iterations=1, num_samples=2)),
    "BPTT": ("bptt", dict(num_steps=150, lr=0.03), dict(num_steps=5, lr=0.03)),
    "AR(5)": ("linear_ar", dict(order=5), dict(order=5)),
    "persistence": ("persistence", {}, {}),
}
REFERENCE = ("AR(5)", "persistence", "true network")


#: the breathing section's settings (full, quick): KalmanEM iterations, MCEM iterations (each tested for ascent
#: on fresh paths, ``ascent_z``), particles and paths of MCEM's smoother, the lags of the network's nonlinear
#: warm start (``"aic"``: the AR order AIC picks on the training part) and its tanh features; the network has
#: lags + features units (``MonteCarloEM(start=NARStart())``), and KalmanEM fits its linear special case begun at AR
#: fits in companion form
BREATHING = {"full": dict(kem=25, mcem=1, particles=300, paths=100, order="aic", features=20, ascent_z=1.0),
             "quick": dict(kem=3, mcem=1, particles=50, paths=10, order=2, features=3, ascent_z=1.0)}
BREATHING_REFERENCE = ("AR(p by AIC)", "persistence")
LINEAR_ROW, NETWORK_ROW = "KalmanEM (linear SSM)", "MCEM (nonlinear start)"


class LinearSpecialCase(InferenceMethod):
    """Fit the model's **linear special case** (the declared capability ``linear_special_case``: for
    ``ElmanSSM`` the same network with the identity activation) with ``method``, e.g. exact KalmanEM: the
    linear state-space row of a comparison whose other rows train the nonlinear model itself."""

    name = "linear_special_case"
    smooths = False

    def __init__(self, method: InferenceMethod):
        if not isinstance(method, InferenceMethod):
            raise ConfigurationError(f"method must be an inference method object; found {method!r}.")
        self.method = method

    def __repr__(self) -> str:
        return f"LinearSpecialCase({self.method!r})"

    def _fit(self, model, data, seed):
        lin = require(model, "linear_special_case", needed_by="LinearSpecialCase",
                      alternative="fit a linear model directly")().to(model.dtype)
        return self.method.fit_prepared(lin, data, seed)


def breathing_methods(quick: bool = False, order: int | None = None) -> dict:
    """``{label: method}`` of the breathing section (see :data:`BREATHING`); ``order``: the lags of the
    network's nonlinear warm start (None: :data:`BREATHING`'s if an int, else AIC on the training data)."""
    from ppl_rnn.inference import (
        Acceptance,
        ConvergenceRule,
        KalmanEM,
        MonteCarloEM,
        NARStart,
        ParticleSmoother,
    )
    from ppl_rnn.inference.reference import LinearAR, Persistence

    b = BREATHING["quick" if quick else "full"]
    if order is None and b["order"] != "aic":
        order = int(b["order"])
    return {
        "AR(p by AIC)": LinearAR(order="aic", max_order=30),
        "persistence": Persistence(),
        LINEAR_ROW: LinearSpecialCase(KalmanEM(num_iterations=b["kem"], tol=0.0, init="ar")),
        NETWORK_ROW: MonteCarloEM(start=NARStart(order=order), num_iterations=b["mcem"],
                                  stopping=ConvergenceRule(tol=0.0), acceptance=Acceptance(ascent_z=b["ascent_z"]),
                                  smoother=ParticleSmoother(b["particles"], b["paths"], backward="mcmc")),
    }


def breathing_order(quick: bool, train) -> int:
    """The lags of the breathing network's warm start: :data:`BREATHING`'s, or the AR order AIC picks on
    ``train``."""
    from ppl_rnn.inference.reference import LinearAR
    from ppl_rnn.models import ElmanSSM
    from ppl_rnn.verbs import fit

    p = BREATHING["quick" if quick else "full"]["order"]
    if p != "aic":
        return int(p)
    ar = fit(ElmanSSM(1, 1).double(), train, method=LinearAR(order="aic", max_order=30))
    return int(ar.diagnostics["order"][0])



def linear_or_nonlinear(ds, *, steps_label=None, linear=(LINEAR_ROW, "AR(p by AIC)"), network=NETWORK_ROW) -> str:
    """Where the nonlinearity earns its keep: the network's margin over the best linear row (of ``linear``:
    the linear state-space model and the AR reference; held-out log-evidence with its Monte Carlo SE, CRPS at
    every lead), in words."""
    rows = {r["method"]: r for r in summarise(ds)}
    lin = [rows[k] for k in linear if k in rows and rows[k]["n_ok"] and np.isfinite(rows[k]["heldout_logev_per_step"])]
    if not lin or network not in rows or not rows[network]["n_ok"]:
        return ""
    a = rows[network]
    b = max(lin, key=lambda r: r["heldout_logev_per_step"])
    d, se = logev_margin(a, b)
    hs = [int(h) for h in ds["horizon"].values]
    lab = steps_label or (lambda h: f"{h}-step")
    dc = [a[f"crps@{h}"] - b[f"crps@{h}"] for h in hs]
    paired = _paired_crps(ds, network, b["method"])
    if paired is None:
        crps = ", ".join(f"{lab(h)} {v:+.4f}" for h, v in zip(hs, dc, strict=True))
    else:
        dc = [float(v) for v in paired.difference.values]
        crps = ", ".join(f"{lab(h)} {v:+.4f} ± {e:.4f}" for h, v, e in zip(
            hs, dc, paired.difference_se.values, strict=True)) + " (paired over targets, HAC SE)"
    head = (f"**Linear or nonlinear?** The tanh network ({network}) minus the best linear model ({b['method']}): "
            f"{d:+.3f} nats/step held-out log-evidence (Monte Carlo SE {se:.3f}); CRPS differences {crps} "
            "(negative: the network forecasts better). ")
    if d > 2 * se and all(v < 0 for v in dc):
        return head + ("Here the nonlinearity earns its keep: the network is better on the log-evidence and on "
                       "every lead.")
    tail = ("The nonlinearity earns its keep on strongly nonlinear signals: on the chaotic Santa Fe laser the "
            "tanh network trained by MCEM beats the best linear model clearly (`benchmarks/real_tables.py`, "
            "`benchmarks/README.md`).")
    if d < -2 * se - 0.02:
        return head + ("Here a linear model is enough, and better: within this compute budget the network has not "
                       "caught up with the best linear model. " + tail)
    return head + ("Here a linear model is enough: the network matches it without a clear gain. " + tail)


def _paired_crps(ds, a: str, b: str):
    """``grid_difference`` of two rows' CRPS; None where the grid lacks the per-target losses."""
    try:
        return grid_difference(ds, a, b)
    except DataError:
        return None


def demo_methods(quick: bool = False) -> dict:
    """``{label: method}`` of the demo (full or quick settings)."""
    from ppl_rnn.inference.registry import make_method

    return {label: make_method(t, **(q if quick else full)) for label, (t, full, q) in DEMO_METHODS.items()}


def _problem_settings(quick: bool) -> dict:
    if quick:
        return {"synthetic": dict(train=100, test=40, horizons=[1, 5], seeds=[0], num_particles=200, samples=20),
                "respiration": dict(window=(730.0, 40.0), train_s=30.0, horizons=[5, 10], seeds=[0],
                                    num_particles=200, samples=20)}
    return {"synthetic": dict(train=500, test=250, horizons=[1, 5, 10], seeds=[0, 1], num_particles=2000,
                              samples=100),
            "respiration": dict(window=None, train_s=None, horizons=[5, 10, 15], seeds=[0], num_particles=500,
                                samples=100)}


def _figures(ds, out: Path, train, test, reference, dt=None, unit="step", true_model=None, states=None, echo=print):
    """Comparison, traces, the winner's forecasts, its filter's ESS, and (synthetic) smoothed vs true states."""
    from ppl_rnn.verbs import infer
    from ppl_rnn.workbench.forecasting import forecast

    from . import plots
    from .compare import load_cell_model, load_cell_trace

    figs = []
    plots.plot_comparison(ds, reference=reference, path=out / "comparison.png")
    figs.append(("Held-out log-evidence per step (left, higher is better) and CRPS per horizon (right, lower is "
                 "better); dots are seeds, bars means, grey rows references.", "comparison.png"))
    seeds = [int(s) for s in ds.seed.values]
    traces = {str(m): load_cell_trace(out, str(m), seeds[0]) for m in ds.method.values if str(m) not in reference}
    kinds = {str(m): str(k) for m, k in zip(ds.method.values, ds.own_evidence_kind.values, strict=True)}
    plots.plot_traces(traces, kinds=kinds, path=out / "traces.png")
    figs.append((f"Each method's own training objective per iteration (seed {seeds[0]}); the kinds differ, so "
                 "the panels are not comparable with each other: the common yardstick is the figure above.",
                 "traces.png"))
    rows = [r for r in summarise(ds) if r["n_ok"] and r["method"] not in reference
            and np.isfinite(r["heldout_logev_per_step"])]
    if not rows:
        return figs, None
    win = max(rows, key=lambda r: r["heldout_logev_per_step"])["method"]
    wi = list(ds.method.values).index(win)
    ll = ds.heldout_logev_per_step.values[wi]
    best_seed = seeds[int(np.nanargmax(ll))]
    model = load_cell_model(out, win, best_seed)
    if model is None:
        return figs, win
    K = int(max(ds.horizon.values))
    fc = forecast(model, train, horizon=K, num_samples=500, seed=0)
    plots.plot_forecast(train, fc, truth=test[:, :K], history=max(4 * K, 60), dt=dt, time_unit=unit,
                        label=f"{win} {K}-step forecast", title=f"{win}: forecast of the {K} steps after the "
                        "training part (50%/90% intervals)", path=out / "forecast.png")
    figs.append((f"The winner ({win}, seed {best_seed}) forecasting the first {K} held-out steps from the end of "
                 "the training part.", "forecast.png"))
    sel = ds.sel({"method": win, "seed": best_seed})
    n = min(200, ds.sizes["time"])
    onestep = sel.onestep_y.values[:, :, :n]  # (S,B,n,D)
    plots.plot_forecast(train, onestep, truth=test[:, :n], history=60, dt=dt, time_unit=unit,
                        label=f"{win} one-step-ahead", title=f"{win}: one-step-ahead predictive over the held-out "
                        "part (rolling origin)", path=out / "onestep.png")
    figs.append(("One-step-ahead predictive median and intervals over the held-out part (each step forecast from "
                 "the filter at the previous step).", "onestep.png"))
    from ppl_rnn.inference import ParticleFilter

    post = infer(model, test, method=ParticleFilter(num_particles=int(ds.attrs.get("num_particles", 2000))), seed=0)
    plots.plot_ess(post, dt=dt, time_unit=unit, title=f"{win}: particle-filter ESS on the held-out part "
                   f"(N = {post.diagnostics['num_particles']})", path=out / "ess.png")
    figs.append(("Effective sample size of the yardstick's bootstrap filter on the winner's model: dips mark "
                 "observations the model did not expect.", "ess.png"))
    if true_model is not None and states is not None:
        from ppl_rnn.inference import ParticleSmoother

        T = min(150, train.shape[1])
        sm = infer(true_model, train[:, :T], method=ParticleSmoother(num_particles=500, num_paths=100, backward="mcmc"),
                   seed=0)
        plots.plot_states(sm, states[:, :T], title="particle smoother at the true parameters: hidden states vs "
                          f"truth (first {T} training steps)", path=out / "states.png")
        figs.append(("Particle-smoother posterior of the hidden states at the generating parameters, against the "
                     "true states: the E-step MCEM relies on.", "states.png"))
    return figs, win


def _noise_table(ds, out: Path) -> str:
    """Fitted noise scales per method (first successful seed): what each method concluded about the noise."""
    from .compare import load_cell_model

    rows = ["| method | process noise q (mean over units) | observation noise r |", "|---|---|---|"]
    for i, m in enumerate(ds.method.values):
        for j, s in enumerate(ds.seed.values):
            if str(ds.error.values[i, j]):
                continue
            model = load_cell_model(out, str(m), int(s))
            if model is None or not hasattr(model, "q") or not hasattr(model, "r") or hasattr(model, "phi"):
                break
            rows.append(f"| {m} | {float(model.q.detach().mean()):.3g} | {float(model.r.detach().mean()):.3g} |")
            break
    return "\n".join(rows) if len(rows) > 2 else ""


def _run_problem(name, tr, te, model, methods, st, out, reference, workers, echo, dt=None, unit="step",
                 true_model=None, states=None, steps_label=None):
    from .compare import compare

    echo(f"\n== {name}: train {tuple(tr.shape)}, test {tuple(te.shape)}, {len(methods)} methods x "
         f"{len(st['seeds'])} seeds")
    t0 = time.perf_counter()
    ds = compare(model, tr, te, methods=methods, seeds=st["seeds"], horizons=st["horizons"],
                 num_particles=st["num_particles"], num_samples=st["samples"],
                 executor="dask" if workers > 1 else None, n_workers=workers, out=out, progress=True)
    wall = time.perf_counter() - t0
    figs, win = _figures(ds, out, tr, te, reference, dt=dt, unit=unit, true_model=true_model, states=states,
                         echo=echo)
    echo(text_table(ds, reference=reference, steps_label=steps_label))
    echo(f"({wall:.0f} s)")
    return ds, figs, win, wall


def run_demo(out, *, quick: bool = False, workers: int = 1, respiration: bool = True, synthetic: bool = True,
             echo=print) -> dict:
    """Run the demo into directory ``out`` (``synthetic``/``respiration``: run those sections); returns
    ``{problem: compare Dataset}``."""
    from ppl_rnn.inference.reference import FixedModel
    from ppl_rnn.models import ElmanSSM

    from . import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    settings = _problem_settings(quick)
    results, sections = {}, []

    # 1. the synthetic benchmark -----------------------------------------------------------------
    if synthetic:
        st = settings["synthetic"]
        rec = datasets.load("unkelbach-synthetic", seed=0, train_steps=st["train"], test_steps=st["test"])
        tr_rec, te_rec = rec.split()
        tr, te = tr_rec.values, te_rec.values
        model = ElmanSSM(4, 1, process_noise=0.3, obs_noise=0.3, seed=1)
        methods = demo_methods(quick)
        methods["true network"] = FixedModel(rec.true_model, label="true network")
        ds, figs, win, wall = _run_problem("unkelbach-synthetic", tr, te, model, methods, st, out / "synthetic",
                                           REFERENCE, workers, echo, true_model=rec.true_model, states=tr_rec.states)
        results["synthetic"] = ds
        sections.append({
            "heading": "1. Synthetic benchmark (unkelbach-synthetic)",
            "text": ("A fixed 4-unit stochastic tanh Elman network (process noise 0.15, observation noise 0.1) generated "
                     f"{st['train']} training and {st['test']} test steps. Every method fits the same randomly "
                     "initialised 4-unit network; every fit is scored by the same particle filter "
                     f"({st['num_particles']} particles) at its fitted parameters, on the test part, conditioning on the "
                     "training part (the linear reference rows by the exact Kalman filter, which is what a particle "
                     "filter estimates for them). *true network* is the generating model (the ceiling).\n\n"
                     + verdict(ds, reference=REFERENCE) + "\n\n" + comparison_table(ds, reference=REFERENCE)
                     + f"\n\n(* reference rows; {len(st['seeds'])} seeds per method; wall time {wall:.0f} s)\n\n"
                     "What each method concluded about the noise (the generating values are q = 0.15, r = 0.1):\n\n"
                     + _noise_table(ds, out / "synthetic")),
            "figures": [(c, f"synthetic/{p}") for c, p in figs],
        })

    # 2. the breathing trace ---------------------------------------------------------------------
    if respiration:
        st = settings["respiration"]
        window = st["window"] or datasets.REGULAR_BREATHING_WINDOW
        train_s = st["train_s"] or datasets.REGULAR_BREATHING_TRAIN_S
        try:
            rrec = datasets.load("respiration", window=window, train_s=train_s, dtype=torch.float64)
        except ImportError as e:
            echo(f"\n== respiration skipped: {e}")
            sections.append({"heading": "2. Breathing-motion forecasting (skipped)",
                             "text": f"The respiration data set is not available here: {e}"})
            rrec = None
        if rrec is not None:
            rtr, rte = rrec.split()
            dt = rrec.sampling_interval or 0.04
            lab = lambda h: f"{h * dt:.2g} s"  # noqa: E731
            b = BREATHING["quick" if quick else "full"]
            p = breathing_order(quick, rtr.values)
            H = p + int(b["features"])
            model = ElmanSSM(H, 1, seed=1).double()
            ds, figs, win, wall = _run_problem("respiration", rtr.values, rte.values, model, breathing_methods(quick, p),
                                               st, out / "respiration", BREATHING_REFERENCE, workers, echo, dt=dt,
                                               unit="s", steps_label=lab)
            results["respiration"] = ds
            sections.append({
                "heading": "2. Breathing-motion forecasting (respiration, 25 Hz, regular breathing)",
                "text": (f"{rrec.description} Robust-scaled with statistics of the training part only. "
                         f"Window {window[0]:g}-{window[0] + window[1]:g} s of the recording (regular breathing); "
                         f"{rtr.num_steps} training steps ({rtr.num_steps * dt:.0f} s), {rte.num_steps} test steps "
                         f"({rte.num_steps * dt:.0f} s); forecast leads "
                         + ", ".join(f"{h} steps = {h * dt:.2g} s" for h in st["horizons"])
                         + f" (the latency range of tumour tracking). Every row fits the same {H}-unit "
                         f"network (float64; {p} lags{' = the AR order AIC picks' if b['order'] == 'aic' else ''} "
                         f"+ {b['features']} tanh features): {LINEAR_ROW} its linear special case by exact EM begun "
                         f"at AR({H}) ({b['kem']} iterations), {NETWORK_ROW} the tanh network by Monte Carlo EM "
                         f"({b['mcem']} iteration(s), {b['particles']} particles, each M-step kept only if fresh "
                         f"paths show an ascent) started from a least-squares autoregression on {p} lags and "
                         f"{b['features']} random tanh features of them, embedded in the network "
                         "(`MonteCarloEM(start=NARStart())`).\n\n"
                         + verdict(ds, reference=BREATHING_REFERENCE, steps_label=lab) + "\n\n"
                         + linear_or_nonlinear(ds, steps_label=lab) + "\n\n"
                         + comparison_table(ds, reference=BREATHING_REFERENCE, steps_label=lab)
                         + f"\n\n(* reference rows; wall time {wall:.0f} s)\n\nFitted noise scales:\n\n"
                         + _noise_table(ds, out / "respiration")),
                "figures": [(c, f"respiration/{p}") for c, p in figs],
            })

    total = time.perf_counter() - t_start
    cell_compute = sum(float(np.nansum(d.wall_time_s.values) + np.nansum(d.eval_time_s.values))
                       for d in results.values())
    pre = ("How to read this: each method trains the same stochastic recurrent network; the **held-out log-evidence "
           "per step** (a high-particle filter at the fitted parameters, on data the fit never saw) is the common "
           "yardstick — higher is better, differences are in nats per time step. CRPS measures the whole forecast "
           "distribution in the units of the data (lower is better); coverage should match 0.50/0.90. A method's "
           "own objective (ELBO, EKF likelihood, MCEM estimate, loss) is shown beside it, labelled with what it "
           f"is, and is not comparable across methods.\n\nSettings: {'quick (tiny, for tests)' if quick else 'full'}; "
           f"this invocation ran {total:.0f} s (cells finished by an earlier run are loaded, not refitted); wall "
           f"time inside the cells (fit + evaluation, summed over cells, parallel workers counted separately): "
           f"{cell_compute:.0f} s.")
    write_report(out / "report.md", title="ppl-rnn demo: which inference method trains a stochastic RNN best?",
                 sections=sections, preamble=pre)
    echo(f"\nreport: {out / 'report.md'}  (total {total:.0f} s)")
    return results
