"""Fused MTP heads: head residual blocks, one read of the LM head for all rows, argmax, confidence, CLP.

Twin of :func:`clp_fast.reference.fused_heads` (same signature, same outputs). Three launches, of the programs
in :mod:`clp_fast.kernels.heads_programs`:

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

from clp_fast.kernels.device import DeviceProps, props_of
from clp_fast.kernels.heads_programs import _fused_heads_kernel, _head_hidden_kernel, _merge_clp_kernel

__all__ = ["fused_heads"]


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
