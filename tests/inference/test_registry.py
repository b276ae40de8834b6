"""The one registry of method names (ppl_rnn.inference.registry): one spelling per method, easy to extend."""

import pytest
from ppl_rnn.inference import registry
from ppl_rnn.inference.registry import METHODS, make_method, method_names, register_method

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError


def test_every_name_builds_its_method_and_is_its_name():
    for name, entry in METHODS.items():
        m = make_method(name)
        assert isinstance(m, pr.InferenceMethod), name
        if name.startswith("svi_"):  # SVI presets: svi_<guide>
            assert m.name == "svi" and name == f"svi_{entry.fixed['guide']}"
        else:
            assert m.name == name, f"{name!r} builds a method named {m.name!r}: two spellings"


def test_names_are_unique_and_self_describing():
    names = list(METHODS)
    assert len(names) == len(set(names))
    assert "ekf" not in names and "eks" not in names  # each EKF use has its own name
    assert {"ekf_em", "svi_ekf", "extended_kalman_filter", "extended_kalman_smoother"} <= set(names)
    assert set(method_names("reference")) == {"linear_ar", "persistence"}
    assert "particle_filter" in method_names("infer") and "particle_filter" not in method_names("train")


def test_options_progress_and_errors():
    m = make_method("mcem", num_particles=40, num_paths=5, backward="mcmc", num_iterations=2, progress=True)
    assert m.num_iterations == 2 and m.progress and m.smoother.num_particles == 40
    assert make_method("svi_mean_field", num_steps=3).guide == "mean_field"
    assert not hasattr(make_method("linear_ar", progress=True), "progress")  # not passed where not taken
    with pytest.raises(ConfigurationError, match="Did you mean 'ekf_em'"):
        make_method("ekf-em")
    with pytest.raises(ConfigurationError, match="fixes guide"):
        make_method("svi_mean_field", guide="ekf")
    with pytest.raises(ConfigurationError, match=r"bad options for method 'bptt'.*help\(ppl_rnn.inference.bptt.BPTT\)"):
        make_method("bptt", bogus=1)


def test_registering_a_method_is_one_line_and_the_cli_accepts_it(tmp_path):
    from ppl_rnn.workbench.cli import main

    try:
        register_method("persistence_copy", "ppl_rnn.inference.reference:Persistence", "a test entry",
                        kind="reference", progress=False)
        assert "persistence_copy" in method_names("reference")
        with pytest.raises(ConfigurationError, match="already registered"):
            register_method("persistence_copy", "ppl_rnn.inference.reference:Persistence", "again")
        with pytest.raises(ConfigurationError, match="snake_case"):
            register_method("Bad-Name", "ppl_rnn.inference.reference:Persistence", "x")
        assert main(["fit", "--data", "unkelbach-synthetic", "--max-steps", "120", "--train-steps", "100",
                     "--method", "persistence_copy", "--horizons", "1", "--out", str(tmp_path / "f")]) == 0
    finally:
        registry.METHODS.pop("persistence_copy", None)
