"""The memory-bandwidth bound of a decode step: the weight bytes one step streams, and what this machine can stream.

Imports torch only, so that ``vllm_peer.py`` (which runs in ``.venv-vllm``, without clp_fast) can use it too.
"""

from __future__ import annotations

import time

import torch


def weight_bytes_per_token(model: torch.nn.Module) -> dict:
    """Bytes of weights one B=1 greedy decode step reads: every ``nn.Linear`` (weight + bias), LM head included.

    A tied LM head is counted once, as the ``[V, H]`` matmul it is at every step (the embedding lookup reads
    one row of it, ~KB). Not counted: norms and the embedding lookup (< 0.1 % of a 0.5B model), the KV cache
    (grows with the context: ~12 KB per position for Qwen2.5-0.5B in bf16, ~8 MB at 640 positions, < 1 %),
    and the MTP heads of the speculative rows (their weights are extra reads that only those rows pay).

    Returns ``{"bytes": total, "linear_modules": n, "lm_head_bytes": b}``.
    """
    total = lm = n = 0
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            b = mod.weight.numel() * mod.weight.element_size()
            if mod.bias is not None:
                b += mod.bias.numel() * mod.bias.element_size()
            total += b
            n += 1
            if mod is out_emb:
                lm = b
    return {"bytes": total, "linear_modules": n, "lm_head_bytes": lm}


def copy_bandwidth(gib: float = 1.0, reps: int = 5) -> dict:
    """This machine's streaming bandwidth at the current torch thread count, in GB/s (1e9 bytes).

    ``copy``: ``dst.copy_(src)`` of ``gib`` GiB of fp32, counted as read + write (2 x the size): the limit the
    bench's "% of bandwidth limit" column divides by. ``sum``: ``src.sum()``, read only, for reference
    (measured on the AMD EPYC 2-core VM: copy 45, sum 49.5 GB/s with 2 threads). Median of ``reps`` after one
    untimed pass, which also faults the pages in. Holds 2 x ``gib`` GiB while it runs.
    """
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = n * 4

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    t_copy = median_s(lambda: dst.copy_(src))
    t_sum = median_s(lambda: src.sum())
    return {"copy_gb_s": 2 * nbytes / t_copy / 1e9, "sum_gb_s": nbytes / t_sum / 1e9, "gib": gib, "reps": reps,
            "threads": torch.get_num_threads()}


def bandwidth_pct(bytes_per_token: float, tokens_per_s: float, limit_gb_s: float) -> float:
    """Weight bytes streamed per second as a % of ``limit_gb_s``.

    For a speculative row ``tokens_per_s`` counts accepted tokens, so this is the bandwidth a greedy decoder
    would need to match it: above 100 % means faster than any one-token-per-step decoder can be here.
    """
    return 100.0 * bytes_per_token * tokens_per_s / (limit_gb_s * 1e9)
