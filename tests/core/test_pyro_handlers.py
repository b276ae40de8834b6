"""Every model of the suite runs on its own parameters under plain Pyro handlers (``Predictive``,
``poutine.trace``, ``pyro.infer.SVI`` with ``AutoNormal``), whatever models were created and run before it,
under Pyro's default (global param store) setting.

The bug these tests pin down: a ``PyroModule``'s ``PyroParam``\\ s are synchronised with Pyro's global parameter
store under their bare names (``W``, ``r``, ...), so a second model run after a first one read the first one's
values (or failed on a shape error when the sizes differed), and SVI on the second model trained the first
one's parameters. ``tests/conftest.py`` clears the param store before every test, so each test here builds and
runs two models itself.

The reference for "its own parameters" is the same Pyro call on a pristine copy of the second model, made in an
empty param store before the first model ever ran: the second model must reproduce it exactly.
"""

from __future__ import annotations

import copy

import pyro
import pytest
import torch
from ppl_rnn.models import MODELS, ElmanSSM
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

T, B, I = 6, 2, 1


def build(name: str, size: int, seed: int):
    """Model ``name`` of the suite with one input, size ``size`` (in the class's own size convention)."""
    cls = MODELS[name]
    noise = {"obs_noise": 0.05 + 0.2 * seed}
    if name == "mtrnn":
        return cls(size - max(1, size // 3), max(1, size // 3), 1, I, seed=seed, **noise)
    if name == "stacked":
        return cls((size, max(1, size // 2)), 1, I, seed=seed, **noise)
    if name == "linear_gaussian":
        return cls(size, 1, I, seed=seed, R=torch.tensor([[noise["obs_noise"] ** 2]]))
    if name == "echo_state":
        size = 3 * size
    return cls(size, 1, I, seed=seed, **noise)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, I, generator=torch.Generator().manual_seed(seed))


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same(p: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


def run_predictive(model, u):
    pyro.set_rng_seed(3)
    out = Predictive(model, num_samples=2)(inputs=u, num_steps=T, num_sequences=B)
    return {k: v.detach() for k, v in out.items()}


def run_trace(model, y, u):
    pyro.set_rng_seed(5)  # the h sites are drawn from the prior
    tr = pyro.poutine.trace(model).get_trace(y, u)
    return {k: site["fn"].log_prob(site["value"]).detach() for k, site in tr.nodes.items()
            if site["type"] == "sample"}


def run_svi(model, y, u, steps: int = 3):
    pyro.set_rng_seed(4)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(y, u) for _ in range(steps)]
    return losses, params(model)


def first_model_runs(a, u):
    """The first model is used the usual ways (Predictive and a trace) before the second one."""
    Predictive(a, num_samples=2)(inputs=u, num_steps=3, num_sequences=B)
    pyro.poutine.trace(a).get_trace(inputs=u, num_steps=3, num_sequences=B)


@pytest.mark.parametrize("sizes", [(3, 2), (2, 2)], ids=["different-size", "same-size"])
@pytest.mark.parametrize("name", list(MODELS))
def test_second_model_runs_on_its_own_parameters(name, sizes):
    """``Predictive``, ``poutine.trace`` and ``AutoNormal`` SVI on a second model, after a first model of a
    different or the same size was run, give exactly what they give on that model alone; the first model's
    parameters are untouched by the second one's training."""
    u = inputs()
    b_proto = build(name, sizes[1], seed=1)
    y = b_proto.simulate(T, B, inputs=u, seed=0).observations
    assert len(pyro.get_param_store()) == 0
    # the reference: each call on its own pristine copy, in an empty param store
    ref_pred = run_predictive(copy.deepcopy(b_proto), u)
    pyro.clear_param_store()
    ref_trace = run_trace(copy.deepcopy(b_proto), y, u)
    pyro.clear_param_store()
    ref_losses, ref_params = run_svi(copy.deepcopy(b_proto), y, u)
    pyro.clear_param_store()

    a = build(name, sizes[0], seed=0)
    a_before = params(a)
    b = copy.deepcopy(b_proto)
    first_model_runs(a, u)
    pred = run_predictive(b, u)
    assert pred.keys() == ref_pred.keys()
    assert all(torch.equal(pred[k], ref_pred[k]) for k in pred), "Predictive did not run on b's own parameters"
    first_model_runs(a, u)
    tr = run_trace(b, y, u)
    assert tr.keys() == ref_trace.keys()
    assert all(torch.equal(tr[k], ref_trace[k]) for k in tr), "poutine.trace did not run on b's own parameters"
    assert same(params(b), params(b_proto)), "running b replaced its parameters"
    first_model_runs(a, u)
    losses, trained = run_svi(b, y, u)
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-10), "AutoNormal SVI did not run on b's own"
    assert same(trained, ref_params)
    assert not same(trained, params(b_proto))  # SVI did train b ...
    assert same(params(a), a_before)  # ... and nothing of a


def test_the_issue_example_emits_the_second_models_noise():
    """The report: after ``Predictive(a)``, tracing ``b`` emitted y_0 with a's scale 0.5 instead of b's 0.01."""
    a = ElmanSSM(4, 1, seed=0, obs_noise=0.5)
    b = ElmanSSM(4, 1, seed=1, obs_noise=0.01)
    Predictive(a, num_samples=2)(num_steps=3)
    fn = pyro.poutine.trace(b).get_trace(num_steps=1).nodes["y_0"]["fn"]
    assert torch.allclose(fn.stddev, torch.tensor(0.01, dtype=fn.stddev.dtype))
    assert torch.allclose(b.r, torch.tensor(0.01, dtype=b.r.dtype))
    assert torch.allclose(a.r, torch.tensor(0.5, dtype=a.r.dtype))
    # a smaller second model after a larger first one: no shape error
    c = ElmanSSM(2, 1, seed=2, obs_noise=0.2)
    pred = Predictive(c, num_samples=3)(num_steps=4)
    assert pred["h_3"].shape == (3, 1, 2)


def test_plain_pyro_leaves_the_model_parameters_out_of_the_global_store():
    """Under the default setting the model's parameters never enter Pyro's global param store; an AutoNormal
    guide's own parameters still go where the caller's setting puts them (the store), and the caller's setting
    is unchanged afterwards."""
    model = ElmanSSM(2, 1, seed=0)
    y = model.simulate(8, seed=0).observations
    assert pyro.settings.get("module_local_params") is False
    pyro.poutine.trace(model).get_trace(y)
    Predictive(model, num_samples=2)(num_steps=3)
    assert len(pyro.get_param_store()) == 0
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    svi.step(y)
    keys = set(pyro.get_param_store().keys())
    assert keys and all(k.startswith("AutoNormal.") for k in keys)
    assert pyro.settings.get("module_local_params") is False


def test_a_model_inside_a_users_pyro_module_keeps_its_parameters():
    """A suite model as a submodule of a user's ``PyroModule`` (sharing its Pyro context) still reads its own
    parameters, including a second, same-named model's instance run earlier."""
    from pyro.nn import PyroModule

    class Wrapper(PyroModule):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    a = Wrapper(ElmanSSM(3, 1, seed=0, obs_noise=0.5))
    b = Wrapper(ElmanSSM(2, 1, seed=1, obs_noise=0.01))
    Predictive(a, num_samples=2)(num_steps=3)
    fn = pyro.poutine.trace(b).get_trace(num_steps=1).nodes["y_0"]["fn"]
    assert torch.allclose(fn.stddev, torch.tensor(0.01, dtype=fn.stddev.dtype))
