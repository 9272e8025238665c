"""The prepacked oneDNN step (``clp_fast.models.packed``): what it computes, when it is used, what it leaves alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equal_ids, left_pad, tiny_model

import clp_fast
from clp_fast.models import packed
from clp_fast.models.native import NativeBackbone

needs_mkldnn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and packed._cpu_packs(torch.bfloat16)),
                                  reason="oneDNN is not built in, or packs no bf16 weight on this CPU (AVX2 only)")


def test_a_cpu_that_cannot_pack_takes_the_plain_path(monkeypatch):
    """Where oneDNN refuses to pack bf16 (an AVX2-only CPU raises in _reorder_linear_weight), the step is the
    plain one and bf16 decoding runs; the probe itself answers without raising on every CPU."""
    assert packed._cpu_packs(torch.bfloat16) in (True, False)
    monkeypatch.setattr(packed, "_cpu_packs", lambda dtype: False)
    monkeypatch.setenv("CLP_FAST_PACK", "1")
    model = tiny_model(dtype=torch.bfloat16)
    assert NativeBackbone(model).step is None
    ids, mask = left_pad([[5, 9, 14, 3]])
    got = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=6, mode="greedy")
    assert got.shape == (1, 10)


@pytest.fixture
def pack_on(monkeypatch):
    monkeypatch.setenv("CLP_FAST_PACK", "1")


@needs_mkldnn
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("N,K,bias", [(1000, 96, False), (200, 576, True), (1536, 576, False)])
def test_packed_weight_computes_the_linear(N, K, bias, M):
    """bf16 in and out, fp32 accumulation in both: the results may differ only by the final rounding to bf16
    (one ulp, 2**-8 relative) where an fp32 sum sits on a rounding boundary."""
    w = (torch.randn(N, K) / K**0.5).bfloat16()
    b = torch.randn(N).bfloat16() if bias else None
    x = torch.randn(2, M, K).bfloat16()
    got = packed.PackedWeight(w, b)(x)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (2, M, N) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-8, atol=1e-3)
    # Past MAX_PACKED_ROWS rows a weight that keeps its plain path takes it: F.linear itself.
    plain = packed.PackedWeight(w, b, keep_plain=True)(x)
    if 2 * M > packed.MAX_PACKED_ROWS:
        assert torch.equal(plain, want)
    else:
        assert torch.equal(plain, got)


@needs_mkldnn
def test_rows_are_the_first_rows_and_bad_n_is_named():
    w = torch.randn(300, 64).bfloat16()
    x = torch.randn(4, 64).bfloat16()
    pw = packed.PackedWeight(w, keep_plain=True)
    got = packed.linear(x, packed.rows(pw, 100))
    torch.testing.assert_close(got.float(), F.linear(x, w[:100]).float(), rtol=2**-8, atol=1e-3)
    assert packed.rows(pw, 100) is packed.rows(pw, 100) and packed.rows(pw, 300) is pw  # packed once
    with pytest.raises(ValueError, match="n=301"):
        pw.rows(301)
    with pytest.raises(ValueError, match="keep_plain"):
        packed.PackedWeight(w).rows(10)


def test_bad_pack_flag_is_named(monkeypatch):
    monkeypatch.setenv("CLP_FAST_PACK", "yes")
    with pytest.raises(ValueError, match="CLP_FAST_PACK='yes'"):
        packed.step_weights(tiny_model(dtype=torch.bfloat16))


@needs_mkldnn
def test_used_for_bf16_on_cpu_only_and_packed_once(pack_on, monkeypatch):
    """bf16 on CPU packs (once per model, reused by every decode); fp32 keeps the model's own modules (its
    exactness claims never depend on packing); CLP_FAST_PACK=0 packs nothing."""
    m16 = tiny_model(dtype=torch.bfloat16)
    assert NativeBackbone(tiny_model()).step is None
    first = NativeBackbone(m16).step
    assert first is not None and NativeBackbone(m16).step is first
    assert isinstance(NativeBackbone(m16).lm_head_weight, packed.PackedWeight)
    monkeypatch.setenv("CLP_FAST_PACK", "0")
    assert NativeBackbone(m16).step is None


@needs_mkldnn
def test_weights_changed_in_place_are_repacked(pack_on, monkeypatch):
    model = tiny_model(dtype=torch.bfloat16)
    ids, mask = left_pad([[5, 9, 14, 3]])
    stale = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=12, mode="greedy")
    before = NativeBackbone(model).step
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)  # a different model now
    assert NativeBackbone(model).step is not before
    got = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=12, mode="greedy")
    monkeypatch.setenv("CLP_FAST_PACK", "0")
    plain = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=12, mode="greedy")
    assert_equal_ids(got, plain)  # the new weights, not the stale packed copy
    assert not torch.equal(stale, plain), "the weight change should change the output"
    packed.release(model)
    assert model not in packed._CACHE


@needs_mkldnn
@pytest.mark.parametrize("mode", ["greedy", "lossless"])
def test_bf16_decode_ids_equal_with_and_without_packing(smollm2, monkeypatch, mode):
    """SmolLM2 in bf16, B = 1 and a ragged B = 3: the packed step's ids are torch.equal to the plain step's
    through a whole decode. The packed product equals F.linear bit for bit at decoding's row counts
    (measured on Intel Xeon and AMD EPYC): if a oneDNN build breaks that, this test says so. Lossless
    uses speculation='fixed' so both runs feed the same tokens (the adaptive policy reads the clock)."""
    model = copy.deepcopy(smollm2[0]).bfloat16()
    tok = smollm2[1]
    rows = [tok.encode(p) for p in ("def fibonacci(n):", "The capital of France is", "import os\nimport sys\n")]
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("CLP_FAST_PACK", flag)
        for batch in ([rows[0]], rows):
            ids, mask = left_pad(batch, tok.pad_token_id or 0)
            kw = {"speculation": "fixed"} if mode == "lossless" else {}
            outs[flag, len(batch)] = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=40,
                                                       mode=mode, **kw)
    assert NativeBackbone(model).step is not None  # the "1" runs were packed
    for B in (1, 3):
        assert_equal_ids(outs["1", B], outs["0", B])


@needs_mkldnn
def test_the_users_model_is_untouched(pack_on):
    """Packing copies: after clp_fast decodes and after patch/unpatch, the model's parameters are the same
    tensors with the same values, and transformers' own generate gives what it gave before."""
    model = tiny_model(dtype=torch.bfloat16)
    ids, mask = left_pad([[5, 9, 14, 3], [0, 7, 7, 2]])
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    hf_before = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    heads = clp_fast.MTPHeads.for_model(model, 2)
    clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=10, mode="lossless", heads=heads)
    clp_fast.patch(model, heads=heads)
    model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    clp_fast.unpatch(model)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1]), n
    assert_equal_ids(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), hf_before)


