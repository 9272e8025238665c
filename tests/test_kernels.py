"""Triton kernels (``clp_fast/kernels/``) against their PyTorch twins in ``clp_fast.reference``.

On a CPU-only machine the kernels run under Triton's interpreter: ``TRITON_INTERPRET`` must be set before
Triton is imported, hence the assignment above the imports. The kernels are called directly
(``clp_fast.kernels.fused_heads.fused_heads``), so the Triton path is exercised whatever the backend default.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import first_mismatch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clp_fast import backend, reference  # noqa: E402
from clp_fast.kernels import fused_heads as fh_mod  # noqa: E402
from clp_fast.kernels import kv_commit as kv_mod  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) on confidences, and why.
CONF_TOL = {
    # Same fp32 math, another summation order over H and over the vocabulary splits.
    torch.float32: (1e-6, 1e-5),
    # Logits are rounded to bf16/fp16 in both, so they mostly agree bit for bit; a head's z or a logit whose
    # fp32 value sits on a rounding boundary can land one ulp away (bf16 ulp 2**-8, fp16 2**-11, relative).
    torch.bfloat16: (1e-3, 2e-2),
    torch.float16: (2e-4, 4e-3),
}
DTYPES = list(CONF_TOL)


def plant_winners(hidden, W, targets):
    """Make token ``targets[r]`` row r's clear winner, for the backbone row and every head, with a logit that is
    exact in any summation order (in place; returns nothing).

    Row r's hidden state becomes small (x 0.25) but for a spike of 4 at a coordinate c_r of its own, and
    ``W[t_r] = 8 e_{c_r}``: the winner's logit is one product by a power of two (exact) plus exact zeros, so a
    bit-identical copy of ``W[t_r]`` ties it bit for bit whatever the BLAS, kernel or tile order (a tie planted
    with dense rows is not one under every sgemm: issue 21). Heads keep the spike (``z = h + SiLU(small)``), so
    the winner scores ~32 against < ~13 for the other planted tokens and ~N(0, 1) for random rows.
    """
    R, H = hidden.shape
    if R > H:
        raise ValueError(f"plant_winners needs a coordinate per row: R={R} > H={H}")
    coords = torch.randperm(H)[:R]
    hidden.mul_(0.25)
    hidden[torch.arange(R), coords] = 4.0
    W[targets] = 0.0
    W[targets, coords] = 8.0


def make_inputs(R, H, V, k, dtype, *, plant=False, clp=True, clp_scale=1.0, plant_below=None):
    """Random fused_heads inputs on DEVICE; ``plant`` gives row r a clear winner token ``targets[r]`` (drawn
    below ``plant_below``, default V), exact in any summation order (see plant_winners)."""
    hidden = torch.randn(R, H)
    head_weight = torch.randn(k, H, H) * (0.5 / H**0.5)
    head_bias = torch.randn(k, H) * 0.1
    W = torch.randn(V, H) / H**0.5  # logits of order 1: non-trivial confidences
    targets = None
    if plant:
        targets = torch.randperm(plant_below or V)[:R]
        plant_winners(hidden, W, targets)
    clp_weight = clp_bias = None
    if clp and k:
        clp_weight = torch.randn(k, H + k) * clp_scale / H**0.5
        clp_weight[:, H:] *= 4.0
        clp_bias = torch.randn(k) * 0.5
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    args = (to(hidden), to(head_weight), to(head_bias), to(W), to(clp_weight), to(clp_bias))
    return args, targets


def ref_logits(hidden, head_weight, head_bias, W, draft_vocab=None):
    """Reference logits ``[R, k+1, V]`` (head rows -inf past ``draft_vocab``), to judge near-ties and to
    check the draft-vocabulary rule; ids and conf come from reference.fused_heads."""
    z = reference.head_hidden(hidden, head_weight, head_bias)
    R, K1, H = z.shape
    if draft_vocab in (None, W.shape[0]) or K1 == 1:
        return F.linear(z.reshape(-1, H), W).float().view(R, K1, -1)
    # Matmuls of the reference's shapes (backbone rows over W, head rows over W[:draft_vocab]): the same call on
    # the same operands gives the same bits, which two calls of different shapes need not (issue 21).
    logits = torch.full((R, K1, W.shape[0]), float("-inf"), device=W.device)
    logits[:, 0] = F.linear(hidden, W).float()
    logits[:, 1:, :draft_vocab] = F.linear(z[:, 1:].reshape(-1, H), W[:draft_vocab]).float().view(R, K1 - 1, -1)
    return logits


def assert_ids_near_max(args, ids, ref_ids, max_frac=0.05, draft_vocab=None):
    """ids equal the reference's except at near-ties, which must be few and be within tol of the max."""
    dtype = args[0].dtype
    bad = (ids != ref_ids).nonzero()
    if bad.numel() == 0:
        return
    logits = ref_logits(*args[:4], draft_vocab)
    eps = torch.finfo(dtype).eps
    for r, j in bad.tolist():
        row = logits[r, j]
        tol = 4 * eps * max(1.0, row.max().abs().item())
        assert row[ids[r, j]] >= row.max() - tol, f"({r}, {j}) is no near-tie: " + first_mismatch(ids, ref_ids)
    assert bad.shape[0] <= max(1, max_frac * ids.numel()), first_mismatch(ids, ref_ids)


