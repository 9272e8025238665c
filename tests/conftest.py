"""Shared fixtures: seeded RNG, tiny random Qwen2/Llama models, the fetched SmolLM2 model."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two threads, the machines' size; CLP_FAST_TEST_THREADS overrides (bench/test_matrix.sh runs 1 and 2).
torch.set_num_threads(int(os.environ.get("CLP_FAST_TEST_THREADS", 0)) or min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """Human-readable location of the first differing element of two same-shape tensors."""
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a != b).nonzero()
    if diff.numel() == 0:
        return "equal"
    idx = tuple(diff[0].tolist())
    return f"first mismatch at {idx}: {a[idx].item()} vs {b[idx].item()} ({diff.shape[0]} mismatches)"


def assert_equal_ids(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), first_mismatch(a, b)


def tiny_config(arch: str = "qwen2", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=1000, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3)
    kw.update(overrides)
    return (Qwen2Config if arch == "qwen2" else LlamaConfig)(**kw)


def tiny_model(arch: str = "qwen2", dtype=torch.float32, **overrides):
    """A small random causal LM whose greedy output varies (initializer_range 0.3, not 0.02)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(1234)
    cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    return cls(tiny_config(arch, **overrides)).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_qwen2():
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → ``(input_ids [B, P], attention_mask [B, P])``."""
    from clp_fast.engine import left_pad as _left_pad

    return _left_pad(rows, pad)


def smollm2_path() -> Path:
    home = Path(os.environ.get("CLP_FAST_HOME", Path.home() / ".cache" / "clp_fast"))
    return home / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32 (fetched by `make test`); fails loudly if missing."""
    path = smollm2_path()
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} is missing: run `clp-fast fetch smollm2-135m-instruct` (make test does)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


DRIVER_DEADLINE_S = 120  # generous: imports alone take seconds on a loaded 2-core machine


def spawn_driver(test_file: str, args: list[str], home: Path, **env) -> subprocess.Popen:
    """Start ``python test_file *args`` (that file's ``__main__`` driver) with ``CLP_FAST_HOME=home`` and ``env``;
    a kill point or fake-PyPI gate of the parent's environment is not inherited."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CLP_FAST_KILL_AT", "FAKE_PYPI_GATE")}
    full_env.update(CLP_FAST_HOME=str(home), **env)
    return subprocess.Popen([sys.executable, test_file, *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
