"""The reference kernels (the spec) against naive, loop-per-head implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clp_fast import reference
from tests.conftest import assert_equal_ids

# (atol, rtol) for confidences: fp32 is exact math up to summation order; bf16/fp16 logits are
# rounded to the dtype before softmax in both paths, so only the sum order differs as well.
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1e-4), torch.float16: (1e-5, 1e-4)}


def naive_fused_heads(hidden, head_weight, head_bias, W, clp_w, clp_b, threshold, draft_vocab=None):
    R, k = hidden.shape[0], head_weight.shape[0]
    ids = torch.empty(R, k + 1, dtype=torch.long)
    conf = torch.empty(R, k + 1)
    for r in range(R):
        h = hidden[r]
        for j in range(k + 1):
            if j == 0:
                z = h
            else:
                z = (h.float() + F.silu(head_weight[j - 1].float() @ h.float() + head_bias[j - 1].float())).to(h.dtype)
            rows = W if j == 0 or draft_vocab is None else W[:draft_vocab]  # heads: the draft vocabulary
            logits = (rows @ z).float()  # rounded to the dtype like a plain lm_head forward
            ids[r, j] = int(torch.argmax(logits))
            conf[r, j] = torch.softmax(logits, dim=0).max()
    accept = torch.empty(R, dtype=torch.long)
    for r in range(R):
        feats = torch.cat([hidden[r].float(), conf[r, 1:]])
        n = 0
        for j in range(k):
            if torch.sigmoid(feats @ clp_w[j].float() + clp_b[j].float()) >= threshold:
                n += 1
            else:
                break
        accept[r] = n
    return ids, conf, accept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("R,H,V,Vd", [(1, 64, 1000, None), (3, 96, 1003, None), (5, 32, 257, None),
                                      (3, 96, 1003, 100), (5, 32, 257, 1)])
def test_fused_heads_matches_naive_loop(R, H, V, Vd, k, dtype):
    hidden = torch.randn(R, H).to(dtype)
    W = (torch.randn(V, H) / H**0.5).to(dtype)
    hw, hb = torch.randn(k, H, H) * 0.1, torch.randn(k, H) * 0.1
    clp_w, clp_b = torch.randn(k, H + k) * 0.1, torch.randn(k)
    got = reference.fused_heads(hidden, hw, hb, W, clp_w, clp_b, 0.5, draft_vocab=Vd)
    want = naive_fused_heads(hidden, hw, hb, W, clp_w, clp_b, 0.5, draft_vocab=Vd)
    assert_equal_ids(got[0], want[0])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol)
    assert_equal_ids(got[2], want[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_heads_ties_go_to_lowest_index(dtype):
    H, V = 16, 5000
    # Small integers: every product and partial sum is exact in all three dtypes (multiples of 8, |logit| <= 512),
    # so tokens 7 and 4040 tie bit for bit in any summation order, whatever the BLAS kernel (issue 21).
    W = torch.randint(-4, 5, (V, H)).float()
    W[7] = 4.0
    W[4040] = W[7]
    W, hidden = W.to(dtype), (W[7:8] * 2).to(dtype)  # token 7 (and its twin 4040) win: 512 vs < 512
    ids, conf, _ = reference.fused_heads(hidden, torch.zeros(2, H, H), torch.zeros(2, H), W)
    assert ids.tolist() == [[7, 7, 7]]
    assert conf[0, 0] < 0.5 + 1e-6  # two equal maxima share the mass


def test_clp_accept_lengths_longest_prefix():
    H, k = 4, 3
    hidden = torch.zeros(3, H)
    conf = torch.zeros(3, k)
    w = torch.zeros(k, H + k)
    b = torch.tensor([[5.0, -5.0, 5.0], [5.0, 5.0, 5.0], [-5.0, 5.0, 5.0]])
    got = [int(reference.clp_accept_lengths(hidden[i : i + 1], conf[i : i + 1], w, b[i], 0.9)) for i in range(3)]
    assert got == [1, 3, 0]  # a later "yes" after a "no" is not taken


def test_clp_probability_exactly_at_the_threshold_is_accepted():
    """The rule is ``sigmoid >= threshold``: zero weights and bias give sigmoid(0) = 0.5 exactly, so
    threshold 0.5 takes every guess and the next float32 above 0.5 takes none (``>`` would give 0 at 0.5)."""
    R, H, V, k = 3, 8, 50, 3
    hidden, W = torch.randn(R, H), torch.randn(V, H)
    cw, cb = torch.zeros(k, H + k), torch.zeros(k)
    above = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()
    assert reference.clp_accept_lengths(hidden, torch.rand(R, k), cw, cb, 0.5).tolist() == [k] * R
    assert reference.clp_accept_lengths(hidden, torch.rand(R, k), cw, cb, above).tolist() == [0] * R
    args = (hidden, torch.zeros(k, H, H), torch.zeros(k, H), W, cw, cb)
    assert reference.fused_heads(*args, threshold=0.5)[2].tolist() == [k] * R
    assert reference.fused_heads(*args, threshold=above)[2].tolist() == [0] * R


def test_fused_heads_without_clp_accepts_all_k():
    ids, conf, accept = reference.fused_heads(torch.randn(4, 8), torch.zeros(3, 8, 8), torch.zeros(3, 8),
                                              torch.randn(20, 8))
    assert accept.tolist() == [3, 3, 3, 3]
    assert ids.shape == (4, 4) and conf.shape == (4, 4)


def test_commit_kv_span_writes_only_each_rows_span():
    L, B, KVH, M, D, T = 2, 3, 2, 10, 4, 5
    ck, cv = torch.full((L, B, KVH, M, D), float("nan")), torch.full((L, B, KVH, M, D), float("nan"))
    before_k, before_v = ck.clone(), cv.clone()
    nk, nv = torch.randn(L, B, KVH, T, D), torch.randn(L, B, KVH, T, D)
    offs, lens = torch.tensor([0, 4, 9]), torch.tensor([5, 0, 1])
    reference.commit_kv_span_(ck, cv, nk, nv, offs, lens)
    want_k, want_v = before_k.clone(), before_v.clone()
    for b in range(B):  # the slow, obvious loop
        for t in range(int(lens[b])):
            want_k[:, b, :, int(offs[b]) + t] = nk[:, b, :, t]
            want_v[:, b, :, int(offs[b]) + t] = nv[:, b, :, t]
    torch.testing.assert_close(ck, want_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(cv, want_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("offs,lens,match", [([0, 8], [1, 3], "max_len"), ([0, 0], [6, 0], "outside"),
                                              ([-1, 0], [1, 0], "max_len")])
def test_commit_kv_span_refuses_bad_spans_before_writing(offs, lens, match):
    ck, cv = torch.zeros(1, 2, 1, 10, 2), torch.zeros(1, 2, 1, 10, 2)
    nk = torch.ones(1, 2, 1, 5, 2)
    with pytest.raises(ValueError, match=match):
        reference.commit_kv_span_(ck, cv, nk, nk, torch.tensor(offs), torch.tensor(lens))
    assert ck.abs().sum() == 0 and cv.abs().sum() == 0  # nothing half-written
