"""The Triton programs of the fused MTP-heads pass (launched by :mod:`clp_fast.kernels.fused_heads`, whose
docstring describes the three launches, the rounding and the NaN policy).

- ``_head_hidden_kernel``: ``z[r, j] = h_r + SiLU(W_j h_r + b_j)`` (row ``j = 0`` is ``h_r``);
- ``_fused_heads_kernel``: every row against one read of the LM head, online max / argmax / sum-exp per
  vocabulary split (and the top-m candidates);
- ``_merge_clp_kernel``: the splits merged per backbone row, ids, confidences, the CLP's accept length.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_head_hidden_kernel", "_fused_heads_kernel", "_merge_clp_kernel"]

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
