"""Fused MTP heads: head residual blocks, one read of the LM head for all rows, argmax, confidence, CLP.

Twin of :func:`clp_fast.reference.fused_heads` (same signature, same outputs). Three launches:

1. ``_head_hidden_kernel``: ``z[r, j] = h_r + SiLU(W_j h_r + b_j)`` in fp32, cast to the input dtype
   (row ``j = 0`` is ``h_r`` itself). It is a Triton kernel rather than torch code in the launcher
   (house style: launchers do no math); it reads ``k * H * H`` head weights, e.g. 3.2M at Qwen2.5-0.5B
   with k = 4, 2.4% of the LM head's 136M, so it is not where the time goes.
2. ``_fused_heads_kernel``: every ``R * (k + 1)`` row against one read of ``W [V, H]``, tiled over the
   vocabulary, accumulated in fp32 and rounded to the input dtype like the reference; each program owns
   a contiguous vocabulary split and keeps an online max / argmax / sum-exp per row, writing three small
   ``[rows, splits]`` partials. The ``[rows, V]`` logits never
   touch memory (at R = 16, k = 4 they would be 80 x 151,936 fp32 = 49 MB, 18% of W's bf16 bytes).
3. ``_merge_clp_kernel``: one program per backbone row merges the splits (ties to the lowest index),
   writes ids and confidences, and applies the CLP layer (longest prefix with sigmoid >= threshold).

NaN policy: a logit row that holds a NaN or an inf (NaN/inf inputs, or fp32 overflow) gets ``conf = NaN``,
as in the reference; its id is then unspecified (the reference returns the first NaN's index) and the CLP
stops accepting at that head (``NaN >= threshold`` is false, as in the reference). With
``CLP_FAST_DEBUG=1`` the launcher raises ``ValueError`` naming the first such (row, head) instead; the check
syncs the device, which is why it is opt-in.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from clp_fast.kernels.device import DeviceProps, props_of

__all__ = ["fused_heads"]

_INT32_MAX = tl.constexpr(2**31 - 1)  # "no index" sentinel: loses every lowest-index tie


@triton.jit
def _rne_bf16_bits(x):
    """fp32 ``x`` rounded to nearest-even bf16, as fp32 bits (low 16 bits zero); NaN stays NaN.

    By hand, not ``x.to(tl.bfloat16)``: Triton 3.9's interpreter truncates that cast (518 of 1024 random
    values differ from torch's RNE); one code path for GPU and CI costs a few integer ops per logit.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, 0x7FC00000, rounded)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest even) and widened back to fp32."""
    if dtype == tl.bfloat16:
        return _rne_bf16_bits(x).to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest even)."""
    if dtype == tl.bfloat16:
        return (_rne_bf16_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _widen(x):
    """``x`` as fp32. bf16 by bit shift: exact, and the interpreter's generic cast costs ~10 ms a tile."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_or_zero(ptrs, mask):
    """Masked load, masked lanes 0. bf16 goes through 16-bit integers: the same load on a GPU, but the
    interpreter would otherwise convert the fp32 fill value 0.0 to bf16 over the whole tile in Python."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        return tl.load(ptrs.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.bfloat16, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _head_hidden_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    R,
    H,
    stride_hr,
    stride_hh,
    stride_wk,
    stride_wn,
    stride_wc,
    stride_bk,
    stride_bn,
    stride_zr,
    stride_zj,
    stride_zh,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # Grid: (row blocks, output-feature blocks, k + 1). Head j = 0 is the backbone row: a copy.
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < H
    mask_out = mask_r[:, None] & mask_n[None, :]
    h_out = _load_or_zero(h_ptr + offs_r[:, None] * stride_hr + offs_n[None, :] * stride_hh, mask_out)
    z_ptrs = z_ptr + offs_r[:, None] * stride_zr + j * stride_zj + offs_n[None, :] * stride_zh
    if j == 0:
        tl.store(z_ptrs, h_out, mask=mask_out)
    else:
        w_base = w_ptr + (j - 1).to(tl.int64) * stride_wk
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, H, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < H
            a = _load_or_zero(
                h_ptr + offs_r[:, None] * stride_hr + offs_c[None, :] * stride_hh,
                mask_r[:, None] & mask_c[None, :],
            )
            w = _load_or_zero(
                w_base + offs_n[:, None] * stride_wn + offs_c[None, :] * stride_wc,
                mask_n[:, None] & mask_c[None, :],
            )
            if FP32_DOT:
                # "ieee": TF32 would round the operands to 10 mantissa bits, far from the fp32 reference.
                acc = tl.dot(_widen(a), tl.trans(_widen(w)), acc, input_precision="ieee")
            else:
                # 16-bit products are exact in fp32, so this equals the reference's upcast-then-fp32 einsum
                # up to summation order.
                acc = tl.dot(a, tl.trans(w), acc)
        bias = _widen(_load_or_zero(b_ptr + (j - 1) * stride_bk + offs_n * stride_bn, mask_n))
        proj = acc + bias[None, :]
        z = _widen(h_out) + proj * tl.sigmoid(proj)
        tl.store(z_ptrs, _narrow(z, z_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _fused_heads_kernel(
    z_ptr,
    w_ptr,
    pmax_ptr,
    parg_ptr,
    psum_ptr,
    ptopv_ptr,
    ptopi_ptr,
    n_rows,
    V,
    Vd,
    K1,
    H,
    tiles_per_split,
    stride_zr,
    stride_zh,
    stride_wv,
    stride_wh,
    stride_pr,
    stride_tr,
    stride_ts,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    TOP_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Grid: (row blocks, vocabulary splits). Row blocks vary fastest, so the programs that share a
    # W split run together and any second row block reads it from L2, not HBM.
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    z_rows = z_ptr + offs_m.to(tl.int64)[:, None] * stride_zr
    # Row r * K1 is a backbone row (all V tokens); rows r * K1 + j, j >= 1, are head rows (the first Vd).
    row_limit = tl.where(offs_m % K1 == 0, V, Vd)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_arg = tl.full((BLOCK_M,), _INT32_MAX, dtype=tl.int32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # TOP_M > 1: the split's TOP_M best (logit, index) per row so far, best first (slots >= TOP_M stay empty).
    slots = tl.arange(0, BLOCK_T)
    top_v = tl.full((BLOCK_M, BLOCK_T), float("-inf"), dtype=tl.float32)
    top_i = tl.full((BLOCK_M, BLOCK_T), _INT32_MAX, dtype=tl.int32)
    for t in range(0, tiles_per_split):
        v0 = (split * tiles_per_split + t) * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        # int64: V * H stays below 2**31 for real vocabularies, but a padded row stride may not.
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            a = _load_or_zero(z_rows + offs_k[None, :] * stride_zh, mask_m[:, None] & mask_k[None, :])
            w = _load_or_zero(w_rows + offs_k[None, :] * stride_wh, mask_v[:, None] & mask_k[None, :])
            if FP32_DOT:
                acc = tl.dot(_widen(a), tl.trans(_widen(w)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        # Round to the input dtype first, as a plain lm_head forward does (the reference's F.linear): the
        # argmax must be that of the logits transformers' greedy search sees. A no-op for fp32.
        acc = _round_to(acc, w_ptr.dtype.element_ty)
        logits = tl.where(offs_v[None, :] < row_limit[:, None], acc, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        # Lowest index among the tile's maxima, like torch.argmax; a later tile only wins when strictly
        # greater, so ties across tiles also keep the lowest index.
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], offs_v[None, :], _INT32_MAX), axis=1)
        new_max = tl.maximum(run_max, tile_max)
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        # A head row's tiles past Vd are all -inf (so may be its running max): shift by 0 there, so that
        # exp(-inf - 0) = 0 keeps its sum at 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        run_max = new_max
        if TOP_M > 1:
            if v0 < Vd:  # past the draft vocabulary only the backbone row is live, and it needs no list
                top_v, top_i = _merge_top(top_v, top_i, logits, offs_v[None, :], slots, TOP_M)

    out = offs_m * stride_pr + split
    tl.store(pmax_ptr + out, run_max, mask=mask_m)
    tl.store(parg_ptr + out, run_arg, mask=mask_m)
    tl.store(psum_ptr + out, run_sum, mask=mask_m)
    if TOP_M > 1:
        tout = offs_m[:, None] * stride_tr + split * stride_ts + slots[None, :]
        tmask = mask_m[:, None] & (slots < TOP_M)[None, :]
        tl.store(ptopv_ptr + tout, top_v, mask=tmask)
        tl.store(ptopi_ptr + tout, top_i, mask=tmask)


@triton.jit
def _merge_top(top_v, top_i, cand_v, cand_i, slots, TOP_M: tl.constexpr):
    """The TOP_M best of a running list ``top_v/top_i [M, T]`` and new candidates ``cand_v/cand_i [M, N]``
    (logit descending, lowest index first among equal logits), as a new ``[M, T]`` list.

    TOP_M rounds of: the best value left, the lowest index holding it in either set, then that entry is
    struck out. Indices are unique across the two sets, so an entry is taken once.
    """
    new_v = tl.full(top_v.shape, float("-inf"), dtype=tl.float32)
    new_i = tl.full(top_i.shape, _INT32_MAX, dtype=tl.int32)
    for t in tl.static_range(TOP_M):
        best = tl.maximum(tl.max(top_v, axis=1), tl.max(cand_v, axis=1))
        idx = tl.minimum(
            tl.min(tl.where(top_v == best[:, None], top_i, _INT32_MAX), axis=1),
            tl.min(tl.where(cand_v == best[:, None], cand_i, _INT32_MAX), axis=1),
        )
        new_v = tl.where(slots[None, :] == t, best[:, None], new_v)
        new_i = tl.where(slots[None, :] == t, idx[:, None], new_i)
        top_v = tl.where(top_i == idx[:, None], float("-inf"), top_v)
        cand_v = tl.where(cand_i == idx[:, None], float("-inf"), cand_v)
    return new_v, new_i


@triton.jit
def _merge_clp_kernel(
    pmax_ptr,
    parg_ptr,
    psum_ptr,
    ptopv_ptr,
    ptopi_ptr,
    h_ptr,
    cw_ptr,
    cb_ptr,
    ids_ptr,
    conf_ptr,
    accept_ptr,
    tid_ptr,
    tp_ptr,
    K1,
    S,
    H,
    threshold,
    stride_pr,
    stride_tr,
    stride_tor,
    stride_toj,
    stride_hr,
    stride_hh,
    stride_cwk,
    stride_cwc,
    stride_cb,
    stride_ir,
    stride_ij,
    stride_cr,
    stride_cj,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_CLP: tl.constexpr,
    TOP_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per backbone row r: its k + 1 logit rows are partial rows r * K1 .. r * K1 + k.
    r = tl.program_id(0)
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < K1
    rows = (r * K1 + offs_j)[:, None] * stride_pr
    # Two passes over the splits, BLOCK_S at a time, so that neither the registers nor the binary depend on the
    # split count (2 per SM: 264 on an H100): the maximum and its lowest index, then the sum of exponentials.
    row_max = tl.full((BLOCK_J,), float("-inf"), dtype=tl.float32)
    row_arg = tl.full((BLOCK_J,), _INT32_MAX, dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_j[:, None] & (offs_s < S)[None, :]
        pmax = tl.load(pmax_ptr + rows + offs_s[None, :], mask=mask, other=float("-inf"))
        parg = tl.load(parg_ptr + rows + offs_s[None, :], mask=mask, other=_INT32_MAX)
        chunk_max = tl.max(pmax, axis=1)
        # Splits cover increasing vocabulary ranges and each holds its own lowest argmax, so the lowest index over
        # the tied splits of the first chunk that reaches the maximum is the global lowest index.
        chunk_arg = tl.min(tl.where(pmax == chunk_max[:, None], parg, _INT32_MAX), axis=1)
        row_arg = tl.where(chunk_max > row_max, chunk_arg, row_arg)
        row_max = tl.maximum(row_max, chunk_max)
    # Padded rows (j > k) get a 0 maximum, not -inf, so that exp(-inf - max) stays a clean 0.
    row_max = tl.where(mask_j, row_max, 0.0)
    total = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_j[:, None] & (offs_s < S)[None, :]
        pmax = tl.load(pmax_ptr + rows + offs_s[None, :], mask=mask, other=float("-inf"))
        psum = _load_or_zero(psum_ptr + rows + offs_s[None, :], mask)
        total += tl.sum(psum * tl.exp(pmax - row_max[:, None]), axis=1)
    total = tl.where(mask_j, total, 1.0)
    # exp(max - logsumexp) = 1 / sum(exp(l - max)): one division, no log/exp round trip.
    conf = 1.0 / total
    tl.store(ids_ptr + r * stride_ir + offs_j * stride_ij, row_arg.to(tl.int64), mask=mask_j)
    tl.store(conf_ptr + r * stride_cr + offs_j * stride_cj, conf, mask=mask_j)

    if TOP_M > 1:
        # Each split's TOP_M best, flattened as c = split * TOP_M + slot, merged by the same rule, BLOCK_C at a
        # time: all 1,056 candidates of 264 splits at once spilled 1-4 KB per thread on sm_90 (k = 4, top-m 4).
        slots = tl.arange(0, BLOCK_T)
        top_v = tl.full((BLOCK_J, BLOCK_T), float("-inf"), dtype=tl.float32)
        top_i = tl.full((BLOCK_J, BLOCK_T), _INT32_MAX, dtype=tl.int32)
        for c0 in range(0, S * TOP_M, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = mask_j[:, None] & (offs_c < S * TOP_M)[None, :]
            cpart = (r * K1 + offs_j)[:, None] * stride_tr + offs_c[None, :]
            cand_v = tl.load(ptopv_ptr + cpart, mask=cmask, other=float("-inf"))
            cand_i = tl.load(ptopi_ptr + cpart, mask=cmask, other=_INT32_MAX)
            top_v, top_i = _merge_top(top_v, top_i, cand_v, cand_i, slots, TOP_M)
        top_p = tl.exp(top_v - row_max[:, None]) / total[:, None]
        # Head rows only (j >= 1) go out, as [R, k, TOP_M].
        tout = r * stride_tor + (offs_j - 1)[:, None] * stride_toj + slots[None, :]
        tmask = ((offs_j >= 1) & mask_j)[:, None] & (slots < TOP_M)[None, :]
        tl.store(tid_ptr + tout, top_i.to(tl.int64), mask=tmask)
        tl.store(tp_ptr + tout, top_p, mask=tmask)

    k = K1 - 1
    if HAS_CLP:
        # CLP logit_i = sum_h h[h] Wc[i, h] + sum_c conf[c] Wc[i, H + c - 1] + b[i] over heads c = 1..k.
        mask_i = offs_j < k
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            hv = _widen(_load_or_zero(h_ptr + r * stride_hr + offs_h * stride_hh, mask_h))
            cw = _load_or_zero(
                cw_ptr + offs_j[:, None] * stride_cwk + offs_h[None, :] * stride_cwc,
                mask_i[:, None] & mask_h[None, :],
            )
            acc += tl.sum(_widen(cw) * hv[None, :], axis=1)
        is_head = (offs_j >= 1) & mask_j
        # tl.where, not a multiply by a 0/1 mask: a NaN confidence (NaN logits) must not leak into other heads.
        head_conf = tl.where(is_head, conf, 0.0)
        cw_conf = _load_or_zero(
            cw_ptr + offs_j[:, None] * stride_cwk + (H + offs_j - 1)[None, :] * stride_cwc,
            mask_i[:, None] & is_head[None, :],
        )
        acc += tl.sum(_widen(cw_conf) * head_conf[None, :], axis=1)
        logit = acc + _widen(_load_or_zero(cb_ptr + offs_j * stride_cb, mask_i))
        ok = tl.sigmoid(logit) >= threshold
        accept = tl.min(tl.where(mask_i & (ok == 0), offs_j, k), axis=0)
    else:
        accept = k
    # A vector store with one live lane: accept may be a plain int (K1 == 1 is specialised to a constant).
    tl.store(accept_ptr + r + offs_j * 0, tl.zeros((BLOCK_J,), dtype=tl.int64) + accept, mask=offs_j == 0)


def _config(device: DeviceProps | torch.device, n_rows: int, V: int, H: int, dtype: torch.dtype) -> dict:
    """Tile sizes, vocabulary splits, warps and stages of the LM-head pass on ``device``.

    ``device`` is a :class:`~clp_fast.kernels.device.DeviceProps` (a ``torch.device`` is read through ``props_of``), so
    the choice for a named GPU can be computed on a machine without one.

    GPU: 16..64 rows per block (decode is memory-bound up to ~200 rows on an H200, so one block reads W
    once), 64-token vocabulary tiles and enough splits for two programs per SM. Interpreter (CPU): big
    tiles, since each Triton op costs Python overhead there, and a few splits so the merge is exercised.
    """
    props = device if isinstance(device, DeviceProps) else props_of(device)
    n_tiles_of = lambda bv: triton.cdiv(V, bv)  # noqa: E731
    if props.is_gpu:
        # Compiled for sm_80 and sm_90 at every launch of tests/test_kernels_compile.py (Triton 3.9), none spills:
        # 16-bit: 8 warps over 64-wide K steps, 4 stages (54-161 registers, 30-65 KB shared memory); fp32 (an
        # "ieee" FMA dot, compute-bound past a few rows): 16 rows, 32-wide K steps, 3 stages. The earlier 4 warps
        # x 128 (fp32: x 64, up to 64 rows) spilled 4-32 bytes per thread at 80-168 registers, ptxas trading
        # spills for occupancy, and fp32 at 64 rows with top-m 4 1.8 KB at 255 registers.
        wide = dtype != torch.float32
        block_m = min(max(16, triton.next_power_of_2(n_rows)), 64) if wide else 16
        block_v = 64
        block_k = 64 if wide else 32
        want = triton.cdiv(2 * props.sm_count, triton.cdiv(n_rows, block_m))
        num_warps, num_stages = 8, 4 if wide else 3
    else:
        block_m = min(max(16, triton.next_power_of_2(n_rows)), 128)
        block_v = 128 if V <= 16384 else 2048
        block_k = min(max(16, triton.next_power_of_2(H)), 256)
        want = min(8, triton.cdiv(n_tiles_of(block_v), 2))
        num_warps, num_stages = 4, 1
    n_tiles = n_tiles_of(block_v)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(want, n_tiles, 1024)))
    # Recomputed so that no split is empty: every split's running max is then finite.
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    return dict(
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        tiles_per_split=tiles_per_split,
        n_splits=n_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def fused_heads(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    lm_head_weight: torch.Tensor,
    clp_weight: torch.Tensor | None = None,
    clp_bias: torch.Tensor | None = None,
    threshold: float = 0.5,
    draft_vocab: int | None = None,
    top_m: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Backbone + MTP-head argmaxes, confidences and CLP accept lengths; twin of the reference.

    Args:
        hidden: ``[R, H]`` final hidden states (bf16, fp16 or fp32).
        head_weight: ``[k, H, H]``; ``k`` may be 0.
        head_bias: ``[k, H]``.
        lm_head_weight: ``[V, H]``, same dtype as ``hidden``.
        clp_weight: ``[k, H + k]`` or None (then accept lengths are all ``k``).
        clp_bias: ``[k]`` or None.
        threshold: CLP acceptance probability.
        draft_vocab: head rows range over ``W[:draft_vocab]`` (see the reference); None = V.
        top_m: candidates per head row, ``1 <= top_m <= min(8, draft_vocab)``.

    Returns:
        ids ``[R, k + 1]`` int64, conf ``[R, k + 1]`` fp32, accept ``[R]`` int64 (see the reference);
        with ``top_m > 1`` also top_ids ``[R, k, top_m]`` int64 and top_p ``[R, k, top_m]`` fp32.

    Raises:
        ValueError: bad shapes or devices; with ``CLP_FAST_DEBUG=1``, a NaN/inf logit row.
        TypeError: unsupported or mismatched dtypes.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, H], got shape {tuple(hidden.shape)}")
    R, H = hidden.shape
    if head_weight.dim() != 3 or head_weight.shape[1:] != (H, H):
        raise ValueError(f"head_weight must be [k, {H}, {H}], got {tuple(head_weight.shape)}")
    k = head_weight.shape[0]
    if tuple(head_bias.shape) != (k, H):
        raise ValueError(f"head_bias must be [{k}, {H}], got {tuple(head_bias.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must be [V, {H}], got {tuple(lm_head_weight.shape)}")
    V = lm_head_weight.shape[0]
    if V >= 2**31 - 1:
        raise ValueError(f"vocabulary size {V} does not fit the kernel's int32 token ids")
    Vd = V if draft_vocab is None else draft_vocab
    if isinstance(Vd, bool) or not isinstance(Vd, int) or not 1 <= Vd <= V:
        raise ValueError(f"draft_vocab={draft_vocab!r} must be an int in [1, {V}]")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or not 1 <= top_m <= min(8, Vd):
        raise ValueError(f"top_m={top_m!r} must be an int in [1, {min(8, Vd)}]")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden dtype {hidden.dtype} is not one of {_FLOATS}")
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight dtype {lm_head_weight.dtype} differs from hidden dtype {hidden.dtype}")
    if head_weight.dtype not in _FLOATS or head_bias.dtype not in _FLOATS:
        raise TypeError(f"head weight/bias dtypes {head_weight.dtype}/{head_bias.dtype} are not floating")
    has_clp = clp_weight is not None and k > 0
    if has_clp:
        if clp_bias is None:
            raise ValueError("clp_weight given without clp_bias")
        if tuple(clp_weight.shape) != (k, H + k) or tuple(clp_bias.shape) != (k,):
            raise ValueError(
                f"clp_weight/clp_bias must be [{k}, {H + k}]/[{k}], got {tuple(clp_weight.shape)}/"
                f"{tuple(clp_bias.shape)}"
            )
    tensors = [hidden, head_weight, head_bias, lm_head_weight] + ([clp_weight, clp_bias] if has_clp else [])
    for t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"all tensors must be on {hidden.device}, found one on {t.device}")

    # Triton 3.9's interpreter mis-evaluates tl.dot on bf16 operands (garbage of order 1e10); upcasting to
    # fp32 first gives the same numbers a bf16 x bf16 -> fp32 MMA gives, since bf16 products are exact in fp32.
    interpret = hidden.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "") == "1"
    done, launches = _launches(hidden, head_weight, head_bias, lm_head_weight, clp_weight if has_clp else None,
                               clp_bias, threshold, Vd, top_m, props_of(hidden.device), interpret)  # fmt: skip
    for kernel, grid, args, meta in launches:
        kernel[grid](*args, **meta)

    if os.environ.get("CLP_FAST_DEBUG", "") == "1":
        conf = done[1]
        bad = (~torch.isfinite(conf)).nonzero()
        if bad.numel():
            r, j = bad[0].tolist()
            raise ValueError(
                f"fused_heads: logit row (row {r}, head {j}) holds NaN or inf (conf={conf[r, j].item()}); "
                f"{bad.shape[0]} such rows in all"
            )
    return done


def _launches(hidden, head_weight, head_bias, lm_head_weight, clp_weight, clp_bias, threshold, Vd, top_m,
              props: DeviceProps, interpret: bool) -> tuple[tuple[torch.Tensor, ...], list]:
    """The outputs of one :func:`fused_heads` call and its launches, in order, as ``(kernel, grid, args, meta)``.

    Arguments as :func:`fused_heads` (already checked; ``clp_weight`` None means no CLP). Allocates only: on
    ``device="meta"`` tensors it is what ``tests/test_kernels_compile.py`` compiles for a named GPU, so the
    ahead-of-time check sees the very arguments (and so the specialization) a launch would pass.
    """
    R, H = hidden.shape
    k, V = head_weight.shape[0], lm_head_weight.shape[0]
    dev = hidden.device
    K1 = k + 1
    has_clp = clp_weight is not None
    ids = torch.empty((R, K1), dtype=torch.int64, device=dev)
    conf = torch.empty((R, K1), dtype=torch.float32, device=dev)
    accept = torch.empty((R,), dtype=torch.int64, device=dev)
    top_ids = torch.empty((R, k, top_m), dtype=torch.int64, device=dev)
    top_p = torch.empty((R, k, top_m), dtype=torch.float32, device=dev)
    done = (ids, conf, accept) if top_m == 1 else (ids, conf, accept, top_ids, top_p)
    if R == 0:
        return done, []

    launches = []
    if k == 0:
        # The only logit row is the backbone's: read hidden in place, no copy.
        z = hidden
    else:
        z3 = torch.empty((R, K1, H), dtype=hidden.dtype, device=dev)
        block_r, block_n, block_c = 16, 64, 64
        if interpret:
            # Python overhead per Triton op dominates the interpreter: whole-H blocks make it one dot per head
            # (Qwen2.5-0.5B shape: 16 s -> well under 1 s on 2 CPU cores).
            block_n = block_c = min(max(16, triton.next_power_of_2(H)), 1024)
        launches.append((_head_hidden_kernel, (triton.cdiv(R, block_r), triton.cdiv(H, block_n), K1), (
            hidden, head_weight, head_bias, z3,
            R, H,
            hidden.stride(0), hidden.stride(1),
            head_weight.stride(0), head_weight.stride(1), head_weight.stride(2),
            head_bias.stride(0), head_bias.stride(1),
            z3.stride(0), z3.stride(1), z3.stride(2),
        ), dict(
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_c,
            FP32_DOT=hidden.dtype == torch.float32 or head_weight.dtype != hidden.dtype or interpret,
        )))  # fmt: skip
        z = z3.view(R * K1, H)

    n_rows = R * K1
    cfg = _config(props, n_rows, V, H, hidden.dtype)
    S = cfg["n_splits"]
    pmax = torch.empty((n_rows, S), dtype=torch.float32, device=dev)
    parg = torch.empty((n_rows, S), dtype=torch.int32, device=dev)
    psum = torch.empty((n_rows, S), dtype=torch.float32, device=dev)
    # top_m > 1 (and k > 0): each split's top_m (logit, index) per row, [rows, S, top_m].
    m_eff = top_m if k else 1
    ptopv = torch.empty((n_rows, S, m_eff) if m_eff > 1 else (1, 1, 1), dtype=torch.float32, device=dev)
    ptopi = torch.empty(ptopv.shape, dtype=torch.int32, device=dev)
    launches.append((_fused_heads_kernel, (triton.cdiv(n_rows, cfg["BLOCK_M"]), S), (
        z, lm_head_weight, pmax, parg, psum, ptopv, ptopi,
        n_rows, V, Vd, K1, H, cfg["tiles_per_split"],
        z.stride(0), z.stride(1),
        lm_head_weight.stride(0), lm_head_weight.stride(1),
        pmax.stride(0), ptopv.stride(0), ptopv.stride(1),
    ), dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
        FP32_DOT=hidden.dtype == torch.float32 or interpret,
        TOP_M=m_eff, BLOCK_T=max(2, triton.next_power_of_2(m_eff)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )))  # fmt: skip

    # Any tensor when HAS_CLP is False (never read): pmax, so that the no-CLP merge is one binary for every dtype.
    h, cw, cb = (hidden, clp_weight, clp_bias) if has_clp else (pmax, pmax, pmax)
    launches.append((_merge_clp_kernel, (R,), (
        pmax, parg, psum, ptopv, ptopi, h, cw, cb, ids, conf, accept, top_ids, top_p,
        K1, S, H, float(threshold),
        pmax.stride(0), ptopv.stride(0), top_ids.stride(0), top_ids.stride(1),
        h.stride(0), h.stride(1),
        cw.stride(0), cw.stride(1), cb.stride(0),
        ids.stride(0), ids.stride(1), conf.stride(0), conf.stride(1),
    ), dict(
        BLOCK_J=max(2, triton.next_power_of_2(K1)),
        # Chunks of the merge loops: one binary for every split count, and bounded registers. 8 warps: at 4, ptxas
        # spilled 4 bytes at 128 registers (8 rows x 256 top-m candidates, sm_90); at 8, no unit spills.
        BLOCK_S=64,
        BLOCK_H=min(triton.next_power_of_2(H), 1024),
        HAS_CLP=has_clp,
        TOP_M=m_eff, BLOCK_T=max(2, triton.next_power_of_2(m_eff)),
        BLOCK_C=256 if m_eff > 1 else 2,
        num_warps=8,
    )))  # fmt: skip
    return done, launches
