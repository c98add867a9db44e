# Two entry points, both idempotent on a fresh Debian/Ubuntu machine with Python >= 3.10:
#   make train   system libraries, virtualenv, CIFAR-100 + CIFAR-100N download, .beton files, training
#   make test    system libraries, virtualenvs, the test suite (benchmarks run once each as tests), then
#                the compiled and graph-capture tests again under the oldest torch pyproject.toml admits
PYTHON    ?= python3
VENV      ?= .venv
RAW_DIR   ?= data/raw
BETON_DIR ?= data/cifar100n
CONFIG    ?= paper
ARGS      ?=
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.fastcifar-installed
# The oldest torch of the supported range (pyproject.toml), what the lent H200 had: inductor lowers
# differently across versions, so the compiled path is tested on both ends of the range.
OLD_TORCH       ?= 2.11.0
OLD_TORCHVISION ?= 0.26.0
VENV_OLD        ?= .venv-torch$(OLD_TORCH)
STAMP_OLD       := $(VENV_OLD)/.fastcifar-installed

.PHONY: setup system-deps train demo test bench gpu-report clean

system-deps:
	@bash scripts/system_deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench,ffcv]'
	@touch $@

$(STAMP_OLD): pyproject.toml
	$(PYTHON) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/python -m pip install -q --upgrade pip
	# numpy < 2.4: triton 3.6 (torch 2.11's) interprets kernels with int() of 1-element arrays, which
	# numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
	$(VENV_OLD)/bin/python -m pip install -q torch==$(OLD_TORCH) torchvision==$(OLD_TORCHVISION) 'numpy<2.4' -e '.[dev]'
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

test: setup $(STAMP_OLD)
	$(BIN)/python -m pytest tests benchmarks -q --benchmark-disable
	@echo "== the compiled and graph-capture tests under torch $(OLD_TORCH) =="
	$(VENV_OLD)/bin/python -m pytest tests -q -m compiled -p no:cacheprovider

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-only

# The GPU report (one call of about 9 minutes). On a GPU machine with torch but no internet, skip the set-up:
#   python3 scripts/gpu_report.py --out DIR        (nothing to install: it runs from the checkout)
gpu-report: setup
	$(BIN)/python scripts/gpu_report.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_OLD) build *.egg-info
