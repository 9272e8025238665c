"""The fixed-shape step (``clp_fast.models.graphs``): buckets, padding and the static forward, checked on the CPU.

The CUDA graph itself needs a GPU (``bench/gpu_check.sh`` runs it); everything it replays — the bucketed,
sync-free ``forward(static=True)`` — runs here through ``CLP_FAST_STEP=static``.
"""

from __future__ import annotations

import pytest
import torch
from test_decode import PROMPTS, OracleDrafts, hf_greedy, random_heads

import clp_fast
from clp_fast.drafts import heads as heads_src
from clp_fast.models import graphs
from clp_fast.models.native import NativeBackbone
from tests.conftest import assert_equal_ids, left_pad, tiny_model


def test_every_fed_token_count_has_the_smallest_bucket_that_holds_it():
    for T in range(1, graphs.BUCKETS[-1] + 1):
        b = graphs.bucket_for(T)
        assert b in graphs.BUCKETS and b >= T
        assert all(c < T for c in graphs.BUCKETS if c < b)  # no smaller bucket would do
    assert [graphs.bucket_for(T) for T in (1, 2, 3, 5, 9, 33)] == [1, 2, 4, 8, 16, 64]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, graphs.BUCKETS[-1] + 1])
def test_bad_fed_token_count_is_named(bad):
    with pytest.raises(ValueError, match=f"T={bad!r}"):
        graphs.bucket_for(bad)


def test_step_kind_from_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    assert graphs.step_kind(cpu) == "eager"
    monkeypatch.setenv("CLP_FAST_STEP", "static")
    assert graphs.step_kind(cpu) == "static"
    monkeypatch.setenv("CLP_FAST_STEP", "graph")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        graphs.step_kind(cpu)
    monkeypatch.setenv("CLP_FAST_STEP", "fast")
    with pytest.raises(ValueError, match="CLP_FAST_STEP='fast'"):
        graphs.step_kind(cpu)


def test_a_padded_chain_is_the_same_tree():
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    tok, depth, anc = graphs.pad_to_bucket(tokens, None, None, 4)
    assert tok.tolist() == [[4, 5, 6, 0], [7, 8, 9, 0]] and depth.tolist() == [[0, 1, 2, 0]] * 2
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(anc, want[None].expand(2, 4, 4))
    with pytest.raises(ValueError, match="Tb=2"):
        graphs.pad_to_bucket(tokens, None, None, 2)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_static_bucketed_forward_equals_the_eager_one(arch):
    """Ragged cache lengths and fed counts (one row feeds nothing): the real positions' hidden states and K/V
    of the static forward at a larger bucket equal the eager forward's (fp32; the extra masked keys and the
    projected padding change the matmuls' row counts, so sums may round a few ulps apart: ~3e-6 relative observed)."""
    model = tiny_model(arch)
    bb = NativeBackbone(model)
    B, T = 3, 3
    cache = bb.allocate_cache(B, 40)
    prompt = torch.randint(0, 1000, (B, 9))
    plen = torch.tensor([9, 4, 6])
    _, k0, v0 = bb.forward(prompt, cache, plen)
    for b in range(B):
        n = int(plen[b])
        cache.k[:, b, :, :n], cache.v[:, b, :, :n] = k0[:, b, :, :n], v0[:, b, :, :n]
    cache.lengths[:] = plen
    tokens, new_len = torch.randint(0, 1000, (B, T)), torch.tensor([3, 1, 0])
    h, k, v = bb.forward(tokens, cache, new_len)
    tok, depth, anc = graphs.pad_to_bucket(tokens, None, None, 8)
    hs, ks, vs = bb.forward(tok, cache, new_len, depth, anc, static=True)
    for b in range(B):
        n = int(new_len[b])
        torch.testing.assert_close(hs[b, :n], h[b, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ks[:, b, :, :n], k[:, b, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vs[:, b, :, :n], v[:, b, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_static_step_decodes_exactly_like_transformers(arch, monkeypatch):
    """fp32, ragged B = 4: greedy, and lossless with partly right drafts (trees of several fed counts, so several
    buckets), through the static step equal transformers' greedy."""
    monkeypatch.setenv("CLP_FAST_STEP", "static")
    model = tiny_model(arch)
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 24)
    got = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=24, mode="greedy", eos_token_id=[],
                            pad_token_id=0)
    assert_equal_ids(got, want)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 24].tolist() for b in range(len(PROMPTS))]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, 3))
    got, stats = clp_fast.generate(model, ids, random_heads(model, 4), attention_mask=mask, max_new_tokens=24,
                                   mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=0,
                                   speculation="fixed", return_stats=True)
    assert_equal_ids(got, want)
    assert sum(stats.accept_hist[1:]) > 0 and sum(stats.accept_hist[:-1]) > 0, stats.accept_hist
