"""The capability protocol (ppl_rnn.capabilities): one lookup, the defining-class rule for every capability,
and the silent-wrong-result cases it exists to prevent."""

from __future__ import annotations

import subprocess
import sys

import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference import (
    AutoMStep,
    ClosedFormMStep,
    GradientMStep,
    MonteCarloEM,
    MultiStart,
    ParticleFilter,
    ParticleSmoother,
)
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM
from pyro.nn import PyroParam
from torch.distributions import constraints

import ppl_rnn as pr
from ppl_rnn.capabilities import CAPABILITIES, capability, declare, declared_capabilities, require
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError


def _override(base: type, member: str) -> type:
    """A subclass of ``base`` that overrides ``member`` (same behaviour, new definition)."""

    def passthrough(self, *args, **kwargs):
        return getattr(super(sub, self), member)(*args, **kwargs)

    sub = type(f"{base.__name__}Overriding_{member}", (base,), {member: passthrough})
    return sub


def _instances():
    return [ElmanSSM(2, 1, activation="identity", seed=0), ElmanSSM(2, 1, seed=0), LinearGaussianSSM(2, 1)]


@pytest.mark.parametrize("model", _instances(), ids=["elman-identity", "elman-tanh", "linear-gaussian"])
def test_subclass_overriding_a_conditional_loses_every_capability_that_speaks_for_it(model):
    have = declared_capabilities(model)
    assert have, "the suite's models declare capabilities"
    checked = 0
    for name in have:
        for cond in CAPABILITIES[name].speaks_for:
            sub = _override(type(model), cond)
            m = model.copy()
            m.__class__ = sub
            assert capability(m, name) is None, (name, cond)
            with pytest.raises(ModelCapabilityError, match=f"overrides {cond}"):
                require(m, name, needed_by="the test")
            checked += 1
        # conditionals it does not speak for leave it in place
        for cond in set(("initial", "transition", "emission")) - set(CAPABILITIES[name].speaks_for):
            m = model.copy()
            m.__class__ = _override(type(model), cond)
            assert capability(m, name) is not None, (name, cond)
    assert checked >= len(have)


def test_conditional_parts_and_instance_patches():
    m = ElmanSSM(2, 1, seed=0)
    sub = _override(ElmanSSM, "transition_mean")
    s = m.copy()
    s.__class__ = sub
    # the Jacobian and the shortcut read the mean function; the noise scales do not
    assert capability(s, "transition_jacobian") is None and capability(s, "transition_loc_scale") is None
    assert capability(s, "closed_form_mstep") is None and capability(s, "elman_form") is None
    assert capability(s, "noise_scales") is not None and capability(s, "emission_jacobian") is not None
    p = m.copy()
    p.transition = lambda t, h, u: dist.Normal(h, 1.0).to_event(1)  # patched on the instance
    assert capability(p, "transition_loc_scale") is None and capability(p, "closed_form_mstep") is None
    q = m.copy()
    q.emission_loc_scale = None
    assert capability(q, "emission_loc_scale") is None


def test_instance_level_applicability_and_errors():
    tanh, lin = ElmanSSM(2, 1, seed=0), ElmanSSM(2, 1, activation="identity", seed=0)
    assert capability(lin, "linear_gaussian") is not None and capability(tanh, "linear_gaussian") is None
    with pytest.raises(ModelCapabilityError) as e:
        require(tanh, "linear_gaussian", needed_by="KalmanEM", alternative="use MonteCarloEM")
    msg = str(e.value)
    assert "KalmanEM" in msg and "linear_gaussian" in msg and "does not apply" in msg and "MonteCarloEM" in msg
    with pytest.raises(ConfigurationError, match="not a declared capability"):
        capability(tanh, "no_such_thing")
    with pytest.raises(ConfigurationError, match="already declared"):
        declare("linear_gaussian", "()", "x", ("transition",))
    with pytest.raises(ConfigurationError, match="speaks_for"):
        declare("something_new", "()", "x", ("transitions",))


# ---- the silent-wrong-result cases of the house issue --------------------------------------------------
class _SinElman(ElmanSSM):
    """A different transition (sin instead of the Elman mean) on ElmanSSM's parameters."""

    def transition(self, t, h_prev, u_t):
        return dist.Normal(torch.sin(h_prev @ self.W.T + self.b), self.q).to_event(1)


def test_mcem_does_not_apply_elmans_mstep_to_a_subclass_with_another_transition(float64):
    model = _SinElman(2, 1, seed=0, activation="identity")
    y = ElmanSSM(2, 1, seed=3).simulate(40, seed=1).observations
    fit = pr.fit(model, y, method=MonteCarloEM(num_iterations=1, smoother=ParticleSmoother(64, num_paths=8),
                                               mstep=AutoMStep(gradient=GradientMStep(steps=2))), seed=0)
    assert fit.trace.attrs["mstep"] == "gradient"
    with pytest.raises(ModelCapabilityError, match="closed_form_mstep"):
        pr.fit(model, y, method=MonteCarloEM(num_iterations=1, mstep=ClosedFormMStep()), seed=0)
    base = pr.fit(ElmanSSM(2, 1, seed=0), y, method=MonteCarloEM(num_iterations=1, smoother=ParticleSmoother(
        64, num_paths=8)), seed=0)
    assert base.trace.attrs["mstep"] == "closed_form"


