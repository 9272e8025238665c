# clp_fast — `make test` and `make bench` work on a fresh machine: they create .venv and install
# what they need (torch pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.clp_fast-installed

.PHONY: install test test-fast bench bench-full bench-batched bench-gpu-compile eval eval-full lint fetch clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(STAMP)

fetch: install
	$(PY) -m clp_fast fetch smollm2-135m-instruct --quiet

test: install fetch
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

bench: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/run_bench.py

bench-full: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/run_bench.py --full

# Batches never slower: clp_fast greedy / lossless vs transformers batched greedy, B in 1..32, 2 reps (~10 min).
bench-batched: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/bench_batched.py

# Registers, spills, shared memory, occupancy and roofline lower bounds of every kernel launch on A100 / H100 / H200,
# from ahead-of-time compiles on this CPU, no GPU needed (~1 min on 2 cores; bench/results/gpu_compile-*).
bench-gpu-compile: install
	$(PY) bench/gpu_compile_report.py

# Executed HumanEval pass@1 of greedy, clp mode at a threshold sweep and the gate (sandboxed; see README).
EVAL_ARGS ?=
eval: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/quality.py $(EVAL_ARGS)

eval-full: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/quality.py --full $(EVAL_ARGS)

lint: install
	$(VENV)/bin/ruff check --line-length 120 clp_fast kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
