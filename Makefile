# cellpert: `make demo` runs the main job on a simulated screen, `make test` runs the tests.
# Both install into .venv first (idempotent: reinstalls only when pyproject.toml or
# constraints.txt change).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellpert-installed
DEMO_DIR ?= demo_out
SHARED_DATA ?= ../shared/data

.PHONY: help install test test-slow lint demo clean bench-ate bench-combination-rules bench-norman bench-sparse-shift bench-comparative bench-kang data-norman data-replogle data-replogle-gwps data-kang \
	reproduce-norman-ood reproduce-replogle reproduce-sparse-shift reproduce-comparative
RAW_DIR ?= data/raw

help:
	@echo "make demo       simulate a screen, train, evaluate, export (installs first)"
	@echo "make test       ruff + import layers + the default test suite (installs first)"
	@echo "make test-slow  the long tests (training to convergence, real-data checks)"
	@echo "make install    create .venv and install cellpert with the tested versions"
	@echo "make bench-ate  model ATEs vs the training-cell average on held-out cells (long)"
	@echo "make bench-combination-rules   other ways to combine the model ATE with the average (long)"
	@echo "make bench-norman / bench-sparse-shift / bench-comparative / bench-kang"
	@echo "                the papers' benchmarks (long; BENCH_ARGS=--quick for a smoke run)"
	@echo "make data-norman / data-replogle / data-kang   fetch a public screen (needs internet)"
	@echo "make reproduce-norman-ood     SAMS-VAE paper's Norman OOD table from experiments/ (FAST=1: minutes)"
	@echo "make reproduce-replogle       SAMS-VAE on Replogle (needs make data-replogle-gwps; FAST=1: shared subset)"
	@echo "make reproduce-sparse-shift   the sVAE paper's sparse-shift simulation (FAST=1: a small one)"
	@echo "make reproduce-comparative    comparative VAE: simulation and Kang 2018 (JOBS=N parallel jobs)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow --durations=15

demo: $(STAMP)
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/cellpert simulate sams -o $(DEMO_DIR)/screen.h5ad --seed 0 --n-perturbations 30 --n-latent 8 --n-combinations 6
	$(BIN)/cellpert inspect $(DEMO_DIR)/screen.h5ad
	$(BIN)/cellpert train $(DEMO_DIR)/screen.h5ad --model samsvae --out $(DEMO_DIR)/run --n-latent 8 --max-steps 4000 --batch-size 256 --lr 3e-3 --quiet
	$(BIN)/cellpert evaluate-ate $(DEMO_DIR)/screen.h5ad --model $(DEMO_DIR)/run --report $(DEMO_DIR)/ate_report.html --truth
	$(BIN)/cellpert export-latents $(DEMO_DIR)/screen.h5ad --model $(DEMO_DIR)/run
	@echo "demo done: results in $(DEMO_DIR)/screen.h5ad, report in $(DEMO_DIR)/ate_report.html"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache

# Benchmarks (print tables; see benchmarks/RESULTS_*.md). BENCH_ARGS=--quick for a smoke run.
bench-ate: $(STAMP)
	$(BIN)/python benchmarks/ate_benchmark.py $(BENCH_ARGS)
bench-combination-rules: $(STAMP)
	$(BIN)/python benchmarks/combination_rules.py $(BENCH_ARGS)
bench-norman: $(STAMP)
	$(BIN)/python benchmarks/norman_combinations.py --steps 2000 $(BENCH_ARGS)
bench-sparse-shift: $(STAMP)
	$(BIN)/python benchmarks/sparse_shift_benchmark.py $(BENCH_ARGS)
bench-comparative: $(STAMP)
	$(BIN)/python benchmarks/comparative_benchmark.py $(BENCH_ARGS)
bench-kang: $(STAMP)
	$(BIN)/python benchmarks/kang_comparative.py --data $(SHARED_DATA)/kang2018_pbmc_ifnb_subset.h5ad $(BENCH_ARGS)

# Public screens (need internet; see data_recipes/README.md)
data-norman: $(STAMP)
	$(BIN)/python -m data_recipes.norman2019 --out data/norman2019.h5ad --raw-dir $(RAW_DIR)/norman2019 $(DATA_ARGS)
data-replogle: $(STAMP)
	$(BIN)/python -m data_recipes.replogle2022 --dataset essential --out data/replogle2022_essential.h5ad --raw-dir $(RAW_DIR)/replogle2022 $(DATA_ARGS)
data-replogle-gwps: $(STAMP)
	$(BIN)/python -m data_recipes.replogle2022 --dataset gwps --preset filtered --out data/replogle2022_gwps_filtered.h5ad --raw-dir $(RAW_DIR)/replogle2022 $(DATA_ARGS)
data-kang: $(STAMP)
	$(BIN)/python -m data_recipes.kang2018 --out data/kang2018.h5ad --raw-dir $(RAW_DIR)/kang2018 $(DATA_ARGS)

# Reproductions (experiments/<experiment>/*.yaml; python -m experiments --help). FAST=1: the
# configs' fast: sections (minutes); JOBS=N jobs at once, 1 torch thread each; results are
# cached in benchmarks/runs/experiments/, reports go to benchmarks/runs/reports/.
JOBS ?= 2
REPRODUCE = $(BIN)/python -m experiments $(if $(filter-out 0,$(FAST)),--fast) -j $(JOBS) $(REPRODUCE_ARGS)
reproduce-norman-ood: $(STAMP)
	$(REPRODUCE) norman_ood
reproduce-replogle: $(STAMP)
	$(REPRODUCE) replogle
reproduce-sparse-shift: $(STAMP)
	$(REPRODUCE) sparse_shift
reproduce-comparative: $(STAMP)
	$(REPRODUCE) comparative_sim kang