def test_identity_subclass_with_another_transition_is_not_scored_by_kalman(float64):
    from ppl_rnn.workbench.forecasting import default_filter

    model = _SinElman(2, 1, seed=0, activation="identity")
    assert capability(model, "linear_gaussian") is None
    assert isinstance(default_filter(model), ParticleFilter)
    y = ElmanSSM(2, 1, seed=3).simulate(60, seed=1).observations
    ev = pr.evaluate(model, y[:, :40], y[:, 40:], horizons=(1,), num_particles=200, num_samples=20, seed=0)
    assert ev.attrs["evidence_method"] == "particle_filter"
    ev_lin = pr.evaluate(ElmanSSM(2, 1, seed=0, activation="identity"), y[:, :40], y[:, 40:], horizons=(1,),
                         num_particles=200, num_samples=20, seed=0)
    assert ev_lin.attrs["evidence_method"] == "kalman"
    with pytest.raises(ModelCapabilityError, match="linear_gaussian"):
        pr.infer(model, y, method=pr.inference.KalmanFilter())


class _UserGRU(pr.StateSpaceModel):
    """A user's model whose parameters happen to be called q, W and s0; it declares no capability."""

    def __init__(self):
        super().__init__(hidden_dim=2, obs_dim=1)
        self.W = PyroParam(0.5 * torch.eye(2))
        self.q = PyroParam(torch.tensor([0.3, 0.3]), constraint=constraints.positive)
        self.s0 = PyroParam(torch.tensor([1.0, 1.0]), constraint=constraints.positive)
        self.r = PyroParam(torch.tensor([0.2]), constraint=constraints.positive)

    def initial(self, u0):
        return dist.Normal(torch.zeros(2, dtype=self.W.dtype), self.s0).to_event(1)

    def transition(self, t, h_prev, u_t):
        z = torch.sigmoid(h_prev @ self.W.T)
        return dist.Normal(z * h_prev + (1 - z) * torch.tanh(h_prev @ self.W.T), self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h[..., :1], self.r).to_event(1)


def test_parameters_named_like_elmans_are_never_touched_by_name(float64):
    model = _UserGRU()
    assert declared_capabilities(model) == []
    y = model.simulate(30, seed=0).observations
    # noise annealing and restarts need declared capabilities: a clear error, not a silent edit of q / W
    with pytest.raises(ModelCapabilityError, match="noise_scales"):
        pr.fit(model, y, method=MonteCarloEM(num_iterations=2, mstep=AutoMStep(anneal_noise=(2.0, 1))), seed=0)
    with pytest.raises(ModelCapabilityError, match="perturb"):
        pr.fit(model, y, method=MonteCarloEM(num_iterations=2, start=MultiStart(num_starts=2, iterations=1)), seed=0)
    with pytest.raises(ModelCapabilityError, match="noise_scales"):
        pr.fit(model, y, method=pr.inference.BPTT(num_steps=2), seed=0)
    with pytest.raises(ModelCapabilityError, match="linear_gaussian"):
        pr.fit(model, y, method=pr.inference.KalmanEM(num_iterations=2), seed=0)
    with pytest.raises(ModelCapabilityError, match="elman_form"):
        pr.fit(model, y, method=pr.inference.MeanFieldEM(num_iterations=2), seed=0)
    # the generic methods train it (gradient M-step): every parameter moves by gradient only
    fit = pr.fit(model, y, method=MonteCarloEM(num_iterations=2, smoother=ParticleSmoother(64, num_paths=8),
                                               mstep=AutoMStep(gradient=GradientMStep(steps=3))), seed=0)
    assert fit.trace.attrs["mstep"] == "gradient"
    assert torch.isfinite(fit.model.q).all() and not torch.equal(fit.model.q, model.q)


def test_import_is_light_and_changes_no_global_setting():
    code = (
        "import sys, pyro\n"
        "before = pyro.settings.get('module_local_params')\n"
        "import ppl_rnn\n"
        "assert pyro.settings.get('module_local_params') == before, 'import changed a Pyro setting'\n"
        "assert 'matplotlib' not in sys.modules, 'import ppl_rnn loaded matplotlib'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.parametrize("local", [False, True], ids=["global-store", "module-local"])
def test_users_own_pyro_svi_works_under_either_setting_and_library_calls_stay_local(float64, local):
    """A user's ``pyro.infer.SVI`` with ``AutoNormal`` on a suite model runs under the user's own Pyro setting;
    the library's calls (here ``pr.fit`` with SVI) put nothing in the global param store either way."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.optim import Adam

    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=local):
        a, b = ElmanSSM(2, 1, seed=0), ElmanSSM(2, 1, seed=1)
        y = a.simulate(20, seed=0).observations
        svi = SVI(a, AutoNormal(a), Adam({"lr": 0.02}), Trace_ELBO())
        losses = [svi.step(y) for _ in range(30)]
        assert losses[-1] < losses[0]
        n_store = len(pyro.get_param_store())
        assert (n_store == 0) == local
        pr.fit(b, y, method=pr.inference.SVI(guide="mean_field", num_steps=3), seed=0)
        assert len(pyro.get_param_store()) == n_store
        assert pyro.settings.get("module_local_params") == local
    pyro.clear_param_store()