def assert_conf_close(conf, ref_conf, dtype):
    atol, rtol = CONF_TOL[dtype]
    ok = torch.isclose(conf, ref_conf, atol=atol, rtol=rtol)
    assert bool(ok.all()), first_mismatch(torch.where(ok, ref_conf, conf), ref_conf)


# How close to the threshold a CLP probability may sit and still differ from the reference's decision. The
# CLP logit sums H + k products in another order (fp32: ~1e-6 apart); in bf16/fp16 the confidences it reads
# may differ by CONF_TOL (up to 2 % relative), which moves the probability by up to ~1e-3 here.
CLP_EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def assert_accept_equal_off_threshold(args, accept, ref_conf, threshold):
    """Accept lengths equal except where a CLP probability is within CLP_EPS[dtype] of the threshold (the
    exact-threshold case itself is pinned by test_clp_probability_exactly_at_the_threshold_is_accepted)."""
    hidden, clp_weight, clp_bias = args[0], args[4], args[5]
    eps = CLP_EPS[hidden.dtype]
    lo = reference.clp_accept_lengths(hidden, ref_conf[:, 1:], clp_weight, clp_bias, threshold - eps)
    hi = reference.clp_accept_lengths(hidden, ref_conf[:, 1:], clp_weight, clp_bias, threshold + eps)
    ref = reference.clp_accept_lengths(hidden, ref_conf[:, 1:], clp_weight, clp_bias, threshold)
    stable = lo == hi
    assert torch.equal(accept[stable], ref[stable]), first_mismatch(accept[stable], ref[stable])
    assert stable.float().mean() >= 0.7, f"only {int(stable.sum())} of {stable.numel()} rows off the threshold"


