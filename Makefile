# robustdl: `make test` and `make book` set up .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROBUSTDL_DATA ?= $(CURDIR)/data
DATA_SOURCE ?= ../shared/data
export ROBUSTDL_DATA
# Executions in the book and nbval show no progress bars, and static figures in place of
# ipywidgets (whose state a built page cannot run).
export ROBUSTDL_PROGRESS ?= 0
export ROBUSTDL_WIDGETS ?= 0
NOTEBOOKS := $(shell find book -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -not -path '*/_build/*' 2>/dev/null | sort)

# The chapter runner's options: ONLY="introduction white-box" restricts it to those chapters.
ONLY ?=
ONLY_ARGS := $(if $(strip $(ONLY)),--only $(ONLY))

.PHONY: setup test lint pytest nbval book student autograde experiments chapters cifar10-grid gpu-check data clean

setup: $(STAMP)

# Exact versions that produced the committed notebook outputs live in constraints.txt;
# pyproject.toml keeps wide ranges for users (Colab's torch). torchattacks is a test-only
# peer library installed without its dependencies (its pinned `requests` breaks Sphinx).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,book]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt torchattacks
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

# A writable mirror (symbolic links) of the offline datasets, when they are beside the repo.
data:
	@if [ -d "$(DATA_SOURCE)" ]; then \
	  for d in MNIST/raw FashionMNIST/raw cifar-10-batches-py; do \
	    [ -d "$(DATA_SOURCE)/$$d" ] || continue; mkdir -p "$(ROBUSTDL_DATA)/$$d"; \
	    for f in "$(DATA_SOURCE)/$$d"/*; do ln -sf "$$(realpath $$f)" "$(ROBUSTDL_DATA)/$$d/"; done; \
	  done; echo "offline data mirrored into $(ROBUSTDL_DATA)"; \
	fi

lint: setup
	$(BIN)/ruff check $(wildcard lib tests book benchmarks)

pytest: setup data
	$(BIN)/python -m pytest -q

# One pytest --nbval per chapter, then a table of each chapter's seconds and result and one summary line.
nbval: setup data
	$(BIN)/python .ci/nbval_times.py $(NOTEBOOKS)

test: lint pytest nbval

book: setup data
	$(BIN)/jupyter-book build . -W -n --keep-going

# The students' version of every chapter, by nbgrader's generate_assignment: student/<part>/<chapter>.ipynb.
student: setup
	$(BIN)/python -m robustdl.student release book student

# nbgrader's autograde of every chapter (or ONLY="testing reliability"): the chapter itself must score
# full marks, its untouched student version zero on every check; prints a table of points per chapter.
autograde: setup data
	$(BIN)/python -m robustdl.student autograde book $(ONLY_ARGS)

experiments: setup data
	@shopt -s nullglob; for f in experiments/*.yaml; do $(BIN)/python -m robustdl.experiments $$f || exit 1; done

# Chapters by named parameter sets (experiments/chapters/*.yaml; robustdl.runner), e.g.
# `make chapters SET=smoke ONLY=introduction`; tables in experiments/runs/SET-chapters/.
SET ?= smoke
chapters: setup data
	$(BIN)/python -m robustdl.experiments chapters --set $(SET) --output experiments/runs/$(SET)-chapters $(ONLY_ARGS)

# Every chapter on CIFAR-10 with the bundled CIFAR-10 models, on the CPU (small subsets); its table,
# experiments/runs/cifar10-chapters/results.md, is committed.
cifar10-grid: setup data
	$(BIN)/python -m robustdl.experiments chapters --set cifar10 --device cpu --output experiments/runs/cifar10-chapters $(ONLY_ARGS)

# On a CUDA machine (about 10 minutes on one GPU): pytest -m gpu, then every chapter with its defaults
# and its cifar10 set, four at a time, on the GPU; writes experiments/runs/gpu-check/report.md.
# Without CUDA it stops at once with a message.
gpu-check: setup data
	$(BIN)/python -m robustdl.experiments gpu-check --output experiments/runs/gpu-check $(ONLY_ARGS)

clean:
	rm -rf _build student .ci-data
