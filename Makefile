# lexjax: `make install` creates .venv with the package (editable) and its test extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GIN ?= configs/runs/quickstart.gin
MODEL_DIR ?= runs/quickstart

.PHONY: install test train bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

install: $(PY)
	$(PY) -m pip install -q -e '.[test]'

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3 \
		$(PY) -m pytest -n 2 tests

train: install
	@echo "The training CLI arrives with the main-job issue (python -m lexjax.train)."

clean:
	rm -rf $(VENV) build *.egg-info
