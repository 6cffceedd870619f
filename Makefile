# lexjax: `make install` creates .venv with the package (editable), its test extras and the
# converter's (PyTorch and transformers: the reference the Hugging Face import is tested against).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
GIN ?= configs/runs/quickstart.gin
MODEL_DIR ?= runs/quickstart
EVAL_LENGTHS ?= 128,256,512,1024

.PHONY: install test train clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Large wheels (TensorFlow, ~570 MB) are resumed when a download is cut off, and the whole
# install is tried three times before it fails.
install: $(PY)
	for attempt in 1 2 3; do \
		$(PY) -m pip install -q --retries 10 --resume-retries 20 '$(TORCH)' -e '.[test,convert]' \
			&& exit 0; \
		echo "pip install failed (attempt $$attempt of 3)"; \
	done; exit 1

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3 \
		$(PY) -m pytest -n 2 tests

# Train the quickstart model on the embedded corpus, then evaluate it at 1x-8x its length.
train: install
	$(PY) -m lexjax.train --gin_file=$(GIN) --model_dir=$(MODEL_DIR) $(ARGS)
	$(PY) -m lexjax.evaluate --model_dir=$(MODEL_DIR) --lengths=$(EVAL_LENGTHS)

clean:
	rm -rf $(VENV) build *.egg-info
