# Entry points (see README): `make demo`, `make dashboard`, `make test`, `make docs`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo reproduce dashboard test test-slow install install-demo lint docs docs-build \
	wheel-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is installed first and pinned: an unpinned torch from the index pulls CUDA wheels.
# Everything: the library, the demo's needs and the test tools (`make test`).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $@

# What the demo and the dashboard need, and nothing of the test tools (pyproject's [demo]).
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[demo]"
	touch $@

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

# A short real run of the paper's experiment (FT/LoRA/DoRA on MiniLM, one seed, ~2-3 minutes).
demo: install-demo
	$(BIN)/python examples/reproduce_figure2.py --quick --out demo-output

# The full experiment of docs/reproduction.md (5 seeds, ~35 minutes on 2 cores) and its figures,
# then the update-sparsity (fp32 vs bf16) and cross-run study of the same runs.
reproduce: install
	$(BIN)/pip install -e ".[test,figures]"
	$(BIN)/python examples/reproduce_figure2.py --out reproduction --docs docs/reproduction
	$(BIN)/python examples/update_study.py --out reproduction --docs docs/reproduction

# The dashboard (dora-dashboard), on the demo's results by default (or TABLE=path/to/table.csv).
# It listens on 127.0.0.1 only; DATA_ROOT=/data confines what it reads.
TABLE ?= demo-output/table.csv
DATA_ROOT ?=
dashboard: install-demo
	$(BIN)/dora-dashboard $(if $(wildcard $(TABLE)),--table $(TABLE),) \
		$(if $(DATA_ROOT),--root $(DATA_ROOT),)

test: install
	$(BIN)/python -m pytest -q

# The slow end-to-end tests (real model, demo); CI runs them after `make test`.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/python -m ruff check dora_analysis tests examples benchmarks

# The documentation site (mkdocs.yml, docs/), served on 127.0.0.1:8000; docs-build is CI's check.
$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[docs]"
	touch $@

docs: install $(VENV)/.installed-docs
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: install $(VENV)/.installed-docs
	$(BIN)/mkdocs build --strict --site-dir site

# The wheel and sdist, installed in a fresh venv outside the repository and run there (CI).
wheel-check: install
	PYTHON=$(BIN)/python TORCH="$(TORCH)" bash .ci/wheel_check.sh

# Scale/speed benchmark on a generated ~1B LLaMA-shaped pair (4 GiB of disk); see docs/performance.md.
bench: install
	$(BIN)/python benchmarks/make_llama_pair.py --size 1b --out bench-output/pair-1b
	$(BIN)/python benchmarks/bench_analyze.py bench-output/pair-1b/base bench-output/pair-1b/tuned \
		--adapter bench-output/pair-1b/adapter --workers 1,2

clean:
	rm -rf $(VENV) demo-output reproduction bench-output .pytest_cache build dist site *.egg-info
