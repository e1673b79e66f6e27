# `make test` and `make demo` do all set-up themselves on a fresh machine. Packages are installed
# by uv (itself installed by pip into .venv): it links them from its cache, so a new environment
# of torch's 5 GB takes seconds once the cache holds the wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed

# The torch releases the students' sanity checks and the notebook in fast mode also run under
# (`make test-compat`), each in a virtual environment of its own, `.venv-<name>`, with only the
# runtime packages and the test runner: the oldest release the requirements allow, and the one
# Colab ships. The full suite runs under the development release pinned in requirements-dev.txt.
# tests/test_eecs598_versions.py keeps the floor here equal to requirements.txt's.
COMPAT_ENVS := floor colab
floor_TORCH := torch==2.4.1 torchvision==0.19.1
colab_TORCH := torch==2.9.1 torchvision==0.24.1
COMPAT_TEST_PACKAGES := pytest pytest-xdist nbclient nbformat ipykernel
# One pytest worker per core (tests/conftest.py gives each one torch thread).
WORKERS ?= auto

.PHONY: test test-dev test-compat demo lint format clean

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv

$(STAMP): requirements.txt requirements-dev.txt requirements-onnx.txt | $(UV)
	$(UV) pip install -q --python $(PY) -r requirements-dev.txt
	touch $(STAMP)

.venv-%/.installed: requirements.txt Makefile | $(UV)
	test -x .venv-$*/bin/python || $(UV) venv -q --python $(PYTHON) .venv-$*
	$(UV) pip install -q --python .venv-$*/bin/python $($*_TORCH) -r requirements.txt \
		$(COMPAT_TEST_PACKAGES)
	touch $@

test: test-dev test-compat

test-dev: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile tests

test-compat: $(COMPAT_ENVS:%=.venv-%/.installed)
	for env in $(COMPAT_ENVS); do \
		.venv-$$env/bin/python -c 'import torch, torchvision; \
			print("== torch", torch.__version__, "torchvision", torchvision.__version__)'; \
		.venv-$$env/bin/python -m pytest -q -n $(WORKERS) --dist loadfile \
			-m "sanity or compat" tests || exit 1; \
	done

demo: $(STAMP)
	$(PY) detector_cli.py demo --out outputs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(COMPAT_ENVS:%=.venv-%) .pytest_cache .ruff_cache outputs
