"""``ppl-rnn demo`` (``make demo``): the project's main comparison.

Two problems, one model class (a stochastic Elman network, :class:`ppl_rnn.models.ElmanSSM`, tanh), the
same random initial weights for every method, and the one yardstick of :mod:`ppl_rnn.workbench.evaluate`:

1. ``unkelbach-synthetic``: 1000 training and 500 test steps from a fixed 4-unit stochastic Elman network
   with process noise (the setting of Unkelbach, Yi & Schmidhuber 2009). The generating network itself is
   scored too ("true network"): the ceiling.
2. ``respiration``: a breathing-belt trace at 25 Hz; forecasts 5, 10 and 15 steps ahead = 0.2, 0.4 and 0.6 s,
   the latency range of tumour-tracking radiotherapy (the reference paper's lung-tumour-motion setting).
   Skipped with a message when the data package is missing.

Methods: Monte Carlo EM (particle smoother E-step), mean-field EM, SVI with the structured Markov Gaussian
guide and with the mean-field guide, EKF-EM and BPTT (deterministic), plus persistence and a linear AR(5)
as reference rows. (SVI with the EKF guide is left out: at the time of writing one of its steps costs
seconds at T=300, far beyond the demo's budget.) Each method gets a fixed compute budget (iterations
listed in :data:`DEMO_METHODS`) so the whole demo runs in under 10 minutes on 2 cores with two dask
workers (``--quick``: tiny settings, for tests). A method that has not converged within its budget is
scored as it stands; its trace shows it. Output: ``report.md`` (which method won and why, tables, figures), one
sub-directory per problem with ``compare.nc``, the cell files and PNGs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .report import comparison_table, summarise, text_table, verdict, write_report

__all__ = ["run_demo", "demo_methods"]

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


def demo_methods(quick: bool = False) -> dict:
    """``{label: method}`` of the demo (full or quick settings)."""
    from ppl_rnn.inference.registry import make_method

    return {label: make_method(t, **(q if quick else full)) for label, (t, full, q) in DEMO_METHODS.items()}


def _problem_settings(quick: bool) -> dict:
    if quick:
        return {"synthetic": dict(train=100, test=40, horizons=[1, 5], seeds=[0], num_particles=200, samples=20),
                "respiration": dict(max_steps=200, train=150, horizons=[5, 10], seeds=[0], num_particles=200,
                                    samples=20)}
    return {"synthetic": dict(train=500, test=250, horizons=[1, 5, 10], seeds=[0, 1], num_particles=2000,
                              samples=100),
            "respiration": dict(max_steps=1125, train=750, horizons=[1, 5, 10, 15], seeds=[0], num_particles=2000,
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


def run_demo(out, *, quick: bool = False, workers: int = 1, respiration: bool = True, echo=print) -> dict:
    """Run the demo into directory ``out``; returns ``{problem: compare Dataset}``."""
    from ppl_rnn.inference.reference import FixedModel
    from ppl_rnn.models import ElmanSSM

    from . import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    settings = _problem_settings(quick)
    results, sections = {}, []

    # 1. the synthetic benchmark -----------------------------------------------------------------
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
        try:
            rrec = datasets.load("respiration", max_steps=st["max_steps"])
        except ImportError as e:
            echo(f"\n== respiration skipped: {e}")
            sections.append({"heading": "2. Breathing-motion forecasting (skipped)",
                             "text": f"The respiration data set is not available here: {e}"})
            rrec = None
        if rrec is not None:
            rtr, rte = rrec.split(train_steps=st["train"])
            dt = rrec.sampling_interval or 0.04
            lab = lambda h: f"{h * dt:.2g} s"  # noqa: E731
            model = ElmanSSM(4, 1, process_noise=0.3, obs_noise=0.3, seed=1)
            ds, figs, win, wall = _run_problem("respiration", rtr.values, rte.values, model, demo_methods(quick), st,
                                               out / "respiration", REFERENCE, workers, echo, dt=dt, unit="s",
                                               steps_label=lab)
            results["respiration"] = ds
            sections.append({
                "heading": "2. Breathing-motion forecasting (respiration, 25 Hz)",
                "text": (f"{rrec.description} Robust-scaled. {st['train']} training steps "
                         f"({st['train'] * dt:.0f} s), {rte.values.shape[1]} test steps; forecast leads "
                         + ", ".join(f"{h} steps = {h * dt:.2g} s" for h in st["horizons"])
                         + " (the latency range of tumour tracking).\n\n"
                         + verdict(ds, reference=REFERENCE, steps_label=lab) + "\n\n"
                         + comparison_table(ds, reference=REFERENCE, steps_label=lab)
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
