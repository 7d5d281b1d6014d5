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

.PHONY: setup test lint pytest nbval book student experiments data clean

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

nbval: setup data
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbval $(NOTEBOOKS) --nbval-sanitize-with book/sanitize.cfg

test: lint pytest nbval

book: setup data
	$(BIN)/jupyter-book build . -W -n --keep-going

student: setup
	$(BIN)/python -m robustdl.student book student

experiments: setup data
	@shopt -s nullglob; for f in experiments/*.yaml; do $(BIN)/python -m robustdl.experiments $$f || exit 1; done

clean:
	rm -rf _build student .ci-data
