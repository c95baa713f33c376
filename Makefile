# simsiam-tf: every target sets itself up (virtual environment + pinned packages) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQUIREMENTS ?= requirements.txt
STAMP := $(VENV)/.installed-$(notdir $(REQUIREMENTS))
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install install-gpu quickstart test test-slow test-all lint format clean check-gpu parity

install: $(STAMP)

$(STAMP): $(REQUIREMENTS) requirements-common.txt requirements-serving.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	$(PY) -m pip install --quiet --no-deps -r requirements-serving.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install-gpu:
	$(MAKE) install REQUIREMENTS=requirements-gpu.txt

check-gpu: install
	$(PY) -c "import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); print('GPUs:', g); assert g, 'no GPU visible to TensorFlow'"

quickstart: install
	rm -rf runs/quickstart
	$(PY) tools/train.py --config=configs/quickstart.py --workdir=runs/quickstart
	@echo "--- runs/quickstart/summary.json"
	@cat runs/quickstart/summary.json

test: install
	$(PY) -m pytest -q

# Step-for-step parity with the official PyTorch code (tools/parity.py). torch and torchvision
# go into their own directory, on the PYTHONPATH of the torch worker process only.
PARITY_TORCH ?= $(VENV)/parity-torch
PARITY_STAMP := $(PARITY_TORCH)/.installed-requirements-parity.txt

$(PARITY_STAMP): requirements-parity.txt | $(STAMP)
	rm -rf $(PARITY_TORCH)
	$(PY) -m pip install --quiet --target $(PARITY_TORCH) -r requirements-parity.txt
	touch $@

parity: install $(PARITY_STAMP)
	$(PY) tools/parity.py --torch_path=$(PARITY_TORCH)

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(PY) -m ruff check simsiam_tf tools tests configs
	$(PY) -m black --check simsiam_tf tools tests configs

format: install
	$(PY) -m isort simsiam_tf tools tests configs
	$(PY) -m black simsiam_tf tools tests configs

clean:
	rm -rf $(VENV) runs .pytest_cache
