"""The README's tour and the docs' "how to add" examples run and do what they say; the front page and the docs
point only inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ppl_rnn as pr
from ppl_rnn.capabilities import CAPABILITIES, capability

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    head = text[: text.index("\n## ")]
    assert "make demo" in head and "make test" in head  # the two commands come first


def test_tour_defines_a_model_and_infers():  # in the default dtype, as a user runs it
    blocks = _blocks(README)
    assert len(blocks) == 3
    ns: dict = {}
    exec(blocks[0], ns)  # a model from three conditionals
    mine = ns["MyRNN"](3)
    y = mine.simulate(30, seed=0).observations
    post = pr.infer(mine, y, method=pr.inference.ParticleFilter(200), seed=0)
    assert post.evidence_kind == "estimate" and torch.isfinite(post.log_evidence).all()
    exec(blocks[1], ns)  # simulate, exact Kalman, particle smoother
    exact, post = ns["exact"], ns["post"]
    assert exact.evidence_kind == "exact" and post.evidence_kind == "estimate"
    # "close to the exact value": the adapted filter's estimate of 200 steps, well inside 1 nat of Kalman
    assert (post.log_evidence - exact.log_evidence).abs().max() < 1.0
    assert ns["paths"].shape == (100, 2, 200, 4)


@pytest.mark.slow  # about 30-60 s: MCEM fits and a compare grid of two methods x two seeds
def test_tour_trains_forecasts_scores_and_compares():
    ns: dict = {}
    for block in _blocks(README):
        exec(block, ns)
    fit, fc, score, tab = ns["fit"], ns["fc"], ns["score"], ns["tab"]
    assert 1 <= fit.trace.sizes["iteration"] <= 21
    assert fc.samples.shape == (500, 2, 20, 1)
    start = pr.evaluate(ns["net"], ns["y_train"], ns["y_test"])
    # MCEM from a random start raises the held-out log-evidence (by several of its standard errors)
    gain = float(score["heldout_logev_per_step"] - start["heldout_logev_per_step"])
    se = float((score["heldout_logev_per_step_se"] ** 2 + start["heldout_logev_per_step_se"] ** 2) ** 0.5)
    assert gain > 6 * se + 0.01, (gain, se)
    assert tab.sizes["seed"] == 2


def test_adding_a_model_example_runs(float64):
    blocks = _blocks(DOCS / "adding-a-model.md")
    assert len(blocks) == 1
    ns: dict = {}
    exec(blocks[0], ns)
    model = ns["LeakySSM"](3)
    assert capability(model, "transition_loc_scale") is not None
    assert capability(model, "linear_gaussian_emission") is not None
    y = model.simulate(20, seed=0).observations
    post = pr.infer(model, y, method=pr.inference.ParticleFilter(100), seed=0)
    assert torch.isfinite(post.log_evidence).all()


def test_adding_a_method_example_runs(float64):
    blocks = _blocks(DOCS / "adding-a-method.md")
    assert len(blocks) == 1
    ns: dict = {}
    exec(blocks[0], ns)
    y = pr.models.ElmanSSM(2, 1).simulate(20, seed=0).observations
    fit = pr.fit(pr.models.ElmanSSM(2, 1), y, method=ns["ShrinkNoise"](factor=0.5))
    torch.testing.assert_close(fit.model.q, 0.5 * pr.models.ElmanSSM(2, 1).q)


def test_adding_a_capability_example_runs(float64):
    blocks = _blocks(DOCS / "capabilities.md")
    assert len(blocks) == 1
    ns: dict = {"torch": torch, "LinearGaussianSSM": pr.models.LinearGaussianSSM}
    try:
        ns["model"] = pr.models.LinearGaussianSSM(2, 1, A=0.5 * torch.eye(2), b=torch.ones(2))
        exec(blocks[0], ns)  # a new capability; a plain LinearGaussianSSM does not declare it
        assert "m" not in ns
        lin = ns["MyLinearModel"](2, 1, A=0.5 * torch.eye(2), b=torch.ones(2))
        m, P = capability(lin, "stationary_moments")()
        torch.testing.assert_close(m, torch.full((2,), 2.0))
        Q = 0.1 * torch.eye(2)
        torch.testing.assert_close(P, Q / 0.75)  # P = 0.25 P + Q
        assert capability(ns["model"], "stationary_moments") is None
    finally:
        CAPABILITIES.pop("stationary_moments", None)


# what a clone of the repository must not point to: files that live outside it
OUTSIDE = re.compile(r"/work/|\.\./shared|shared folder|DESIGN\.md|/tmp/brief")


def _text_files() -> list[Path]:
    files = [README, ROOT / "benchmarks" / "README.md", ROOT / "notebooks" / "make_notebooks.py"]
    files += sorted(DOCS.glob("*.md"))
    for folder in ("ppl_rnn", "models", "inference", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_nothing_points_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}" for p in _text_files()
           for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "\n".join(bad)


def test_relative_links_of_the_readme_and_docs_resolve():
    bad = []
    for p in [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", p.read_text()):
            if "://" not in target and not (p.parent / target).exists():
                bad.append(f"{p.relative_to(ROOT)} -> {target}")
    assert not bad, "\n".join(bad)
