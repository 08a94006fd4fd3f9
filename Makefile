# cbd-cache. On a fresh machine: `make demo` (whole pipeline on Fashion-MNIST-LT) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIPELINE ?= pipelines/fashion_mnist_lt.toml
WORKDIR ?=
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# teachers trained at once, one process each (on GPU machines one GPU each); 1 = one after another
TEACHER_JOBS ?= 1
# Exact pins for CPU machines (these install from local disk here); pyproject.toml only states ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
CBD := $(BIN)/cbd-cache
DEFAULT_FMNIST_DIR := /usr/share/datasets/fashion-mnist
# FMNIST_DIR=DIR (the IDX files elsewhere) reaches the pipeline as --set data.root=DIR
ARGS = --pipeline $(PIPELINE) $(if $(WORKDIR),--workdir $(WORKDIR)) \
       $(if $(filter-out $(DEFAULT_FMNIST_DIR),$(FMNIST_DIR)),--set data.root=$(FMNIST_DIR))

PAPER_LIMIT_MIN ?= 0
# runs trained at once by paper-table, one process each (2 on a 2-core CPU about halves the wall time)
PAPER_JOBS ?= 1
# e.g. PAPER_SECTIONS=views: only the view-budget study (empty: every section)
PAPER_SECTIONS ?=
.PHONY: install data demo test test-fast teachers paper-table clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test,timm,tensorboard]'   # the optional extras too, so CI runs their tests
	touch $@

# Debian's dataset-fashion-mnist puts the IDX files under $(FMNIST_DIR); the CJK fonts feed data.format = glyphs.
FONT_PACKAGES := fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-bsmi00lp fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fonts-wqy-zenhei fonts-wqy-microhei fonts-ipafont-gothic fonts-ipafont-mincho fonts-hanazono
APT_PACKAGES := dataset-fashion-mnist $(FONT_PACKAGES)
FONTS_FOUND := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ -f $(FONTS_FOUND) ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR), CJK fonts found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	elif [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found; no CJK fonts (pipelines/glyphs_lt.toml needs them: sudo apt-get install $(FONT_PACKAGES))"; \
	else \
		echo "Fashion-MNIST is missing. Install it with:" >&2; \
		echo "    sudo apt-get update && sudo apt-get install dataset-fashion-mnist" >&2; \
		echo "or put the four IDX .gz files in a folder and add --set data.root=DIR (make: FMNIST_DIR=DIR)." >&2; \
		exit 1; \
	fi

demo: install data
	time $(CBD) run $(ARGS)

test: install data
	$(BIN)/pytest -q

# The developer's loop: every test but the end-to-end ones marked slow (about a minute on 2 cores).
test-fast: install data
	$(BIN)/pytest -q -m "not slow"

teachers: install data
	$(CBD) prepare $(ARGS)
	$(CBD) train-teacher $(ARGS) --jobs $(TEACHER_JOBS)

# The paper's tables on the pipeline (default: Fashion-MNIST-LT), 3 seeds, into results/: measured on 2 cores,
# 3 h 27 min of work, 1 h 49 min wall with PAPER_JOBS=2 (results/fashion_mnist_lt.md; glyphs-LT: 3 h 01 min wall).
# Resumable: finished runs are skipped; PAPER_LIMIT_MIN=20 starts no new run after 20 minutes (exit 3).
paper-table: install data
	$(CBD) paper-table $(ARGS) --out results --time-limit-min $(PAPER_LIMIT_MIN) --jobs $(PAPER_JOBS) $(if $(PAPER_SECTIONS),--sections $(PAPER_SECTIONS))

clean:
	rm -rf runs .pytest_cache
