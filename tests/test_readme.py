"""The README's "Where things go" examples run and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import ppl_rnn as pr
from ppl_rnn.capabilities import CAPABILITIES, capability

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Where things go"):]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_where_things_go_examples_run(float64):
    blocks = _blocks()
    assert len(blocks) == 3
    ns: dict = {"torch": torch, "LinearGaussianSSM": pr.models.LinearGaussianSSM}
    exec(blocks[0], ns)  # a new model
    model = ns["LeakySSM"](3)
    assert capability(model, "transition_loc_scale") is not None
    assert capability(model, "linear_gaussian_emission") is not None
    y = model.simulate(20, seed=0).observations
    post = pr.infer(model, y, method=pr.inference.ParticleFilter(100), seed=0)
    assert torch.isfinite(post.log_evidence).all()
    exec(blocks[1], ns)  # a new method
    fit = pr.fit(pr.models.ElmanSSM(2, 1), y, method=ns["ShrinkNoise"](factor=0.5))
    torch.testing.assert_close(fit.model.q, 0.5 * pr.models.ElmanSSM(2, 1).q)
    try:
        ns["model"] = pr.models.LinearGaussianSSM(2, 1, A=0.5 * torch.eye(2), b=torch.ones(2))
        exec(blocks[2], ns)  # a new capability; a plain LinearGaussianSSM does not declare it
        assert "m" not in ns
        lin = ns["MyLinearModel"](2, 1, A=0.5 * torch.eye(2), b=torch.ones(2))
        m, P = capability(lin, "stationary_moments")()
        torch.testing.assert_close(m, torch.full((2,), 2.0))
        Q = 0.1 * torch.eye(2)
        torch.testing.assert_close(P, Q / 0.75)  # P = 0.25 P + Q
        assert capability(ns["model"], "stationary_moments") is None
    finally:
        CAPABILITIES.pop("stationary_moments", None)
