"""Generate the example notebooks (no stored outputs): ``python notebooks/make_notebooks.py``.

Every notebook reads ``PPL_RNN_SMALL=1`` in its first cell and then uses tiny settings, so
``tests/test_notebooks.py`` executes all of them in well under a minute each.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """import os, warnings
warnings.filterwarnings("ignore", category=FutureWarning)
SMALL = os.environ.get("PPL_RNN_SMALL") == "1"   # tiny settings for the test suite
import numpy as np
import torch
import matplotlib
import ppl_rnn as pr
from ppl_rnn.workbench import plots
from ppl_rnn.models import ElmanSSM
torch.manual_seed(0)"""


def nb(cells):
    out = new_notebook()
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out.cells = [new_markdown_cell(c[1]) if c[0] == "md" else new_code_cell(c[1]) for c in cells]
    for i, c in enumerate(out.cells):  # deterministic ids: regenerating gives byte-identical files
        c.id = f"cell-{i:02d}"
    return out


NOTEBOOKS = {}

NOTEBOOKS["01_define_your_own_model.ipynb"] = nb([
    ("md", "# 01 — Define your own model\n\nA model is a `StateSpaceModel` with three conditionals: `initial`, "
           "`transition`, `emission`. Write them once; every inference method (particle filter, EKF, SVI, MCEM) "
           "reads the same three. Here: a noisy **damped pendulum** observed through its horizontal position."),
    ("code", SETUP),
    ("code", '''import pyro.distributions as dist
from pyro.nn import PyroParam
from pyro.distributions import constraints

class Pendulum(pr.StateSpaceModel):
    """h = (angle, angular velocity); y = sin(angle) + noise."""
    def __init__(self, dt=0.1, damping=0.2, q=0.05, r=0.1):
        super().__init__(hidden_dim=2, obs_dim=1)
        self.dt = dt
        self.damping = PyroParam(torch.tensor(damping), constraint=constraints.positive)
        self.q = PyroParam(torch.tensor(q), constraint=constraints.positive)
        self.r = PyroParam(torch.tensor(r), constraint=constraints.positive)

    def initial(self, u0):
        return dist.Normal(torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.3])).to_event(1)

    def transition_mean(self, t, h, u):
        a, w = h[..., 0], h[..., 1]
        w_new = w + self.dt * (-torch.sin(a) - self.damping * w)
        return torch.stack([a + self.dt * w_new, w_new], -1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(self.transition_mean(t, h_prev, u_t), self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(torch.sin(h[..., :1]), self.r).to_event(1)

model = Pendulum()
sim = model.simulate(num_steps=100 if SMALL else 300, num_sequences=2, seed=0)
sim.observations.shape, sim.states.shape'''),
    ("md", "The Pyro program `forward` is composed from the three conditionals, so Pyro sees an ordinary model: "
           "the trace's log-density equals the sum of the conditionals' log-densities."),
    ("code", '''from pyro import poutine
tr = poutine.trace(poutine.condition(model, data={f"h_{t}": sim.states[:, t] for t in range(sim.states.shape[1])})
                   ).get_trace(sim.observations)
by_hand = model.initial(None).log_prob(sim.states[:, 0]).sum()
for t in range(1, sim.states.shape[1]):
    by_hand = by_hand + model.transition(t, sim.states[:, t - 1], None).log_prob(sim.states[:, t]).sum()
for t in range(sim.states.shape[1]):
    by_hand = by_hand + model.emission(t, sim.states[:, t], None).log_prob(sim.observations[:, t]).sum()
print(float(tr.log_prob_sum()), float(by_hand))
assert abs(float(tr.log_prob_sum()) - float(by_hand)) < 1e-2'''),
    ("md", "Missing data are NaN. Filter the pendulum with a particle filter and with the extended Kalman "
           "filter (Jacobians by autograd) — no extra code in the model."),
    ("code", '''y = sim.observations.clone()
y[0, 40:50] = float("nan")        # a gap in sequence 0
pf = pr.infer(model, y, method=pr.inference.ParticleFilter(num_particles=500 if SMALL else 5000), seed=0)
ekf = pr.infer(model, y, method=pr.inference.ExtendedKalmanFilter())
print("log-evidence  particle filter:", pf.log_evidence.numpy().round(2), "  EKF:", ekf.log_evidence.numpy().round(2))
fig = plots.plot_states(pf, sim.states, title="particle filter on the pendulum (gap at steps 40-49 in sequence 0)")
fig'''),
    ("code", '''fig = plots.plot_ess(pf)
fig'''),
])

NOTEBOOKS["02_smc_vs_exact_kalman.ipynb"] = nb([
    ("md", "# 02 — Sequential Monte Carlo against exact Kalman\n\nOn a linear-Gaussian model "
           "(`ElmanSSM(activation='identity')`) the Kalman filter is exact. The particle filter's evidence "
           "estimate `Ẑ` is unbiased for `Z`, so the mean of `Ẑ/Z` over independent runs is 1 (within its "
           "standard error); its filtered means agree with Kalman's."),
    ("code", SETUP),
    ("code", '''model = ElmanSSM(3, 1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=2)
y = model.simulate(60 if SMALL else 200, seed=0).observations
exact = pr.infer(model, y, method=pr.inference.KalmanFilter())
N = 200 if SMALL else 2000
runs = [pr.infer(model, y, method=pr.inference.ParticleFilter(num_particles=N), seed=s) for s in range(8 if SMALL else 40)]
ratio = torch.stack([torch.exp(r.log_evidence - exact.log_evidence) for r in runs]).squeeze()
print(f"exact log Z = {float(exact.log_evidence):.3f};  mean Zhat/Z = {float(ratio.mean()):.3f} "
      f"+- {float(ratio.std() / len(ratio) ** 0.5):.3f} (SE)")'''),
    ("code", '''err = torch.stack([r.mean for r in runs]).mean(0) - exact.mean
print("max |mean filtered state - Kalman| over time:", float(err.abs().max()))
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(exact.mean[0, :, 0], "k", label="Kalman filter mean")
ax.plot(runs[0].mean[0, :, 0], "C1--", label=f"particle filter mean (N={N})")
ax.legend(); ax.set_xlabel("time step"); ax.set_ylabel("h[0]");'''),
    ("md", "Smoothing: the particle smoother (forward filter + backward simulation, Godsill, Doucet & West 2004) "
           "against the Rauch–Tung–Striebel smoother."),
    ("code", '''rts = pr.infer(model, y, method=pr.inference.KalmanSmoother())
ps = pr.infer(model, y, method=pr.inference.ParticleSmoother(num_particles=N, num_paths=100 if SMALL else 500), seed=0)
print("max |smoothed mean difference|:", float((ps.mean - rts.mean).abs().max()),
      " typical posterior sd:", float(rts.var.sqrt().mean()))
fig = plots.plot_states(ps, None, title="particle smoother (bands) on the linear model")
fig'''),
])

NOTEBOOKS["03_mcem_synthetic_benchmark.ipynb"] = nb([
    ("md", "# 03 — Monte Carlo EM on the synthetic benchmark\n\nUnkelbach, Yi & Schmidhuber (2009): treat the "
           "RNN as a nonlinear state-space model, use a particle smoother as the E-step, maximise the expected "
           "complete-data log-likelihood in the M-step. `unkelbach-synthetic` is generated by a fixed 4-unit "
           "stochastic Elman network, so we can compare the fitted network with the true one."),
    ("code", SETUP),
    ("code", '''from ppl_rnn.workbench import datasets
rec = datasets.load("unkelbach-synthetic", seed=0, train_steps=200 if SMALL else 1000, test_steps=60 if SMALL else 500)
train, test = rec.split()
print(rec)
# random initial network: a random rotation near the identity (slow oscillatory modes for EM to tune; from
# Gaussian random weights EM tends to stop in a linear-regime local optimum, see the README)
model0 = ElmanSSM(4, 1, process_noise=0.3, obs_noise=0.3, seed=1, weight_init="rotation", weight_scale=1.1)'''),
    ("code", '''from ppl_rnn.inference.registry import make_method   # MonteCarloEM with a particle smoother
mcem = make_method("mcem", num_particles=100 if SMALL else 500, num_paths=20 if SMALL else 100,
                   num_iterations=3 if SMALL else 30, backward="mcmc")
fit = pr.fit(model0, train.values, method=mcem, seed=0)
print(f"fitted in {fit.wall_time_s:.1f} s; converged: {fit.converged}")
fig = plots.plot_traces({"MCEM": fit.trace}, kinds={"MCEM": fit.evidence_kind}, variable="log_evidence")
fig'''),
    ("md", "Score the fitted network and the true network with the same yardstick: held-out log-evidence per "
           "step (particle filter at the fitted parameters, conditioning on the training part) and forecast CRPS."),
    ("code", '''kw = dict(horizons=[1, 5], num_particles=300 if SMALL else 500, seed=0)
ev_fit = pr.evaluate(fit.model, train.values, test.values, **kw)
ev_true = pr.evaluate(rec.true_model, train.values, test.values, **kw)
ev_init = pr.evaluate(model0, train.values, test.values, **kw)
for name, ev in [("initial", ev_init), ("MCEM", ev_fit), ("true", ev_true)]:
    print(f"{name:8s} held-out log-ev/step {float(ev.heldout_logev_per_step):7.3f} ± "
          f"{float(ev.heldout_logev_per_step_se):.3f}   CRPS(1, 5) {ev.crps.values.round(3)}")'''),
    ("code", '''fc = pr.forecast(fit.model, train.values, horizon=10, num_samples=300, seed=0)
fig = plots.plot_forecast(train.values, fc, truth=test.values[:, :10], history=80, label="MCEM forecast")
fig'''),
])

NOTEBOOKS["04_svi_guides_and_ekf.ipynb"] = nb([
    ("md", "# 04 — SVI guides and the extended Kalman filter\n\nOn a linear-Gaussian model every guide's ELBO is "
           "a lower bound on the exact log-evidence; a structured (Markov) guide can reach it, a mean-field guide "
           "cannot. The EKF is exact on linear models and an approximation on the tanh network."),
    ("code", SETUP),
    ("code", '''lin = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=3)
y = lin.simulate(30 if SMALL else 100, seed=0).observations
exact = float(pr.infer(lin, y, method=pr.inference.KalmanSmoother()).log_evidence)
steps = 40 if SMALL else 1500
res = {}
for guide in ["mean_field", "markov_gaussian"]:
    post = pr.infer(lin, y, method=pr.inference.SVI(guide=guide, num_steps=steps, lr=0.05), seed=0)
    res[guide] = float(post.log_evidence)
    print(f"{guide:16s} ELBO {res[guide]:8.2f}   (exact log-evidence {exact:.2f}; evidence_kind={post.evidence_kind})")'''),
    ("md", "The EKF on the nonlinear benchmark network against a particle filter (the EKF's log-likelihood is "
           "an approximation; the particle filter's is an unbiased estimate of the evidence)."),
    ("code", '''from ppl_rnn.workbench import datasets
rec = datasets.load("unkelbach-synthetic", seed=0, train_steps=100 if SMALL else 500, test_steps=10)
y = rec.split()[0].values
ekf = pr.infer(rec.true_model, y, method=pr.inference.ExtendedKalmanSmoother())
pf = pr.infer(rec.true_model, y, method=pr.inference.ParticleFilter(num_particles=500 if SMALL else 5000), seed=0)
print("log-evidence  EKF (approximation):", float(ekf.log_evidence), "  particle filter (estimate):", float(pf.log_evidence))
fig = plots.plot_states(ekf, rec.split()[0].states, title="extended Kalman smoother vs the true states")
fig'''),
    ("md", "The EKF as a particle-filter proposal: each particle takes a one-step EKF update towards the "
           "observation, with importance weights that keep the evidence unbiased; with small observation noise "
           "it keeps far more effective particles."),
    ("code", '''sharp = ElmanSSM(4, 1, process_noise=0.3, obs_noise=0.05, weight_scale=1.5, seed=4)
ys = sharp.simulate(50 if SMALL else 200, seed=0).observations
N = 200 if SMALL else 1000
boot = pr.infer(sharp, ys, method=pr.inference.ParticleFilter(num_particles=N, proposal="bootstrap"), seed=0)
guided = pr.infer(sharp, ys, method=pr.inference.ParticleFilter(num_particles=N, proposal="ekf"), seed=0)
print("mean ESS  bootstrap:", float(boot.diagnostics["ess"].mean()), "  EKF proposal:", float(guided.diagnostics["ess"].mean()))'''),
])

NOTEBOOKS["05_compare_methods_with_arviz.ipynb"] = nb([
    ("md", "# 05 — Comparing all methods with one yardstick, read with ArviZ\n\n`pr.compare` fits a fresh copy of "
           "the model with every method and seed, and scores every fit with the same evaluator. Each method's own "
           "objective is reported beside it, labelled with its kind, and never mixed with the yardstick."),
    ("code", SETUP),
    ("code", '''import arviz as az
from ppl_rnn.workbench import datasets
from ppl_rnn.inference.registry import make_method
from ppl_rnn.inference.reference import LinearAR, Persistence, FixedModel
rec = datasets.load("unkelbach-synthetic", seed=0, train_steps=120 if SMALL else 1000, test_steps=40 if SMALL else 500)
train, test = rec.split()
model0 = ElmanSSM(4, 1, process_noise=0.3, obs_noise=0.3, seed=1)
methods = {
    "MCEM": make_method("mcem", num_particles=60 if SMALL else 300, num_paths=10 if SMALL else 50,
                        num_iterations=2 if SMALL else 12, backward="mcmc"),
    "mean-field EM": make_method("meanfield_em", num_iterations=3 if SMALL else 30),
    "BPTT": make_method("bptt", num_steps=10 if SMALL else 400, lr=0.02),
    "AR(5)": LinearAR(order=5),
    "persistence": Persistence(),
    "true network": FixedModel(rec.true_model, label="true network"),
}
ds = pr.compare(model0, train.values, test.values, methods=methods, seeds=[0, 1], horizons=[1, 5],
                num_particles=200 if SMALL else 500, num_samples=40 if SMALL else 200, progress=False)
ds[["heldout_logev_per_step", "crps", "wall_time_s", "own_objective", "own_evidence_kind", "error"]]'''),
    ("code", '''from ppl_rnn.workbench.report import text_table, verdict
ref = ("AR(5)", "persistence", "true network")
print(text_table(ds, reference=ref))
print()
print(verdict(ds, reference=ref))
fig = plots.plot_comparison(ds, reference=ref)
fig'''),
    ("md", "One `InferenceData` per method (chains = seeds, equal draws). `log_likelihood.y_onestep` holds "
           "pointwise one-step log-likelihoods at filtering draws, so PSIS-LOO's `elpd_loo` estimates the "
           "one-step-ahead log score and `az.compare` ranks the methods by it."),
    ("code", '''idatas = pr.to_inference_data(ds)
print({k: dict(v.posterior.sizes) for k, v in idatas.items()})
az.compare(idatas, var_name="y_onestep")'''),
    ("code", '''az.summary(idatas["MCEM"], var_names=["signal"]).head()'''),
])

NOTEBOOKS["06_breathing_motion_forecasting.ipynb"] = nb([
    ("md", "# 06 — Breathing-motion forecasting\n\nIn radiotherapy of lung tumours the beam must follow the "
           "breathing motion, and the system's latency means the position must be **forecast 0.2–0.6 s ahead** "
           "(the setting of Unkelbach et al. 2009). Here: a breathing-belt trace at 25 Hz (5–15 steps ahead). The "
           "trace comes from an optional package; without it the notebook says so and stops.\n\n"
           "**Data done right.** The recording starts with minutes of irregular breathing; the loader's "
           "`REGULAR_BREATHING_WINDOW` (730–910 s) holds regular cycles of about 3.3 s, of which the first "
           "2 minutes train and the last minute is held out. The 1000 Hz belt signal is decimated by *causal* "
           "filters (no sample depends on a later raw sample), the filters' start-up second is never returned, "
           "and the robust scaling uses the training part only, so nothing of the test part leaks into the "
           "preprocessing."),
    ("code", SETUP),
    ("code", '''from ppl_rnn.workbench import datasets
try:
    if SMALL:
        rec = datasets.load("respiration", window=(730.0, 40.0), train_s=30.0, dtype=torch.float64)
    else:
        rec = datasets.load("respiration", window=datasets.REGULAR_BREATHING_WINDOW,
                            train_s=datasets.REGULAR_BREATHING_TRAIN_S, dtype=torch.float64)
except ImportError as e:
    rec = None
    print("respiration data not available:", e)
rec'''),
    ("md", "Four rows, one yardstick: **AR(p)** with p chosen by AIC on the training part; **persistence**; "
           "**KalmanEM** on the network's linear special case (exact EM for the linear state-space model); and the "
           "**tanh network trained by Monte Carlo EM from the linear warm start** (`MonteCarloEM(init=\"linear\")`: "
           "the same KalmanEM fit embedded in tanh's linear regime, then MCEM). The last paragraph says whether "
           "the nonlinearity earns its keep on this signal."),
    ("code", '''if rec is not None:
    train, test = rec.split()   # the cut the scaling statistics were computed on
    dt = rec.sampling_interval
    from ppl_rnn.inference import KalmanEM, MonteCarloEM, ParticleSmoother
    from ppl_rnn.inference.reference import LinearAR, Persistence
    from ppl_rnn.workbench.demo import LinearSpecialCase, linear_or_nonlinear
    H, kem_its = (3, 3) if SMALL else (6, 60)
    model0 = ElmanSSM(H, 1, seed=1).double()
    methods = {"AR(p by AIC)": LinearAR(order="aic", max_order=30), "persistence": Persistence(),
               "KalmanEM (linear SSM)": LinearSpecialCase(KalmanEM(num_iterations=kem_its, tol=0.0)),
               "MCEM (linear start)": MonteCarloEM(
                   init="linear", init_iterations=kem_its, num_iterations=1 if SMALL else 4, tol=0.0,
                   smoother=ParticleSmoother(50 if SMALL else 300, 10 if SMALL else 50, backward="mcmc"))}
    import tempfile
    run_dir = tempfile.mkdtemp(prefix="ppl_rnn_06_")   # cells (and fitted models) are saved here
    ds = pr.compare(model0, train.values, test.values, methods=methods, seeds=[0], horizons=[5, 10, 15],
                    num_particles=200 if SMALL else 500, num_samples=40 if SMALL else 200, out=run_dir,
                    progress=False)
    from ppl_rnn.workbench.report import text_table
    lab = lambda h: f"{h * dt:.1f} s"
    print(text_table(ds, reference=("AR(p by AIC)", "persistence"), steps_label=lab))
    print()
    print(linear_or_nonlinear(ds, steps_label=lab))'''),
    ("code", '''if rec is not None:
    best = str(ds.method.values[int(np.nanargmax(ds.heldout_logev_per_step.values[:, 0]))])
    print("best on held-out log-evidence:", best)
    from ppl_rnn.workbench.compare import load_cell_model
    fitted = load_cell_model(run_dir, best, 0)
    fc = pr.forecast(fitted, train.values, horizon=15, num_samples=400, seed=0)
    fig = plots.plot_forecast(train.values, fc, truth=test.values[:, :15], history=100, dt=dt, time_unit="s",
                              label=f"{best}: 0.6 s forecast")
    fig'''),
])


def main():
    for name, book in NOTEBOOKS.items():
        nbformat.validate(book)
        nbformat.write(book, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
