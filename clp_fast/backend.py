"""The one place that chooses between the Triton kernels and the PyTorch reference.

Triton when the tensors are on CUDA, the reference elsewhere. ``CLP_FAST_BACKEND=triton|torch``
overrides; with ``TRITON_INTERPRET=1`` the Triton path also runs on CPU (that is how CI tests it).
"""

from __future__ import annotations

import os

import torch

from clp_fast import reference

_VALID = ("triton", "torch")


def backend_for(device: torch.device) -> str:
    """Name of the backend used for tensors on ``device``: ``"triton"`` or ``"torch"``."""
    forced = os.environ.get("CLP_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in _VALID:
            raise ValueError(f"CLP_FAST_BACKEND={forced!r} is not one of {_VALID}")
        return forced
    return "triton" if torch.device(device).type == "cuda" else "torch"


def fused_heads(hidden, head_weight, head_bias, lm_head_weight, clp_weight=None, clp_bias=None, threshold=0.5,
                draft_vocab=None, top_m=1):
    """Dispatch of :func:`clp_fast.reference.fused_heads` (same signature and outputs)."""
    if backend_for(hidden.device) == "triton":
        from clp_fast.kernels.fused_heads import fused_heads as impl
    else:
        impl = reference.fused_heads
    return impl(hidden, head_weight, head_bias, lm_head_weight, clp_weight, clp_bias, threshold, draft_vocab, top_m)


def commit_kv_span_(cache_k, cache_v, new_k, new_v, row_offsets, span_lengths) -> None:
    """Dispatch of :func:`clp_fast.reference.commit_kv_span_`; mutates ``cache_k`` and ``cache_v``."""
    if backend_for(cache_k.device) == "triton":
        from clp_fast.kernels.kv_commit import commit_kv_span_ as impl
    else:
        impl = reference.commit_kv_span_
    impl(cache_k, cache_v, new_k, new_v, row_offsets, span_lengths)
