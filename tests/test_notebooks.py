"""Execute every example notebook with small settings (PPL_RNN_SMALL=1), and check that the notebooks are
exactly what notebooks/make_notebooks.py generates (no stored outputs, reproducible)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_all_six_notebooks_exist_and_match_the_generator():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert sorted(gen.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for p in NOTEBOOKS:
        stored = nbformat.read(p, as_version=4)
        assert all(c.get("outputs", []) == [] for c in stored.cells if c.cell_type == "code"), p.name
        want = gen.NOTEBOOKS[p.name]
        assert [c.source for c in stored.cells] == [c.source for c in want.cells], (
            f"{p.name} differs from notebooks/make_notebooks.py; rerun it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PPL_RNN_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, json.dumps(errors[:1])[:2000]
