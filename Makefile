# The two commands of the README's Quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all setup clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

# compile ResNet-50 for the default server with the splitting heuristic, then run the
# emitted plan here (devices mapped onto this machine's CPU) and check its outputs
demo: $(STAMP)
	$(VENV)/bin/partitioner compile resnet50 --hw server-cpu-2gpu --objective latency --solver split --out out/demo --force
	$(VENV)/bin/partitioner run out/demo --check

# the suite that matters, in <= 3 minutes on 2 cores (CI runs this); the long matrices are marked `slow`
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# everything, the `slow` matrices included
test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/heuristic.py

clean:
	rm -rf $(VENV) out