@needs_mkldnn
def test_the_drafter_drafts_through_packed_products(pack_on):
    """A bf16 EAGLE-style drafter drafts (no grad) through its packed fc, q|k|v, o and gate|up, and trains (grad)
    through its modules: the two forwards agree to bf16 rounding of each product (one ulp, 2**-8 relative,
    compounded over five products: rtol 2**-5); a weight changed in place is repacked; decoding with it packs it."""
    from clp_fast.drafts.eagle import EagleDrafter, EagleSource, causal_mask

    model = tiny_model(dtype=torch.bfloat16)
    torch.manual_seed(7)
    d = EagleDrafter.for_model(model, init="random", std=0.05).to(torch.bfloat16)
    B, T, H = 2, 5, d.hidden_size
    feature, emb = torch.randn(B, T, H).bfloat16(), torch.randn(B, T, H).bfloat16()
    pos = torch.arange(T).expand(B, T)
    mask = causal_mask(torch.zeros(B, dtype=torch.long), torch.full((B,), T), 0, T)

    def both():
        with torch.enable_grad():
            plain = d(feature, emb, pos, None, None, mask)
        with torch.no_grad():
            got = d(feature, emb, pos, None, None, mask)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a.float(), b.detach().float(), rtol=2**-5, atol=2**-5)
        return got[0]

    first = both()
    assert packed.drafter_weights(d) is not None
    with torch.no_grad():
        d.layer.self_attn.o_proj.weight.mul_(3.0)
    assert not torch.equal(both(), first)  # repacked: the packed forward follows the new weight

    packed.release(d)
    ids, mask = left_pad([[5, 9, 14, 3]])
    clp_fast.generate(model, ids, False, attention_mask=mask, max_new_tokens=6, mode="lossless", prompt_lookup=0,
                      drafts=[EagleSource.factory(d, depth=2)])
    assert packed._CACHE.get(d) is not None
