# `make demo`: install into .venv, run the whole DAG on the embedded demo config, write report.html.
# `make test`: install into .venv and run the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SEED_VENV ?= .bench-venv-seed
export PATH := $(BIN):$(PATH)

.PHONY: install demo test lint clean-demo bench bench-annbatch-venv bench-seed-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	snakemake --profile profiles/local --configfile=config/demo.yaml all
	snakemake --profile profiles/local --configfile=config/demo.yaml --report report.html

# the seed venv (below) holds upstream scPRINT for tests/test_upstream_*.py; the system
# packages (Slurm, munge, Chromium) are installed as root with apt-get, else named and the
# tests that need them skip (tests/system-packages.sh)
# two pytest-xdist workers, each test module whole on one (its module-scoped fixtures
# built once; the Slurm modules take turns on the cluster's lock); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: $(VENV)/.installed $(SEED_VENV)/.installed
	tests/system-packages.sh
	python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed
	ruff check scprint tests bench
	ruff format --check scprint tests bench
	snakefmt --check workflow
	snakemake --lint --configfile=config/demo.yaml

clean-demo:
	rm -rf results data logs checkpoints resources lamin wandb .snakemake report.html

# `make bench`: every benchmark section, each figure next to its baselines (bench/README.md)
bench: $(VENV)/.installed
	-$(MAKE) bench-annbatch-venv
	-$(MAKE) bench-seed-venv
	python -m bench

# annbatch (a loader baseline of bench/loader.py) needs Python >= 3.12, anndata >= 0.12 and
# zarr 3: its own venv, called as a subprocess. Without Python 3.12 the bench says so.
# Set up as its docs say: the zarrs extra (zarr's Rust codec pipeline, selected in
# bench/loader_annbatch.py), and numba for the same gene-selection kernel as ours.
# (the first that runs: a pyenv shim for a version that is not selected exists but fails)
PYTHON312 ?= $(firstword $(foreach p,$(shell command -v python3.12) \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
.bench-venv-annbatch/.installed:
	@test -n "$(PYTHON312)" || (echo "annbatch needs python3.12 (set PYTHON312=...)"; exit 1)
	$(PYTHON312) -m venv .bench-venv-annbatch
	.bench-venv-annbatch/bin/pip install -q 'annbatch[zarrs]==0.3.1' numba==0.68.1
	touch $@

bench-annbatch-venv: .bench-venv-annbatch/.installed

# `make bench-seed-venv`: the seed's model (PyPI scprint 2.3.8) in a venv of its own, which
# `python -m bench --only model` calls as a subprocess (its package name clashes with ours).
# Its own requirements pin torch 2.2 etc., so the stack is ours and the seed comes --no-deps.
bench-seed-venv: $(SEED_VENV)/.installed

$(SEED_VENV)/.installed: bench/seed-requirements.txt constraints.txt
	$(PYTHON) -m venv $(SEED_VENV)
	$(SEED_VENV)/bin/pip install -q -c constraints.txt torch==2.13.0 scdataloader==2.1.3 \
		lightning==2.6.6 lamindb==2.1.1 bionty==2.1.0 anndata==0.11.4 scanpy \
		'numpy<2' 'pyarrow<21' 'zarr<3' 'numcodecs<0.16'
	$(SEED_VENV)/bin/pip install -q --no-deps -c constraints.txt -r bench/seed-requirements.txt
	touch $@
