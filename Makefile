# `make demo`: install into .venv and run the whole DAG on the embedded demo config.
# `make test`: install into .venv and run the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install demo test lint clean-demo bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	snakemake --profile profiles/local --configfile=config/demo.yaml all

test: $(VENV)/.installed
	python -m pytest

lint: $(VENV)/.installed
	ruff check scprint tests
	snakefmt --check workflow
	snakemake --lint --configfile=config/demo.yaml

clean-demo:
	rm -rf results data logs checkpoints resources lamin wandb .snakemake

# `make bench`: every benchmark section, each figure next to its baselines (bench/README.md)
bench: $(VENV)/.installed
	python -m bench
