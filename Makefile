# shardrec developer commands. `make test` and `make demo` work on a fresh clone: they create the virtual
# environment first. pip (not uv/poetry) because torch's CPU build is installed from a local wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PEER ?= .venv-peer
STAMP := $(VENV)/.shardrec-installed
PEER_STAMP := $(PEER)/.shardrec-peer-installed
PKG_META := packages/core/pyproject.toml packages/sharders/pyproject.toml packages/dlrm/pyproject.toml
TORCH_PINS := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
# Same allocator settings on both sides of every comparison (see docs/benchmarks.md). The trim threshold keeps
# glibc from handing freed memory back to the kernel, which otherwise page-faults fresh tensors back in.
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456

.PHONY: setup test lint typecheck pytest demo bench bench-peer gpu-wheels clean

setup: $(STAMP)

$(STAMP): $(PKG_META) requirements-dev.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -r requirements-dev.txt \
		-e packages/core -e packages/sharders -e packages/dlrm
	@touch $@

# Packages use each other's public API only (tools/check_private_imports.py says what counts).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/check_private_imports.py
	$(PY) tools/check_import_cycles.py

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest

test: lint typecheck pytest

demo: setup
	rm -rf demo-data runs/demo
	$(VENV)/bin/dlrm synth demo-data --rows 200000 --seed 0
	@echo "Follow the training in TensorBoard: $(VENV)/bin/tensorboard --logdir runs/demo" \
		"(then open http://localhost:6006)"
	$(VENV)/bin/dlrm train --data demo-data --logdir runs/demo --embedding-dim 16 \
		--num-embeddings 50000 --dense-arch-layer-sizes 64,16 --over-arch-layer-sizes 64,1 \
		--batch-size 256 --optimizer adagrad --learning-rate 0.05 --validation-freq 200

# Every benchmark, each against TorchRec in the same run when .venv-peer exists (make bench-peer first).
BENCHES := kjt ebc dmp criteo dlrm planner_scale gemm floor overlap
bench: setup
	@for b in $(BENCHES); do echo "== tools/bench/$$b.py"; $(BENCH_ENV) $(PY) tools/bench/$$b.py || exit 1; done

# Wheels of the three packages in .whl/, for tools/gpu_check.sh on a lent GPU machine (which has no network:
# the device tool carries .whl/ there).
gpu-wheels: setup
	rm -rf .whl
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir .whl packages/core packages/sharders packages/dlrm

# A second environment with TorchRec 1.8.0, our peer in every benchmark. torchrec is installed without its
# dependencies because its pins would replace torch 2.13.0; the needs it really has are listed here.
bench-peer: $(PEER_STAMP)

$(PEER_STAMP): $(PKG_META) Makefile
	@test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet $(TORCH_PINS) tensordict torchmetrics==1.0.3 \
		pyre-extensions iopath tqdm numpy
	$(PEER)/bin/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(PEER)/bin/python -m pip install --quiet -e packages/core -e packages/sharders -e packages/dlrm
	@touch $@

clean:
	rm -rf $(VENV) $(PEER) .mypy_cache .ruff_cache .pytest_cache
