# make demo / make test: each sets up .venv (idempotently) and runs.
# make test runs the fast suite (tests not marked `slow`); make test-slow the long statistical and learning
# tests, notebooks included; CI (.ci/run) runs both.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned here (a CPU wheel); pyproject keeps a normal range.
TORCH := torch==2.13.0
# test workers (pytest-xdist): each test runs torch on one thread (tests/conftest.py), so one worker per core.
TEST_WORKERS ?= 2

.PHONY: demo test test-slow test-all lint install clean notebooks

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev,data,dask]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ppl-rnn demo

# pytest exits with 5 when a selection collects no test: that is not a failure here
PYTEST := $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --durations=20

test: $(STAMP)
	$(PYTEST) -m "not slow" || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(PYTEST) -m slow || [ $$? -eq 5 ]

test-all: test test-slow

# execute the example notebooks with full settings and store their outputs (tests/test_notebooks.py checks)
notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python notebooks/make_notebooks.py --execute

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