SHAPES = [  # (R, H, V, k)
    (1, 64, 1000, 0),
    (3, 96, 1003, 3),
    (17, 64, 1000, 1),
    (3, 64, 1003, 8),
    (1, 96, 1000, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,H,V,k", SHAPES)
def test_fused_heads_random_matches_reference(R, H, V, k, dtype):
    args, _ = make_inputs(R, H, V, k, dtype)
    ids, conf, accept = fh_mod.fused_heads(*args, threshold=0.5)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args, threshold=0.5)
    assert ids.dtype == torch.int64 and conf.dtype == torch.float32 and accept.dtype == torch.int64
    assert ids.shape == conf.shape == (R, k + 1) and accept.shape == (R,)
    assert_ids_near_max(args, ids, ref_ids)
    assert_conf_close(conf, ref_conf, dtype)
    if k:
        assert_accept_equal_off_threshold(args, accept, ref_conf, 0.5)
    else:
        assert torch.equal(accept, ref_accept)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,H,V,k", [(3, 96, 1003, 3), (17, 64, 1000, 1), (5, 64, 1000, 8)])
def test_fused_heads_planted_winners_and_ties(R, H, V, k, dtype):
    """Clear winners must give torch.equal ids; a duplicated W row gives a tie exact in any summation order:
    lowest index wins."""
    args, targets = make_inputs(R, H, V, k, dtype, plant=True)
    W = args[3]
    expected = targets.clone()
    free = [v for v in range(V) if v not in set(targets.tolist())]
    for r in range(R):
        t = int(targets[r])
        # Alternate the duplicate's place: far below (another split), just below (same tile), above.
        if r % 3 == 0:
            p = free[r]
        elif r % 3 == 1:
            p = max((v for v in free if v < t), default=free[0])
        else:
            p = min((v for v in free if v > t), default=free[-1])
        free.remove(p)
        W[p] = W[t]
        expected[r] = min(p, t)
    ids, conf, _ = fh_mod.fused_heads(*args)
    ref_ids, ref_conf, _ = reference.fused_heads(*args)
    assert torch.equal(ref_ids, expected[:, None].expand(R, k + 1).to(ref_ids.device)), "planting failed"
    assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
    assert_conf_close(conf, ref_conf, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tie_across_tiles_of_one_split_goes_to_the_lower_index(dtype):
    """Deterministic: each row's winner is tied bit for bit with a token one vocabulary tile *earlier in the
    same split*, so the kernel's running argmax (not the merge over splits) must keep the lower index."""
    R, H, V, k = 3, 64, 1000, 2
    args, targets = make_inputs(R, H, V, k, dtype, plant=True)
    cfg = fh_mod._config(args[0].device, R * (k + 1), V, H, dtype)
    bv, tps = cfg["BLOCK_V"], cfg["tiles_per_split"]
    assert tps >= 2 and cfg["n_splits"] >= R, f"need >= 2 tiles in each of {R} splits for this test: {cfg}"
    W = args[3]
    winners = W[targets.to(W.device)].clone()
    W[targets.to(W.device)] = 0.0
    expected = []
    for r in range(R):
        low = r * tps * bv + 1 + r  # tile 0 of split r
        high = low + bv  # tile 1 of split r
        assert high < min(V, (r + 1) * tps * bv)
        W[low] = W[high] = winners[r]
        expected.append(low)
    ids, conf, _ = fh_mod.fused_heads(*args)
    ref_ids, ref_conf, _ = reference.fused_heads(*args)
    want = torch.tensor(expected, device=ref_ids.device)[:, None].expand(R, k + 1)
    assert torch.equal(ref_ids, want), "planting failed"
    assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
    assert_conf_close(conf, ref_conf, dtype)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_clp_decisions(threshold):
    """Accept lengths equal the reference's, with a CLP whose decisions depend on both of its inputs: each
    head's confidence (planted rows ~1, the others 0.4-0.9) weighted 6 against its own logit, centred on 0.8,
    plus a hidden-state term of unit spread."""
    R, H, V, k = 33, 64, 1000, 4
    args, _ = make_inputs(R, H, V, k, torch.float32, plant=True)
    args[0][1::2] = torch.randn(R // 2, H, device=args[0].device)  # odd rows lose their planted winner
    args[4][:, :H] = torch.randn(k, H) * 0.7 / H**0.5
    args[4][:, H:] = 6.0 * torch.eye(k)
    args[5][:] = math.log(threshold / (1 - threshold)) - 6.0 * 0.8
    ids, conf, accept = fh_mod.fused_heads(*args, threshold=threshold)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args, threshold=threshold)
    assert len(set(ref_accept.tolist())) >= 3, "CLP weights give too few distinct decisions to test"
    # Confidences near 1 (planted rows) and near 0 (the others) must matter to the decision, or a kernel that
    # dropped the CLP's confidence inputs would pass.
    blind = reference.clp_accept_lengths(args[0], torch.zeros_like(ref_conf[:, 1:]), args[4], args[5], threshold)
    assert int((blind != ref_accept).sum()) >= 3, "the heads' confidences do not move any decision"
    assert_accept_equal_off_threshold(args, accept, ref_conf, threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clp_probability_exactly_at_the_threshold_is_accepted(dtype):
    """Zero CLP weights and bias: every row's probability is sigmoid(0) = 0.5 exactly, in every dtype. At
    threshold 0.5 the kernel takes all k guesses like the reference (``>=``); at the next float32 above
    0.5 it takes none."""
    R, H, V, k = 5, 64, 1000, 3
    args, _ = make_inputs(R, H, V, k, dtype)
    args = (*args[:4], torch.zeros_like(args[4]), torch.zeros_like(args[5]))
    above = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()
    for threshold, want in [(0.5, k), (above, 0)]:
        accept = fh_mod.fused_heads(*args, threshold=threshold)[2]
        ref_accept = reference.fused_heads(*args, threshold=threshold)[2]
        assert torch.equal(ref_accept.cpu(), torch.full((R,), want)), ref_accept
        assert torch.equal(accept, ref_accept), (threshold, accept, ref_accept)


def test_no_clp_accepts_all_heads():
    args, _ = make_inputs(3, 64, 1000, 3, torch.float32, clp=False)
    _, _, accept = fh_mod.fused_heads(*args)
    assert torch.equal(accept, reference.fused_heads(*args)[2])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:All-NaN:RuntimeWarning")
def test_nan_rows_policy(monkeypatch):
    """A NaN hidden row gives NaN confidences (like the reference) and leaves other rows intact."""
    args, targets = make_inputs(4, 64, 1000, 2, torch.float32, plant=True)
    args[0][1, 5] = float("nan")
    ids, conf, accept = fh_mod.fused_heads(*args)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args)
    assert torch.equal(conf.isnan(), ref_conf.isnan()) and bool(conf[1].isnan().all())
    keep = torch.tensor([0, 2, 3], device=ids.device)
    assert torch.equal(ids[keep], ref_ids[keep]), first_mismatch(ids[keep], ref_ids[keep])
    assert_conf_close(conf[keep], ref_conf[keep], torch.float32)
    monkeypatch.setenv("CLP_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match=r"row 1, head 0"):
        fh_mod.fused_heads(*args)


def test_bad_inputs_refused():
    args, _ = make_inputs(2, 64, 1000, 2, torch.float32)
    with pytest.raises(TypeError, match="lm_head_weight dtype"):
        fh_mod.fused_heads(args[0], args[1], args[2], args[3].half())
    with pytest.raises(ValueError, match="head_weight"):
        fh_mod.fused_heads(args[0], args[1][:, :32], args[2], args[3])
    with pytest.raises(ValueError, match="clp_weight"):
        fh_mod.fused_heads(*args[:4], args[4][:, :-1], args[5])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Vd", [1, 100, 129, 700, 1003])
def test_fused_heads_draft_vocab(Vd, dtype):
    """Head rows range over W[:Vd], the backbone row over all of W: planted winners above Vd are the
    backbone's argmax but never a head's; kernel ids torch.equal to the reference's."""
    R, H, V, k = 6, 64, 1003, 3
    args, targets = make_inputs(R, H, V, k, dtype, plant=True)
    ids, conf, accept = fh_mod.fused_heads(*args, threshold=0.5, draft_vocab=Vd)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args, threshold=0.5, draft_vocab=Vd)
    # The rule itself, from the full logits: the backbone column is the planted winner; head columns are
    # the argmax over the first Vd tokens, with the softmax over those tokens only.
    logits = ref_logits(*args[:4], Vd)
    assert torch.equal(ref_ids[:, 0].cpu(), targets), "backbone row must range over all V tokens"
    assert bool((ref_ids[:, 1:] < Vd).all())
    assert torch.equal(ref_ids, logits.argmax(-1)), first_mismatch(ref_ids, logits.argmax(-1))
    assert_conf_close(ref_conf, torch.softmax(logits, -1).amax(-1), dtype)
    # The kernel against the reference.
    assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
    assert_conf_close(conf, ref_conf, dtype)
    assert_accept_equal_off_threshold(args, accept, ref_conf, 0.5)


@pytest.mark.parametrize("fn", [reference.fused_heads, fh_mod.fused_heads], ids=["reference", "kernel"])
@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True])
def test_bad_draft_vocab_refused(fn, bad):
    args, _ = make_inputs(2, 64, 1000, 2, torch.float32)
    with pytest.raises(ValueError, match=f"draft_vocab={bad!r}"):
        fn(*args, draft_vocab=bad)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    R=st.integers(1, 6),
    H=st.integers(16, 80),
    V=st.integers(2, 700),
    k=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    vd_frac=st.sampled_from([None, 0.1, 0.5, 1.0]),
)
def test_fused_heads_fuzz(R, H, V, k, dtype, seed, vd_frac):
    torch.manual_seed(seed)
    R = min(R, V)  # one distinct planted winner per row
    Vd = None if vd_frac is None else max(1, int(V * vd_frac))
    args, targets = make_inputs(R, H, V, k, dtype, plant=True)
    ids, conf, accept = fh_mod.fused_heads(*args, draft_vocab=Vd)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args, draft_vocab=Vd)
    assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
    assert_conf_close(conf, ref_conf, dtype)
    if k:
        assert_accept_equal_off_threshold(args, accept, ref_conf, 0.5)


