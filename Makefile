# make demo: set up .venv and train the built-in demo; make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: demo demo-dpr test test-slow venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in requirements-test.txt and installed in the same command (a CPU build).
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=$(WORKDIR)/colbert

demo-dpr: $(STAMP)
	$(PY) -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=$(WORKDIR)/dpr

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) workdir
