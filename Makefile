# Two entry points, both idempotent on a fresh Debian/Ubuntu machine with Python >= 3.10:
#   make train   system libraries, virtualenv, CIFAR-100 + CIFAR-100N download, .beton files, training
#   make test    system libraries, virtualenv, the test suite (benchmarks run once each as tests)
PYTHON    ?= python3
VENV      ?= .venv
RAW_DIR   ?= data/raw
BETON_DIR ?= data/cifar100n
CONFIG    ?= paper
ARGS      ?=
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.fastcifar-installed

.PHONY: setup system-deps train demo test bench gpu-report clean

system-deps:
	@bash scripts/system_deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench,ffcv]'
	@touch $@

setup: system-deps $(STAMP)

train: setup
	$(BIN)/python scripts/write_beton.py --data-dir $(RAW_DIR) --out-dir $(BETON_DIR)
	$(BIN)/python -m fastcifar.train --config $(CONFIG) --data-dir $(BETON_DIR) $(ARGS)

# The offline demo, on the CPU: scikit-learn's digits with 40% wrong labels; the demo preset's
# ImageNet-pretrained EfficientNet-Lite0 through freeze -> unfreeze -> select -> flip TTA, then the
# same schedule with filtering off, and the two side by side (runs/demo-<time>/ablations.md).
demo: setup
	$(BIN)/python scripts/write_beton.py --source digits --noise 0.4 --noise-kind symmetric --out-dir data/digits40 --quiet
	$(BIN)/python -m fastcifar.ablate --config demo --data-dir data/digits40 --out runs/demo-$$(date +%Y%m%d-%H%M%S) \
		--variants configured,no-filter $(ARGS)

test: setup
	$(BIN)/python -m pytest tests benchmarks -q --benchmark-disable

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-only

# The GPU report (about 8 minutes). On a GPU machine with torch but no internet, skip the set-up:
#   python3 scripts/gpu_report.py --out DIR        (nothing to install: it runs from the checkout)
gpu-report: setup
	$(BIN)/python scripts/gpu_report.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