@pytest.mark.slow  # ~23 s in the interpreter on 2 shared CPU cores (W alone is 136M weights)
def test_real_shape_qwen05b():
    """Qwen2.5-0.5B LM head (V 151,936, H 896), R 4, k 4, bf16: the vocabulary-split and int64 paths at scale."""
    args, targets = make_inputs(4, 896, 151_936, 4, torch.bfloat16, plant=True)
    ids, conf, accept = fh_mod.fused_heads(*args)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args)
    assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
    assert_conf_close(conf, ref_conf, torch.bfloat16)
    assert_accept_equal_off_threshold(args, accept, ref_conf, 0.5)


# ---------------------------------------------------------------------------------------------- KV commit


def _poisoned(shape, dtype, layout):
    """A cache of NaNs (floats) with the requested memory layout: contiguous or max_len/KVH swapped."""
    L, B, KVH, M, D = shape
    if layout == "contiguous":
        c = torch.empty(shape, dtype=dtype, device=DEVICE)
    else:
        c = torch.empty((L, B, M, KVH, D), dtype=dtype, device=DEVICE).transpose(2, 3)
    return c.fill_(float("nan"))


def _same(a, b):
    """Equal including NaN positions."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("L,B,KVH,M,T,D", [(2, 3, 2, 12, 4, 24), (1, 5, 1, 9, 7, 64)])
def test_commit_kv_span_matches_reference(L, B, KVH, M, T, D, layout, dtype):
    shape = (L, B, KVH, M, D)
    ck, cv = _poisoned(shape, dtype, layout), _poisoned(shape, dtype, layout)
    ref_k, ref_v = ck.clone(), cv.clone()
    before_k = ck.clone()
    new_k = torch.randn(L, B, KVH, T, D, device=DEVICE).to(dtype)
    new_v = torch.randn(L, B, KVH, T, D, device=DEVICE).to(dtype).transpose(3, 4).contiguous().transpose(3, 4)
    lens = torch.randint(0, T + 1, (B,))
    lens[0] = 0  # a row with nothing accepted must stay untouched
    lens[-1] = T
    offs = torch.stack([torch.randint(0, M - int(n) + 1, ()) for n in lens])
    lens, offs = lens.to(DEVICE), offs.to(torch.int32).to(DEVICE)
    kv_mod.commit_kv_span_(ck, cv, new_k, new_v, offs, lens)
    reference.commit_kv_span_(ref_k, ref_v, new_k, new_v, offs, lens)
    assert _same(ck, ref_k) and _same(cv, ref_v), first_mismatch(ck.nan_to_num(-1), ref_k.nan_to_num(-1))
    assert _same(ck[:, 0], before_k[:, 0]), "zero-length row was written"
    assert not ck.isnan().all(), "nothing was written"


@pytest.mark.parametrize(
    "offs,lens,match",
    [
        ([0, 9], [1, 2], "passes the cache's max_len"),
        ([0, 0], [5, 0], r"outside \[0, 4\]"),
        ([0, 0], [-1, 0], "outside"),
    ],
)
def test_commit_kv_span_refuses_out_of_range(offs, lens, match):
    L, B, KVH, M, T, D = 1, 2, 1, 10, 4, 8
    ck = torch.zeros(L, B, KVH, M, D, device=DEVICE)
    cv = torch.zeros_like(ck)
    new = torch.ones(L, B, KVH, T, D, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        kv_mod.commit_kv_span_(ck, cv, new, new, torch.tensor(offs, device=DEVICE), torch.tensor(lens, device=DEVICE))
    assert not ck.any() and not cv.any(), "a refused call wrote to the cache"


# ------------------------------------------------------------------------------------------ backend dispatch


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_backend_dispatch(monkeypatch, choice):
    calls = []

    def spy(name, impl):
        def wrapped(*a, **kw):
            calls.append(name)
            return impl(*a, **kw)

        return wrapped

    monkeypatch.setattr(fh_mod, "fused_heads", spy("triton", fh_mod.fused_heads))
    monkeypatch.setattr(reference, "fused_heads", spy("torch", reference.fused_heads))
    monkeypatch.setattr(kv_mod, "commit_kv_span_", spy("triton", kv_mod.commit_kv_span_))
    monkeypatch.setattr(reference, "commit_kv_span_", spy("torch", reference.commit_kv_span_))
    monkeypatch.setenv("CLP_FAST_BACKEND", choice)
    args, _ = make_inputs(2, 64, 1000, 1, torch.float32)
    backend.fused_heads(*args)
    cache = torch.zeros(1, 1, 1, 4, 8, device=DEVICE)
    new = torch.ones(1, 1, 1, 2, 8, device=DEVICE)
    one = torch.ones(1, dtype=torch.long, device=DEVICE)
    backend.commit_kv_span_(cache, cache.clone(), new, new, one, one)
    assert calls == [choice, choice]


def test_backend_bogus_refused(monkeypatch):
    monkeypatch.setenv("CLP_FAST_BACKEND", "bogus")
    args, _ = make_inputs(1, 64, 1000, 1, torch.float32)
    with pytest.raises(ValueError, match="bogus"):
        backend.fused_heads(*args)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton, not the interpreter)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_heads_gpu_real_shapes(dtype):
    for R, k in [(1, 3), (16, 4), (64, 2)]:
        args, _ = make_inputs(R, 1536, 151_936, k, dtype, plant=True)
        ids, conf, accept = fh_mod.fused_heads(*args)
        ref_ids, ref_conf, _ = reference.fused_heads(*args)
        assert torch.equal(ids, ref_ids), first_mismatch(ids, ref_ids)
        assert_conf_close(conf, ref_conf, dtype)
        assert_accept_equal_off_threshold(args, accept, ref_conf, 0.5)


def test_lossless_decode_with_triton_backend_equals_torch_backend(monkeypatch):
    """End to end on the tiny random Qwen2: the Triton kernels (interpreter on CPU) decode exactly
    the tokens of the torch reference, with guesses accepted, cut short and rejected (ragged spans)."""
    from test_decode import PROMPTS, OracleDrafts, random_heads

    import clp_fast
    from clp_fast.drafts import heads as heads_src
    from tests.conftest import left_pad, tiny_model

    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 12].tolist() for b in range(len(PROMPTS))]
    heads = random_heads(model, 3)
    outs = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("CLP_FAST_BACKEND", choice)
        monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, corrupt_every=3))
        outs[choice], stats = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=12,
                                                mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=0,
                                                return_stats=True, speculation="fixed")
        monkeypatch.undo()
        assert sum(stats.accept_hist[1:]) > 0 and sum(stats.accept_hist[:-1]) > 0, stats.accept_hist
    assert torch.equal(outs["triton"], outs["torch"]), first_mismatch(outs["triton"], outs["torch"])
    assert torch.equal(outs["torch"], want), first_mismatch(outs["torch"], want)
