"""The example notebooks: stored with the outputs of a full-settings run, executed here with small settings.

* The stored notebooks are exactly what notebooks/make_notebooks.py generates (cell sources), and each was
  executed with full settings by ``python notebooks/make_notebooks.py --execute`` (``make notebooks``): every
  code cell has run, none raised, the first code cell printed ``settings: full`` and the notebook's metadata
  records the run — so users browse tables and figures without running anything.
* Every notebook is executed again here with ``PPL_RNN_SMALL=1`` (tiny settings). The claims a notebook makes
  in words are asserted in its code cells (those that still hold at small settings also in this run), so a
  claim that stops holding fails here or in the full run.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def _errors(book):
    return [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def test_all_eight_notebooks_exist_and_match_the_generator():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    gen = _generator()
    assert sorted(gen.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for p in NOTEBOOKS:
        stored = nbformat.read(p, as_version=4)
        want = gen.NOTEBOOKS[p.name]
        assert [c.cell_type for c in stored.cells] == [c.cell_type for c in want.cells], p.name
        assert [c.source for c in stored.cells] == [c.source for c in want.cells], (
            f"{p.name} differs from notebooks/make_notebooks.py; rerun `make notebooks`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_holds_the_outputs_of_a_full_settings_run(path):
    book = nbformat.read(path, as_version=4)
    run = book.metadata.get("ppl_rnn", {})
    assert run.get("settings") == "full", (
        f"{path.name} was not executed with full settings; run `make notebooks` "
        f"(python notebooks/make_notebooks.py --execute {path.name[:2]})")
    code = [c for c in book.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: cells not executed: {counts}"
    assert counts == sorted(counts), f"{path.name}: cells executed out of order: {counts}"
    assert not _errors(book), f"{path.name}: " + json.dumps(_errors(book)[:1])[:2000]
    first = "".join(o.get("text", "") for o in code[0].get("outputs", []) if o.get("output_type") == "stream")
    assert "settings: full" in first, f"{path.name}: the first code cell did not print 'settings: full'"
    assert any(o.get("output_type") in ("execute_result", "display_data", "stream")
               for c in code[1:] for o in c.get("outputs", [])), f"{path.name}: no stored results"


# the fast suite runs the smallest notebook (02, about 9 s); the others (15-45 s each) run in `make test-slow`
@pytest.mark.parametrize("path", [p if p.name.startswith("02_") else pytest.param(p, marks=pytest.mark.slow)
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PPL_RNN_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    book = nbformat.read(path, as_version=4)
    for c in book.cells:  # run the cells as generated, not on top of the stored outputs
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    client = nbclient.NotebookClient(book, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    assert not _errors(book), json.dumps(_errors(book)[:1])[:2000]
    first = "".join(o.get("text", "") for o in book.cells[[c.cell_type for c in book.cells].index("code")].outputs
                    if o.get("output_type") == "stream")
    assert "settings: small" in first
