# make demo: set up .venv and train the built-in demo; make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: demo demo-dpr demo-rounds test test-slow eval-scifact scifact check-colbert-libs venv clean

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
	$(PY) -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=$(WORKDIR)/colbert --mode=export
	$(PY) -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=$(WORKDIR)/colbert --mode=evaluate

demo-dpr: $(STAMP)
	$(PY) -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=$(WORKDIR)/dpr
	$(PY) -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=$(WORKDIR)/dpr --mode=export
	$(PY) -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=$(WORKDIR)/dpr --mode=evaluate

# Two PairDistill rounds on the demo: round 1 trains; round 2 mines with it, scores the run (the round-1 student
# is the pointwise teacher there: the demo has no cross-encoder) and trains from its checkpoint.
demo-rounds: $(STAMP)
	$(PY) -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=$(WORKDIR)/rounds --mode=rounds

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# all-MiniLM-L6-v2 zero-shot on SciFact test (nDCG@10 about 0.648); prints the time taken.
eval-scifact: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow -s tests/test_evaluate.py -k scifact

# The real-text experiment: teacher all-MiniLM-L6-v2, DPR and ColBERT students cut to 3 of its layers, trained on
# SciFact's train queries as PairDistill and two controls, evaluated on its test queries (README: Real text).
SCIFACT_WORKDIR ?= workdir/scifact
scifact: $(STAMP)
	$(PY) experiments/scifact.py --workdir=$(SCIFACT_WORKDIR)

# Loads the ColBERT export with PyLate and stanford colbert-ai, each in its own environment (they pin other
# transformers versions); torch and the rest come from .venv through a .pth file.
EXT := .venv-ext
check-colbert-libs: $(STAMP)
	for v in pylate colbert-ai; do $(PY) -m venv $(EXT)/$$v && \
	  $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  $$($(EXT)/$$v/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_main_venv.pth; done
	$(EXT)/pylate/bin/pip install -q --no-deps pylate==1.6.0 sentence-transformers==5.3.0 transformers==5.3.0 \
	  tokenizers==0.22.2 "huggingface-hub>=1.3,<2" ujson
	$(EXT)/pylate/bin/pip install -q httpx datasets
	$(EXT)/colbert-ai/bin/pip install -q --no-deps colbert-ai==0.2.22 transformers==4.57.1 tokenizers==0.22.2 \
	  huggingface-hub==0.36.0 ujson bitarray ninja
	$(EXT)/colbert-ai/bin/pip install -q gitpython python-dotenv requests
	PYLATE_PYTHON=$(EXT)/pylate/bin/python COLBERT_AI_PYTHON=$(EXT)/colbert-ai/bin/python \
	  $(PY) -m pytest -q -p no:cacheprovider -m slow tests/test_export.py

clean:
	rm -rf $(VENV) $(EXT) workdir
