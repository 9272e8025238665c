"""Whether a batch's static KV cache fits, decided before it is allocated.

:func:`clp_fast.generate` allocates the whole cache ``[L, B, KVH, max_len, D]`` (K and V) up front. A batch
that does not fit would otherwise be found out by the OS's OOM killer (no message, no traceback) or by a
CUDA out-of-memory error half-way through a prefill; :func:`check_cache_fits` refuses it first, naming
``B``, the max length and the bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CacheTooLargeError", "available_bytes", "check_cache_fits", "static_cache_bytes"]


class CacheTooLargeError(MemoryError, ValueError):
    """The static KV cache would not fit (a ``ValueError`` too, so callers that catch bad input catch it)."""


def static_cache_bytes(num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes of :class:`clp_fast.models.native.StaticKVCache`'s K and V:
    ``L x B x KVH x max_len x D x 2 x itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * batch * kv_heads * max_len * head_dim * 2 * itemsize


def _cgroup_headroom() -> int | None:
    """Bytes this process's cgroup (v2) may still take, or None without a limit (a container's limit is often
    far below the host memory that /proc/meminfo reports)."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation on ``device`` can take now: free device memory on CUDA; on the CPU,
    ``MemAvailable`` (capped by the cgroup's headroom). None where it cannot be read (no check is made)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        free = None
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        free = headroom if free is None else min(free, headroom)
    return free


def check_cache_fits(bb, batch: int, max_len: int, max_cache_bytes: int | None = None) -> int:
    """Raise :class:`CacheTooLargeError` unless the static cache of ``batch`` rows of ``max_len`` slots for
    backbone ``bb`` (a :class:`clp_fast.models.native.NativeBackbone`) fits in the memory available on its device and
    in ``max_cache_bytes`` (None: no user limit). Returns the cache's bytes."""
    if max_cache_bytes is not None and (isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int)
                                        or max_cache_bytes <= 0):
        raise ValueError(f"max_cache_bytes={max_cache_bytes!r} must be a positive int or None")
    need = static_cache_bytes(len(bb.layers), batch, bb.kv_heads, max_len, bb.head_dim, bb.dtype)
    limits = [(max_cache_bytes, "max_cache_bytes")]
    limits.append((available_bytes(bb.device), f"the memory available on {bb.device}"))
    for limit, what in limits:
        if limit is not None and need > limit:
            raise CacheTooLargeError(
                f"the static KV cache for B={batch} rows of max length {max_len} needs {need:,} bytes "
                f"({need / 2**30:.2f} GiB = {len(bb.layers)} layers x {batch} x {bb.kv_heads} KV heads x {max_len} x "
                f"head dim {bb.head_dim} x 2 x {bb.dtype}), more than {what} ({limit:,} bytes); use a smaller batch, "
                f"shorter prompts or fewer max_new_tokens")
    return need
