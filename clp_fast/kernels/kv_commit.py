"""Commit each row's accepted K/V span into a static cache, all layers, one launch.

Twin of :func:`clp_fast.reference.commit_kv_span_` (same signature, same effect). The reference loops over
rows in Python and issues two copies per row (2 * B launches); this kernel writes every
(layer, row, kv-head, position) in a single launch, reading each row's offset and span length on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["commit_kv_span_"]


@triton.jit
def _kv_commit_kernel(
    ck_ptr,
    cv_ptr,
    nk_ptr,
    nv_ptr,
    off_ptr,
    len_ptr,
    B,
    KVH,
    D,
    stride_ckl, stride_ckb, stride_ckh, stride_ckt, stride_ckd,
    stride_cvl, stride_cvb, stride_cvh, stride_cvt, stride_cvd,
    stride_nkl, stride_nkb, stride_nkh, stride_nkt, stride_nkd,
    stride_nvl, stride_nvb, stride_nvh, stride_nvt, stride_nvd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Grid: (L * B * KVH, position blocks). One (layer, row, kv-head) per program along axis 0.
    pid = tl.program_id(0)
    h = pid % KVH
    b = (pid // KVH) % B
    layer = pid // (KVH * B)
    n = tl.load(len_ptr + b).to(tl.int64)
    off = tl.load(off_ptr + b).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # Positions past the row's span are masked: a zero-length row loads and stores nothing.
    mask = (offs_t < n)[:, None] & (offs_d < D)[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    d64 = offs_d.to(tl.int64)[None, :]
    # int64 throughout: a cache of 28 layers x 64 rows x 4 heads x 4096 x 128 has 3.8e9 elements.
    l64, b64, h64 = layer.to(tl.int64), b.to(tl.int64), h.to(tl.int64)
    src_k = nk_ptr + l64 * stride_nkl + b64 * stride_nkb + h64 * stride_nkh + t64 * stride_nkt + d64 * stride_nkd
    src_v = nv_ptr + l64 * stride_nvl + b64 * stride_nvb + h64 * stride_nvh + t64 * stride_nvt + d64 * stride_nvd
    dst_k = ck_ptr + l64 * stride_ckl + b64 * stride_ckb + h64 * stride_ckh + (off + t64) * stride_ckt
    dst_v = cv_ptr + l64 * stride_cvl + b64 * stride_cvb + h64 * stride_cvh + (off + t64) * stride_cvt
    tl.store(dst_k + d64 * stride_ckd, tl.load(src_k, mask=mask), mask=mask)
    tl.store(dst_v + d64 * stride_cvd, tl.load(src_v, mask=mask), mask=mask)


def commit_kv_span_(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    row_offsets: torch.Tensor,
    span_lengths: torch.Tensor,
) -> None:
    """Write each row's accepted K/V span into the static cache at that row's own offset, in place.

    Mutates ``cache_k`` and ``cache_v`` only: ``cache[l, b, :, off_b : off_b + n_b] = new[l, b, :, :n_b]``
    for every layer ``l`` and row ``b``; rows with ``n_b == 0`` are untouched. Any strides.

    Args:
        cache_k, cache_v: ``[L, B, KVH, max_len, D]`` (mutated).
        new_k, new_v: ``[L, B, KVH, T, D]``.
        row_offsets: ``[B]`` int, each row's span start.
        span_lengths: ``[B]`` int in ``[0, T]``.

    Raises:
        ValueError: mismatched shapes or devices, or a span that is negative, exceeds ``T`` or passes
            ``max_len`` (checked before launch, so a refused call writes nothing).
        TypeError: non-integer offsets or lengths.
    """
    if cache_k.dim() != 5 or cache_k.shape != cache_v.shape:
        raise ValueError(f"cache_k/cache_v must be equal [L, B, KVH, max_len, D], got {tuple(cache_k.shape)}/"
                         f"{tuple(cache_v.shape)}")  # fmt: skip
    L, B, KVH, max_len, D = cache_k.shape
    if new_k.dim() != 5 or new_k.shape != new_v.shape or new_k.shape[:3] != (L, B, KVH) or new_k.shape[4] != D:
        raise ValueError(f"new_k/new_v must be equal [{L}, {B}, {KVH}, T, {D}], got {tuple(new_k.shape)}/"
                         f"{tuple(new_v.shape)}")  # fmt: skip
    T = new_k.shape[3]
    if tuple(row_offsets.shape) != (B,) or tuple(span_lengths.shape) != (B,):
        raise ValueError(f"row_offsets/span_lengths must be [{B}], got {tuple(row_offsets.shape)}/"
                         f"{tuple(span_lengths.shape)}")  # fmt: skip
    for name, t in (("row_offsets", row_offsets), ("span_lengths", span_lengths)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    for t in (cache_v, new_k, new_v, row_offsets, span_lengths):
        if t.device != cache_k.device:
            raise ValueError(f"all tensors must be on {cache_k.device}, found one on {t.device}")

    # Host-side bounds check: one device->host copy of 2 * B ints (a sync, ~10-20 us on a GPU). The
    # decode loop already syncs each step to read the accepted ids, so this adds a copy, not a new bubble;
    # an out-of-bounds store from the kernel would corrupt a neighbouring row's cache silently.
    offs = row_offsets.tolist()
    lens = span_lengths.tolist()
    for b, (off, n) in enumerate(zip(offs, lens)):
        if n < 0 or n > T:
            raise ValueError(f"span_lengths[{b}]={n} is outside [0, {T}]")
        if off < 0 or off + n > max_len:
            raise ValueError(f"row {b}: span [{off}, {off + n}) passes the cache's max_len={max_len}")
    max_n = max(lens, default=0)
    if max_n == 0:
        return

    grid, args, meta = _launch(cache_k, cache_v, new_k, new_v, row_offsets, span_lengths, max_n)
    _kv_commit_kernel[grid](*args, **meta)


def _launch(cache_k, cache_v, new_k, new_v, row_offsets, span_lengths, max_n: int) -> tuple[tuple, tuple, dict]:
    """Grid, arguments and meta-parameters of the commit launch for spans of at most ``max_n`` positions.

    Arguments as :func:`commit_kv_span_` (already checked). No device property enters: each program copies
    one (layer, row, kv-head)'s span block, with nothing to size against SMs or shared memory (it uses none).
    Works on ``device="meta"`` tensors: ``tests/test_kernels_compile.py`` compiles exactly this launch.
    """
    L, B, KVH, _, D = cache_k.shape
    block_t = min(triton.next_power_of_2(max_n), 16)
    grid = (L * B * KVH, triton.cdiv(max_n, block_t))
    args = (cache_k, cache_v, new_k, new_v, row_offsets, span_lengths,
            B, KVH, D,
            *cache_k.stride(), *cache_v.stride(), *new_k.stride(), *new_v.stride())  # fmt: skip
    return grid, args, dict(BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D))
