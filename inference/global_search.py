r"""Global optimisation of the deterministic network's weight vector: CMA-ES, a genetic algorithm, simulated
annealing and particle swarm optimisation.

Training a recurrent network "can be modeled as a non-linear global optimization problem": the weight vector
:math:`\theta\in\mathbb R^P` (the model's ``weights`` / ``set_weights`` capabilities) is scored by presenting the
training sequences to the network and returning the mean squared error,

.. math:: E(\theta) = \frac{1}{N_o}\sum_{b,t,k\ \text{observed}} \big(y_{btk} - E_\theta[y_{tk}\mid\bar h_{bt}]\big)^2,
          \qquad \bar h_0 = E[h_0],\ \bar h_t = f_\theta(\bar h_{t-1}, u_t),

the one-step error of the noise-free rollout (the deterministic network of :class:`~ppl_rnn.inference.BPTT`).
A whole population :math:`\theta_1..\theta_K` is scored in one ``torch.func.vmap`` over the model's own
conditionals (a loop where a model's conditionals cannot be vmapped). Strategies (``strategy=``):

* ``"cma"`` — CMA-ES from the ``cma`` package (Hansen): :math:`\theta_i\sim N(m, \sigma^2 C)`, mean, step size
  and covariance adapted from the ranked population;
* ``"genetic"`` — the genetic algorithm of the reference texts: one gene per weight, the whole network one
  chromosome; fitness :math:`1/E(\theta)`; **selection** by tournament (``selection="tournament"``, size
  ``tournament_size``) or fitness-proportional roulette wheel (``"roulette"``, probabilities :math:`\propto 1/E`);
  **crossover** uniform (each gene from either parent, with probability ``crossover_rate`` per child);
  **mutation** :math:`\theta_j \mathrel{+}= N(0, s^2)` per gene with probability ``mutation_rate``
  (:math:`s` = ``mutation_scale``); the ``elite`` best survive unchanged;
* ``"annealing"`` — simulated annealing, ``population_size`` independent chains evaluated together: proposal
  :math:`\theta' = \theta + \delta\,N(0, I)`, accepted with probability
  :math:`\min(1, \exp(-(E(\theta')-E(\theta))/(T_g E_0)))` (:math:`E_0` the initial error, so temperatures are
  relative), geometric cooling :math:`T_g = T_0 (T_\text{end}/T_0)^{g/G}`, per-chain step :math:`\delta` adapted by
  the one-fifth success rule;
* ``"swarm"`` — particle swarm optimisation with the constriction coefficients of Clerc & Kennedy:
  :math:`v \leftarrow w v + c_1 r_1 (p - \theta) + c_2 r_2 (g - \theta)`, :math:`\theta \leftarrow \theta + v`
  (:math:`p` personal best, :math:`g` swarm best, :math:`r_{1,2}\sim U(0,1)` per coordinate).

Every population starts around the model's current weights (step ``sigma``; the current weights are a member).

**Stopping rules** (the texts' list, first one met): the error reaches ``target_mse``; the network has learnt
``target_fraction`` of the training data (observed entries with :math:`|y - \hat y|\le` ``fraction_tolerance``);
``max_generations``; stagnation (no relative improvement of the best error by ``min_improvement`` within
``patience`` generations); CMA-ES's own termination criteria.

The fitted model holds the best weights found, the process noise and initial spread of :class:`BPTT`
(``noise_floor``) and the maximum-likelihood observation noise given the rollout's residuals (all through
``set_noise_scales``), so the common evaluator scores it like any other fitted model.
``FitResult.trace`` (dim ``iteration`` = generation; row 0 = the initial weights): ``objective`` = minus the best
error so far, ``mse`` (best so far), ``generation_mse`` (the generation's median), ``evaluations``,
``log_evidence`` = the deterministic log-likelihood at the best weights with the maximum-likelihood diagonal
observation noise, :math:`-\tfrac12\sum_k n_k(1+\log 2\pi E_k)` (``evidence_kind="approximation"``), the
parameters, ``wall_time_s``. ``diagnostics``: ``stop_reason``, ``initial_mse``, ``best_mse``, ``generations``,
``evaluations``, ``vectorised``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import InferenceMethod, check_choice, check_positive_float, check_positive_int
from ppl_rnn.results import FitResult
from ppl_rnn.rng import seeded

from .em_common import TraceRecorder
from .rtrl import FlatWeights, deterministic_noise, squared_errors

STRATEGIES = ("cma", "genetic", "annealing", "swarm")


class _CMA:
    """CMA-ES of the ``cma`` package through its ask/tell interface (numpy's global RNG, seeded by the caller)."""

    def __init__(self, x0, sigma, popsize, max_generations):
        import cma

        opts = {"seed": np.nan, "verbose": -9, "verb_log": 0, "verb_disp": 0,
                "maxiter": max_generations + 1, "tolstagnation": 10**9}
        if popsize is not None:
            opts["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(x0.double().numpy(), sigma, opts)
        self.dtype = x0.dtype

    def ask(self):
        self._X = self.es.ask()
        return torch.as_tensor(np.array(self._X), dtype=self.dtype)

    def tell(self, X, f):
        f = f.double().numpy().copy()
        bad = ~np.isfinite(f)
        if bad.any():  # CMA-ES ranks: a non-finite error is worse than every finite one
            f[bad] = (np.max(f[~bad]) if (~bad).any() else 1.0) * 10 + 1e30
        self.es.tell(self._X, f.tolist())

    def stop(self):
        s = {k: v for k, v in self.es.stop().items() if k != "maxiter"}
        return ("cma: " + ", ".join(s)) if s else None


class _Genetic:
    """Real-coded genetic algorithm (see the module docstring)."""

    def __init__(self, x0, sigma, K, *, elite, crossover_rate, mutation_rate, mutation_scale, selection,
                 tournament_size):
        self.pop = x0 + sigma * torch.randn(K, x0.numel(), dtype=x0.dtype)
        self.pop[0] = x0
        self.K, self.elite = K, elite
        self.crossover_rate, self.mutation_rate, self.mutation_scale = crossover_rate, mutation_rate, mutation_scale
        self.selection, self.tournament_size = selection, tournament_size
        self.f = None

    def _select(self, n):
        f = torch.where(torch.isfinite(self.f), self.f, torch.full_like(self.f, math.inf))
        if self.selection == "tournament":
            idx = torch.randint(self.K, (n, self.tournament_size))
            return idx[torch.arange(n), f[idx].argmin(1)]
        fitness = torch.where(torch.isfinite(f), 1.0 / f.clamp_min(1e-300), torch.zeros_like(f))  # 1/MSE
        if not bool(fitness.sum() > 0):
            return torch.randint(self.K, (n,))
        return torch.multinomial(fitness, n, replacement=True)

    def ask(self):
        if self.f is None:
            return self.pop
        order = torch.argsort(torch.where(torch.isfinite(self.f), self.f, torch.full_like(self.f, math.inf)))
        elites = self.pop[order[:self.elite]]
        n = self.K - self.elite
        a, b = self.pop[self._select(n)], self.pop[self._select(n)]
        P = self.pop.shape[1]
        genes = torch.rand(n, P) < 0.5
        cross = (torch.rand(n, 1) < self.crossover_rate) & genes
        child = torch.where(cross, b, a)
        mutate = torch.rand(n, P) < self.mutation_rate
        child = child + mutate * self.mutation_scale * torch.randn(n, P, dtype=child.dtype)
        return torch.cat([elites, child])

    def tell(self, X, f):
        self.pop, self.f = X, f

    def stop(self):
        return None


class _Annealing:
    """Simulated annealing, K chains evaluated together (see the module docstring)."""

    def __init__(self, x0, sigma, K, *, e0, t0, t_end, max_generations):
        self.x = x0 + sigma * torch.randn(K, x0.numel(), dtype=x0.dtype)
        self.x[0] = x0
        self.E = None
        self.step = torch.full((K,), sigma, dtype=x0.dtype)
        self.e0, self.t0, self.t_end, self.G = max(e0, 1e-300), t0, t_end, max_generations
        self.g = 0

    def ask(self):
        if self.E is None:
            return self.x
        return self.x + self.step[:, None] * torch.randn(self.x.shape, dtype=self.x.dtype)

    def tell(self, X, f):
        f = torch.where(torch.isfinite(f), f, torch.full_like(f, math.inf))
        if self.E is None:
            self.x, self.E = X, f
            return
        self.g += 1
        T = self.t0 * (self.t_end / self.t0) ** (self.g / self.G)
        dE = f - self.E
        accept = torch.isfinite(f) & ((dE <= 0) | (torch.rand(f.shape, dtype=f.dtype) < torch.exp(-dE / (T * self.e0))))
        self.x = torch.where(accept[:, None], X, self.x)
        self.E = torch.where(accept, f, self.E)
        # the one-fifth success rule: the step is stationary at an acceptance rate of 1/5
        self.step = self.step * torch.where(accept, math.exp(0.8 * 0.5), math.exp(-0.2 * 0.5))

    def stop(self):
        return None


class _Swarm:
    """Particle swarm optimisation with constriction coefficients (see the module docstring)."""

    def __init__(self, x0, sigma, K, *, inertia, cognitive, social):
        self.x = x0 + sigma * torch.randn(K, x0.numel(), dtype=x0.dtype)
        self.x[0] = x0
        self.v = 0.5 * sigma * torch.randn(self.x.shape, dtype=x0.dtype)
        self.vmax = 4.0 * sigma
        self.w, self.c1, self.c2 = inertia, cognitive, social
        self.pbest, self.pf, self.first = self.x.clone(), None, True

    def ask(self):
        if self.first:
            return self.x
        g = self.pbest[self.pf.argmin()]
        r1, r2 = torch.rand(self.x.shape, dtype=self.x.dtype), torch.rand(self.x.shape, dtype=self.x.dtype)
        self.v = (self.w * self.v + self.c1 * r1 * (self.pbest - self.x) + self.c2 * r2 * (g - self.x))
        self.v = self.v.clamp(-self.vmax, self.vmax)
        self.x = self.x + self.v
        return self.x

    def tell(self, X, f):
        f = torch.where(torch.isfinite(f), f, torch.full_like(f, math.inf))
        if self.first:
            self.pf, self.first = f, False
            return
        better = f < self.pf
        self.pbest = torch.where(better[:, None], X, self.pbest)
        self.pf = torch.where(better, f, self.pf)

    def stop(self):
        return None


class GlobalSearch(InferenceMethod):
    r"""Global optimisation of the weight vector with the mean squared one-step error of the noise-free network
    as fitness (see the module docstring).

    Args:
        strategy: ``"cma"``, ``"genetic"``, ``"annealing"`` or ``"swarm"``.
        population_size: candidates per generation (chains for annealing); default 32, and CMA-ES's own
            :math:`4 + \lfloor 3\ln P\rfloor` for ``"cma"``.
        max_generations: stop after this many generations.
        sigma: initial search scale around the current weights (CMA-ES's :math:`\sigma_0`, the spread of the first
            population, the annealing step).
        target_mse: stop when the best error is at most this.
        target_fraction, fraction_tolerance: stop when this fraction of the observed training entries is
            predicted within ``fraction_tolerance``.
        patience, min_improvement: stop when the best error has not improved by the relative amount
            ``min_improvement`` within ``patience`` generations.
        elite, crossover_rate, mutation_rate, mutation_scale, selection, tournament_size: genetic algorithm
            (``mutation_scale`` defaults to ``sigma``).
        initial_temperature, final_temperature: annealing temperatures relative to the initial error.
        inertia, cognitive, social: particle swarm coefficients.
        noise_floor: process-noise / initial-spread scale of the returned model.
        record_every: trace row every this many generations.
        progress: progress bar.
    """

    def __init__(self, *, strategy: str = "cma", population_size: int | None = None, max_generations: int = 200,
                 sigma: float = 0.2, target_mse: float | None = None, target_fraction: float | None = None,
                 fraction_tolerance: float = 0.1, patience: int = 50, min_improvement: float = 1e-4,
                 elite: int = 2, crossover_rate: float = 0.9, mutation_rate: float = 0.1,
                 mutation_scale: float | None = None, selection: str = "tournament", tournament_size: int = 3,
                 initial_temperature: float = 0.05, final_temperature: float = 1e-4, inertia: float = 0.7298,
                 cognitive: float = 1.49618, social: float = 1.49618, noise_floor: float = 1e-4,
                 record_every: int = 1, progress: bool = False):
        self.strategy = check_choice(strategy, "strategy", STRATEGIES)
        self.population_size = (None if population_size is None
                                else check_positive_int(population_size, "population_size", minimum=2))
        self.max_generations = check_positive_int(max_generations, "max_generations")
        self.sigma = check_positive_float(sigma, "sigma")
        self.target_mse = None if target_mse is None else check_positive_float(target_mse, "target_mse",
                                                                                allow_zero=True)
        if target_fraction is not None and not (isinstance(target_fraction, (int, float))
                                                and not isinstance(target_fraction, bool) and 0 < target_fraction <= 1):
            raise ConfigurationError(f"target_fraction must be in (0, 1] or None; found {target_fraction!r}.")
        self.target_fraction = None if target_fraction is None else float(target_fraction)
        self.fraction_tolerance = check_positive_float(fraction_tolerance, "fraction_tolerance")
        self.patience = check_positive_int(patience, "patience")
        self.min_improvement = check_positive_float(min_improvement, "min_improvement", allow_zero=True)
        self.elite = check_positive_int(elite, "elite", minimum=0)
        K = 32 if self.population_size is None else self.population_size
        if self.strategy == "genetic" and self.elite >= K:
            raise ConfigurationError(f"elite ({elite}) must be smaller than population_size ({K}).")
        for nm, v in (("crossover_rate", crossover_rate), ("mutation_rate", mutation_rate)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigurationError(f"{nm} must be a probability in [0, 1]; found {v!r}.")
        self.crossover_rate, self.mutation_rate = float(crossover_rate), float(mutation_rate)
        self.mutation_scale = self.sigma if mutation_scale is None else check_positive_float(mutation_scale,
                                                                                              "mutation_scale")
        self.selection = check_choice(selection, "selection", ("tournament", "roulette"))
        self.tournament_size = check_positive_int(tournament_size, "tournament_size")
        self.initial_temperature = check_positive_float(initial_temperature, "initial_temperature")
        self.final_temperature = check_positive_float(final_temperature, "final_temperature")
        self.inertia = check_positive_float(inertia, "inertia")
        self.cognitive = check_positive_float(cognitive, "cognitive", allow_zero=True)
        self.social = check_positive_float(social, "social", allow_zero=True)
        self.noise_floor = check_positive_float(noise_floor, "noise_floor")
        self.record_every = check_positive_int(record_every, "record_every")
        self.progress = bool(progress)

    @property
    def name(self) -> str:
        return f"global_search_{self.strategy}"

    def _strategy(self, x0, e0):
        K = 32 if self.population_size is None else self.population_size
        s = self.strategy
        if s == "cma":
            return _CMA(x0, self.sigma, self.population_size, self.max_generations)
        if s == "genetic":
            return _Genetic(x0, self.sigma, K, elite=self.elite, crossover_rate=self.crossover_rate,
                            mutation_rate=self.mutation_rate, mutation_scale=self.mutation_scale,
                            selection=self.selection, tournament_size=self.tournament_size)
        if s == "annealing":
            return _Annealing(x0, self.sigma, K, e0=e0, t0=self.initial_temperature, t_end=self.final_temperature,
                              max_generations=self.max_generations)
        return _Swarm(x0, self.sigma, K, inertia=self.inertia, cognitive=self.cognitive, social=self.social)

    def _fit(self, model, data, seed):
        t0 = time.perf_counter()
        flat = FlatWeights(model, needed_by=f"GlobalSearch(strategy={self.strategy!r})",
                           alternative="use BPTT, SVI or MonteCarloEM")
        y, mask = data.observations, data.mask
        n_obs = max(data.num_observed, 1)
        vectorised = True

        def score(X):
            nonlocal vectorised
            pred, vec = flat.population_predictions(X, data)
            vectorised = vectorised and vec
            sse, n = squared_errors(pred, data)  # (K, D)
            mse = sse.sum(-1) / n_obs
            frac = None
            if self.target_fraction is not None:
                ok = ((pred - y).abs() <= self.fraction_tolerance) & mask
                frac = ok.sum((1, 2, 3)).to(mse.dtype) / n_obs
            return mse, sse, n, frac

        def log_lik(sse, n):
            ms = (sse / n.clamp_min(1)).clamp_min(self.noise_floor**2)
            return float(-0.5 * (n * (1 + torch.log(2 * math.pi * ms))).sum())

        rec = TraceRecorder()
        with seeded(seed):
            x0 = flat.vector()
            f0, sse0, n, frac0 = score(x0[None])
            best_x, best_f, best_sse = x0, float(f0[0]), sse0[0]
            best_frac = None if frac0 is None else float(frac0[0])
            e0 = best_f
            rec.record(model, objective=-best_f, mse=best_f, generation_mse=best_f, evaluations=1,
                       log_evidence=log_lik(best_sse, n))
            strat = self._strategy(x0, e0 if math.isfinite(e0) else 1.0)
            ref, last_gain, evaluations = best_f, 0, 1
            reason = "max_generations"
            bar = tqdm(range(1, self.max_generations + 1), disable=not self.progress, desc=self.name)
            g = 0
            for g in bar:
                X = strat.ask()
                f, sse, _, frac = score(X)
                strat.tell(X, f)
                evaluations += X.shape[0]
                k = int(torch.where(torch.isfinite(f), f, torch.full_like(f, math.inf)).argmin())
                if float(f[k]) < best_f:
                    best_x, best_f, best_sse = X[k].clone(), float(f[k]), sse[k]
                    best_frac = None if frac is None else float(frac[k])
                if best_f < ref * (1 - self.min_improvement):
                    ref, last_gain = best_f, g
                finite = f[torch.isfinite(f)]
                if g % self.record_every == 0 or g == self.max_generations:
                    model.set_weights(best_x)
                    rec.record(model, objective=-best_f, mse=best_f, evaluations=evaluations,
                               generation_mse=float(finite.median()) if finite.numel() else math.inf,
                               log_evidence=log_lik(best_sse, n))
                bar.set_postfix(mse=f"{best_f:.4g}")
                stop = None
                if self.target_mse is not None and best_f <= self.target_mse:
                    stop = "target_mse"
                elif self.target_fraction is not None and best_frac is not None and best_frac >= self.target_fraction:
                    stop = "target_fraction"
                elif g - last_gain >= self.patience:
                    stop = "stagnation"
                else:
                    stop = strat.stop()
                if stop is not None:
                    reason = stop
                    break
            bar.close()
        model.set_weights(best_x)
        info = deterministic_noise(model, flat, data, self.noise_floor)
        trace = rec.dataset(attrs={"method": self.name, "evidence_kind": "approximation",
                                   "objective": "minus the mean squared one-step error of the noise-free network "
                                                "(best so far)"})
        return FitResult(model=model, trace=trace, posterior=None, wall_time_s=time.perf_counter() - t0,
                         converged=reason != "max_generations", method=self.name, evidence_kind="approximation",
                         diagnostics={"stop_reason": reason, "initial_mse": e0, "best_mse": best_f,
                                      "generations": g, "evaluations": evaluations, "vectorised": vectorised,
                                      "log_likelihood": info["log_likelihood"], "noise_floor": self.noise_floor})


__all__ = ["GlobalSearch", "STRATEGIES"]
