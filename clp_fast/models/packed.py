"""The backbone's linears prepacked once for oneDNN: the CPU step at the memory-bandwidth limit.

A bf16 ``F.linear`` at M = 1 on these CPUs streams the LM head at ~30 GB/s; the same product through
oneDNN with the weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``
then ``_linear_pointwise``, what inductor's freezing pass emits) streams it at ~47 GB/s, and the small
MLP/attention projections run 1.5-2.2x faster (FINDINGS, "Third look"). Nothing is compiled, so no
prompt length or fed-token count ever recompiles.

Numerics: in bf16 the packed product equals ``F.linear`` bit for bit at the row counts decoding uses
(measured on Intel Xeon at M <= 32, on AMD EPYC at M = 1; at M >= 40 it may differ in the last bit, so
larger products — prefill, wide batched verification — take the plain path, :data:`MAX_PACKED_ROWS`), and a
fused q|k|v or gate|up product equals its parts packed separately. fp32 packed products change the summation
order (~1e-6), so fp32 keeps the plain path: the fp32 exactness claims never depend on packing.

Memory: each packed weight is a copy (the user's model keeps its own weights, untouched, for its own
forward and ``unpatch``): ~0.78 GB for Qwen2.5-0.5B in bf16 (all but the down projections).
``CLP_FAST_PACK=0`` pays none (the plain
path), and :func:`release` frees a model's copy.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PackedWeight", "StepWeights", "DrafterWeights", "linear", "rows", "step_weights", "drafter_weights",
           "release", "packing_enabled", "packs"]

_PACKED_DTYPES = (torch.bfloat16,)
# Products of more rows (prefill, wide batched verification) take the plain path: compute-bound there, so
# packing buys little, and the packed product was measured bit-identical to F.linear up to 32 rows, not at 40+.
MAX_PACKED_ROWS = 32


class PackedWeight:
    """A ``[N, K]`` weight (and optional bias ``[N]``) reordered once for oneDNN.

    Stands in for the plain tensor wherever the engine multiplies by it (:func:`linear`, :func:`rows`);
    it has the tensor's ``shape``, ``dtype`` and ``device``. Inputs of more than :data:`MAX_PACKED_ROWS` rows
    go to ``plain`` (the model's own modules: no second plain copy), or to ``F.linear`` on the kept plain weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, keep_plain: bool = False,
                 plain: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
        w = weight.detach()
        self.shape, self.dtype, self.device = w.shape, w.dtype, w.device
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # M = 1 hint: decoding's shape
        self.bias = None if bias is None else bias.detach()
        # rows() packs W[:n] from the plain weight; kept only where asked (the LM head: the model's own tensor).
        self._plain = w if keep_plain else None
        self._plain_fn = plain if plain is not None else (lambda x: F.linear(x, w, self.bias)) if keep_plain else None
        self._rows: dict[int, PackedWeight] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]``, ``x W^T + b``."""
        x2 = x.reshape(-1, self.shape[1])
        if x2.shape[0] > MAX_PACKED_ROWS and self._plain_fn is not None:
            return self._plain_fn(x)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.shape[0])

    def rows(self, n: int) -> PackedWeight:
        """The first ``n`` rows ``W[:n]``, packed on first use and kept (a draft vocabulary's LM head)."""
        if n == self.shape[0]:
            return self
        if n not in self._rows:
            if self._plain is None or not 1 <= n <= self.shape[0]:
                raise ValueError(f"rows(n={n!r}) needs 1 <= n <= {self.shape[0]} and a weight packed with keep_plain")
            self._rows[n] = PackedWeight(self._plain[:n], keep_plain=True)
        return self._rows[n]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize + sum(w.nbytes for w in self._rows.values())


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """``F.linear(x, weight)`` for a plain or a packed weight."""
    return weight(x) if isinstance(weight, PackedWeight) else F.linear(x, weight)


def rows(weight: torch.Tensor | PackedWeight, n: int) -> torch.Tensor | PackedWeight:
    """``weight[:n]`` for a plain or a packed weight."""
    return weight.rows(n) if isinstance(weight, PackedWeight) else weight[:n]


@dataclass
class LayerWeights:
    """One decoder layer's packed products: fused ``q|k|v`` and ``gate|up`` (one oneDNN call each) and ``o``.

    The down projection is not packed (the model's own ``down_proj`` runs): packed, the K = 4,864 down projection
    of Qwen2.5-0.5B gave other bits than ``F.linear`` on real activations at M = 1 (a bench prose prompt's greedy
    output diverged at token 24; random inputs never showed it) and was only ~5 % faster (10.7 vs 11.2 ms per
    token for all 24 layers)."""

    qkv: PackedWeight
    o: PackedWeight
    gate_up: PackedWeight


@dataclass
class StepWeights:
    """Every product of a decode step, packed: the layers' and the LM head's."""

    layers: list[LayerWeights]
    lm_head: PackedWeight
    fingerprint: tuple

    @property
    def nbytes(self) -> int:
        per_layer = sum(w.nbytes for lw in self.layers for w in (lw.qkv, lw.o, lw.gate_up))
        return per_layer + self.lm_head.nbytes


def packing_enabled(model) -> bool:
    """Pack when the weights are bf16 on a CPU with oneDNN, unless ``CLP_FAST_PACK=0``."""
    return packs(model.get_output_embeddings().weight)


def packs(w: torch.Tensor) -> bool:
    """Whether a weight like ``w`` is packed here: bf16 on a CPU whose oneDNN packs it, ``CLP_FAST_PACK`` not 0."""
    flag = os.environ.get("CLP_FAST_PACK", "1").strip()
    if flag not in ("0", "1"):
        raise ValueError(f"CLP_FAST_PACK={flag!r} must be 0 or 1")
    return (flag == "1" and w.device.type == "cpu" and w.dtype in _PACKED_DTYPES
            and torch.backends.mkldnn.is_available() and _cpu_packs(w.dtype))


@functools.cache
def _cpu_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs ``dtype`` weights on this CPU: its bf16 path needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT, which an AVX2-only CPU (seen: an AMD EPYC here) lacks; there the plain path runs."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def _fingerprint(model) -> tuple:
    """Identity and version of every parameter: any in-place update, reload or cast changes it."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def _cat_bias(*mods) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                      for b, m in zip(biases, mods)])


def _pack_layer(layer) -> LayerWeights:
    a, m = layer.self_attn, layer.mlp
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
    gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
    return LayerWeights(
        PackedWeight(qkv, _cat_bias(a.q_proj, a.k_proj, a.v_proj),
                     plain=lambda h: torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], dim=-1)),
        PackedWeight(a.o_proj.weight, a.o_proj.bias, plain=a.o_proj),
        PackedWeight(gate_up, _cat_bias(m.gate_proj, m.up_proj),
                     plain=lambda x: torch.cat([m.gate_proj(x), m.up_proj(x)], dim=-1)))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def step_weights(model) -> StepWeights | None:
    """The model's packed step weights, packed on first use and kept until the model's weights change
    (checked on every call: a cast, reload or in-place update repacks); None where packing is off."""
    if not packing_enabled(model):
        return None
    fp = _fingerprint(model)
    got = _CACHE.get(model)
    if got is None or got.fingerprint != fp:
        layers = [_pack_layer(layer) for layer in model.model.layers]
        lm_head = PackedWeight(model.get_output_embeddings().weight, keep_plain=True)
        _CACHE[model] = got = StepWeights(layers, lm_head, fp)
    return got


@dataclass
class DrafterWeights:
    """An EAGLE-style drafter's products, packed: its ``fc`` and its one decoder layer's (as a backbone layer's)."""

    fc: PackedWeight
    layer: LayerWeights
    fingerprint: tuple


@torch.no_grad()
def drafter_weights(drafter) -> DrafterWeights | None:
    """``drafter``'s packed weights (:class:`clp_fast.drafts.eagle_model.EagleDrafter`), packed on first use and
    kept until its weights change; None where packing is off. Drafting only: the packed products have no
    gradient, so training (grad enabled) runs the plain modules."""
    if not packs(drafter.fc.weight):
        return None
    fp = _fingerprint(drafter)
    got = _CACHE.get(drafter)
    if got is None or got.fingerprint != fp:
        _CACHE[drafter] = got = DrafterWeights(PackedWeight(drafter.fc.weight, plain=drafter.fc),
                                               _pack_layer(drafter.layer), fp)
    return got


def release(model) -> None:
    """Free the packed copy of ``model``'s weights (the next decode packs again, if packing is on)."""
    _CACHE.pop(model, None)
