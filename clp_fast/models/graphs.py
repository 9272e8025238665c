"""A fixed-shape decode step: fed-token buckets, no host syncs, captured in a CUDA graph on a GPU.

An eager 0.5B step on a GPU launches hundreds of small kernels for ~0.2 ms of weight traffic, so launch
overhead, not bandwidth, sets its speed; gpt-fast and vLLM capture the step in a CUDA graph. A graph replays
fixed shapes over fixed buffers, so the step is made static:

- the fed-token count ``T`` (1 for greedy, up to the tree size for lossless) is padded up to a bucket
  (:data:`BUCKETS`); padded tokens are invisible to real ones (``new_len`` masks them as keys) and their
  outputs are discarded, so a bucket changes no real output;
- attention reads the whole static cache (``S = max_len``, masked past each row's length) instead of
  ``max(lengths)``, and every token is projected (no packing of the real ones): no ``.item()``, no
  ``nonzero``, no shape that depends on a value on the device.

One graph per (cache, bucket), captured on first use and replayed after. ``CLP_FAST_STEP`` picks the step:
``auto`` (graphs on CUDA, eager elsewhere), ``eager``, ``static`` (the bucketed static step without a graph:
how the CPU suite tests the bucket logic) or ``graph`` (CUDA only).
"""

from __future__ import annotations

import os

import torch

__all__ = ["BUCKETS", "bucket_for", "pad_to_bucket", "step_kind", "GraphedStep"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_KINDS = ("auto", "eager", "static", "graph")


def step_kind(device: torch.device) -> str:
    """``"eager"``, ``"static"`` or ``"graph"`` for a step on ``device``, from ``CLP_FAST_STEP`` (default auto)."""
    kind = os.environ.get("CLP_FAST_STEP", "auto").strip().lower() or "auto"
    if kind not in _KINDS:
        raise ValueError(f"CLP_FAST_STEP={kind!r} is not one of {_KINDS}")
    is_cuda = torch.device(device).type == "cuda"
    if kind == "graph" and not is_cuda:
        raise ValueError(f"CLP_FAST_STEP='graph' needs a CUDA device, the model is on {device}")
    if kind == "auto":
        return "graph" if is_cuda else "eager"
    return kind


def bucket_for(T: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket ``>= T`` (``T >= 1``); ``ValueError`` naming ``T`` past the largest."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be an int >= 1")
    for b in buckets:
        if b >= T:
            return b
    raise ValueError(f"T={T} fed tokens exceed the largest step bucket {buckets[-1]} (lower max_step_tokens)")


def pad_to_bucket(tokens: torch.Tensor, depth: torch.Tensor | None, anc: torch.Tensor | None, Tb: int):
    """A step's inputs padded from ``T`` to ``Tb >= T`` columns, as a tree (a chain becomes its tree).

    Args:
        tokens: ``[B, T]`` int64.
        depth, anc: ``[B, T]`` int64 and ``[B, T, T]`` bool, or both None (a chain: depth ``i``, ancestors ``<= i``).

    Returns:
        tokens ``[B, Tb]`` (padding 0), depth ``[B, Tb]`` (padding 0), anc ``[B, Tb, Tb]`` (padding False: a padded
        token is nobody's ancestor; it still sees itself through the mask's diagonal).
    """
    B, T = tokens.shape
    if Tb < T:
        raise ValueError(f"bucket Tb={Tb} is smaller than the step's T={T}")
    dev = tokens.device
    if depth is None:
        i = torch.arange(T, device=dev)
        depth, anc = i[None].expand(B, T), (i[None, :] <= i[:, None])[None].expand(B, T, T)
    out_tokens = tokens.new_zeros((B, Tb))
    out_depth = depth.new_zeros((B, Tb))
    out_anc = torch.zeros((B, Tb, Tb), dtype=torch.bool, device=dev)
    out_tokens[:, :T], out_depth[:, :T], out_anc[:, :T, :T] = tokens, depth, anc
    return out_tokens, out_depth, out_anc


class GraphedStep:
    """CUDA graphs of ``bb.forward(..., static=True)`` over one cache, one per fed-token bucket.

    Inputs are copied into the graph's own buffers, the graph replays, and the outputs (views of the graph's
    buffers, valid until the next call) are cut back to ``T`` columns.
    """

    def __init__(self, bb, cache):
        self.bb, self.cache = bb, cache
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    def __call__(self, tokens, new_len, depth=None, anc=None):
        T = tokens.shape[1]
        Tb = bucket_for(T)
        tokens, depth, anc = pad_to_bucket(tokens, depth, anc, Tb)
        if Tb not in self.graphs:
            self.graphs[Tb] = self._capture(tokens, new_len, depth, anc)
        graph, inputs, outputs = self.graphs[Tb]
        for buf, x in zip(inputs, (tokens, new_len, depth, anc)):
            buf.copy_(x)
        graph.replay()
        hidden, new_k, new_v = outputs
        return hidden[:, :T], new_k[..., :T, :], new_v[..., :T, :]

    def _capture(self, tokens, new_len, depth, anc):
        inputs = tuple(x.clone() for x in (tokens, new_len, depth, anc))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (allocator, lazy inits), as torch's docs do
            for _ in range(2):
                self.bb.forward(inputs[0], self.cache, inputs[1], inputs[2], inputs[3], static=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.bb.forward(inputs[0], self.cache, inputs[1], inputs[2], inputs[3], static=True)
        self.pool = graph.pool()  # later buckets share the memory pool
        return graph, inputs, outputs
