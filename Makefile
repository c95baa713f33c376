# simsiam-tf: every target sets itself up (virtual environment + pinned packages) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQUIREMENTS ?= requirements.txt
STAMP := $(VENV)/.installed-$(notdir $(REQUIREMENTS))
KERNELS_STAMP := $(VENV)/.built-kernels
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install install-gpu quickstart test test-slow test-all lint format clean check-gpu \
	test-import-torch parity

install: $(STAMP) $(KERNELS_STAMP)

$(STAMP): $(REQUIREMENTS) requirements-common.txt requirements-serving.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	$(PY) -m pip install --quiet --no-deps -r requirements-serving.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The C++ kernels (simsiam_tf/native.py): the pipeline's crop and colour jitter, and BatchNorm's
# training step; about 25 s of g++. Without a compiler the install goes on and both run on stock
# TensorFlow ops (aug.kernels="auto", model.bn_kernels="auto").
$(KERNELS_STAMP): simsiam_tf/kernels/augment_ops.cc simsiam_tf/kernels/batchnorm_ops.cc $(STAMP)
	$(PY) -m simsiam_tf.native --force || echo "warning: native kernels not built; the pipeline and BatchNorm run on stock TensorFlow ops"
	touch $@

.PHONY: kernels
kernels: $(KERNELS_STAMP)

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

# The export through TensorFlow's C++ loader (serving/cc/; part of `make test` as well).
.PHONY: serving-cc-check
serving-cc-check: install
	$(PY) -m pytest -q tests/test_serving_cc.py

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m ""

# torch (requirements-parity.txt) lives in a venv of its own that sees the training venv's
# packages, so the training venv never holds torch.
PARITY_VENV ?= $(VENV)-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_STAMP := $(PARITY_VENV)/.installed-requirements-parity.txt
site_packages = $$($(1) -c "import sysconfig; print(sysconfig.get_path('purelib'))")

$(PARITY_STAMP): requirements-parity.txt | $(STAMP)
	test -x $(PARITY_PY) || $(PY) -m venv $(PARITY_VENV)
	echo "import site; site.addsitedir('$(call site_packages,$(PY))')" \
		> $(call site_packages,$(PARITY_PY))/simsiam-training-venv.pth
	$(PARITY_PY) -m pip install --quiet -r requirements-parity.txt
	touch $@

# Official PyTorch checkpoints made with torchvision, imported, exported and served.
test-import-torch: $(PARITY_STAMP)
	$(PARITY_PY) -m pytest -q -m "" tests/test_import_torch.py

# Step-for-step parity with the official PyTorch code (tools/parity.py): TensorFlow runs in the
# training venv, the official model in a worker process of the parity venv.
parity: install $(PARITY_STAMP)
	$(PY) tools/parity.py --torch_python=$(PARITY_PY)

lint: install
	$(PY) -m ruff check simsiam_tf tools tests configs
	$(PY) -m black --check simsiam_tf tools tests configs

format: install
	$(PY) -m isort simsiam_tf tools tests configs
	$(PY) -m black simsiam_tf tools tests configs

clean:
	rm -rf $(VENV) $(PARITY_VENV) runs .pytest_cache
