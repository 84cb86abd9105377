# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create (once) and reuse a local virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# The one place the torch version is pinned; override with `make TORCH_SPEC="torch==2.5.1" ...`.
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[workflow,test]"
	touch $@

demo: $(STAMP)
	PATH="$(BIN):$$PATH" snakemake --cores $(CORES)

test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest -q

clean-results:
	rm -rf results logs benchmarks .snakemake
