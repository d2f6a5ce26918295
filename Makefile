# Two entry points for a fresh clone: `make train` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
DATA ?= data/default
ARGS ?=

.PHONY: setup setup-dev train test test-all lint bench clean

setup:
	@bash launch/setup_env.sh

setup-dev:
	@EXTRAS=dev bash launch/setup_env.sh

$(DATA)/meta.json: | setup
	$(VENV)/bin/scaletrain prepare --out $(DATA)

# A short real run: 2-process DDP on the built-in GPT and corpus, ending in a checkpoint.
train: setup $(DATA)/meta.json
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/train.py \
		data.path=$(DATA) run.out_dir=runs/quickstart $(ARGS)

test: setup-dev
	$(PY) -m pytest -q

test-all: setup-dev
	$(PY) -m pytest -q -m "" --timeout=1800

lint: setup-dev
	$(VENV)/bin/ruff check src tests bench launch

bench: setup-dev
	$(PY) -m pytest -q -m bench -s

clean:
	rm -rf runs .pytest_cache
