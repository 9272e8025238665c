"""Microbenchmarks of the reference (PyTorch) paths of one decode step, at Qwen2.5-0.5B's real shapes.

Run with ``pytest bench/ --benchmark-only`` (not part of ``make test``, whose path is ``tests/``).
They answer "what does each piece of a step cost on this CPU": the fused heads + LM head against
k + 1 separate LM-head projections (the cost the fusion avoids), the CLP decision, the KV-span
commit, and the native backbone forward against transformers' forward at the same shape.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from clp_fast import backend, reference
from clp_fast.models.native import NativeBackbone

V, H = 151_936, 896  # Qwen2.5-0.5B LM head: 136M weights, over a fifth of the model
L, KVH, D = 24, 2, 64  # its KV cache per layer: 2 KV heads of 64


@pytest.fixture(autouse=True, scope="module")
def _threads():
    # The project's CPU has 2 cores. On a machine shared with other jobs, set CLP_FAST_BENCH_THREADS=1:
    # with 2 threads and a busy second core every parallel op waits a scheduler slice (a 0.03 ms op
    # measured 12-16 ms).
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CLP_FAST_BENCH_THREADS", min(2, os.cpu_count() or 1))))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def lm_head(request):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(V, H, generator=g) * 0.02).to(request.param)


def _heads(k: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(k, H, H, generator=g).to(dtype) * 0.02, torch.zeros(k, H, dtype=dtype)


@pytest.mark.parametrize("rows, k", [(1, 0), (1, 4), (5, 4), (16, 4)],
                         ids=["greedy-1row", "k4-1row", "k4-verify5", "k4-B4xT4"])
def test_fused_heads(benchmark, lm_head, rows, k):
    """One read of W for all rows x (k + 1) logit rows, argmax, confidences, CLP."""
    hidden = torch.randn(rows, H).to(lm_head.dtype)
    w, b = _heads(k)
    clp_w, clp_b = torch.zeros(k, H + k), torch.zeros(k)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    ids, conf, n = benchmark(reference.fused_heads, hidden, w, b, lm_head, clp_w if k else None,
                             clp_b if k else None, 0.5)
    assert ids.shape == (rows, k + 1)


@pytest.mark.parametrize("rows, k", [(1, 4), (5, 4)], ids=["k4-1row", "k4-verify5"])
def test_separate_lm_head_projections(benchmark, lm_head, rows, k):
    """What fused_heads avoids: the LM head applied once per head (k + 1 reads of W)."""
    hidden = torch.randn(rows, H).to(lm_head.dtype)
    w, b = _heads(k)
    z = reference.head_hidden(hidden, w, b)  # [R, k + 1, H]

    def separate():
        return [F.linear(z[:, j], lm_head).float().argmax(-1) for j in range(k + 1)]

    out = benchmark(separate)
    assert len(out) == k + 1


def test_head_hidden(benchmark):
    """The k residual head blocks alone (fp32), 5 rows, k = 4."""
    hidden = torch.randn(5, H, dtype=torch.bfloat16)
    w, b = _heads(4)
    assert benchmark(reference.head_hidden, hidden, w, b).shape == (5, 5, H)


def test_clp_accept_lengths(benchmark):
    """The CLP: one (H + k) x k linear layer and a prefix rule, 5 rows."""
    k = 4
    hidden, conf = torch.randn(5, H), torch.rand(5, k)
    w, b = torch.randn(k, H + k) * 0.01, torch.zeros(k)
    assert benchmark(reference.clp_accept_lengths, hidden, conf, w, b, 0.5).shape == (5,)


@pytest.mark.parametrize("B", [1, 4, 16])
def test_commit_kv_span(benchmark, B):
    """Per-row ragged commit of a step's K/V (T = 5) into a 512-slot bf16 cache, all 24 layers."""
    T, max_len = 5, 512
    ck = torch.zeros(L, B, KVH, max_len, D, dtype=torch.bfloat16)
    cv = torch.zeros_like(ck)
    nk = torch.randn(L, B, KVH, T, D).to(torch.bfloat16)
    nv = torch.randn_like(nk)
    offs = torch.randint(0, 256, (B,))
    spans = torch.randint(0, T + 1, (B,))
    benchmark(backend.commit_kv_span_, ck, cv, nk, nv, offs, spans)
    b = int(spans.argmax())
    n = int(spans[b])
    assert torch.equal(ck[:, b, :, int(offs[b]): int(offs[b]) + n], nk[:, b, :, :n])


def _tiny_qwen2():
    """A 2-layer Qwen2 at the real hidden size (896) with a small vocab: the forward without the LM head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=H, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=KVH, max_position_embeddings=1024)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_qwen2()


@pytest.mark.parametrize("T", [1, 5])
def test_native_forward_step(benchmark, tiny, T):
    """Our forward of T new tokens against a 200-token committed cache (2 layers of Qwen2.5-0.5B's width)."""
    bb = NativeBackbone(tiny)
    cache = bb.allocate_cache(1, 256)
    cache.lengths += 200
    tokens = torch.randint(0, 1000, (1, T))
    new_len = torch.tensor([T])
    with torch.inference_mode():
        hidden, _, _ = benchmark(bb.forward, tokens, cache, new_len)
    assert hidden.shape == (1, T, H)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("T", [1, 5])
def test_transformers_forward_step(benchmark, tiny, T):
    """transformers' own forward at the same shape (DynamicCache of 200 tokens, cropped back each call)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=tiny.config)
        tiny.model(torch.randint(0, 1000, (1, 200)), past_key_values=cache, use_cache=True)
        tokens = torch.randint(0, 1000, (1, T))

        def step():
            out = tiny.model(tokens, past_key_values=cache, use_cache=True)
            cache.crop(-T)  # drop this step's T tokens again
            return out.last_hidden_state

        assert benchmark(step).shape == (1, T, H)
