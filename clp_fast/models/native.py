"""A compact native forward of Qwen2 / Llama decoder stacks over a static, per-row KV cache.

It calls the loaded transformers model's own modules (embedding, norms, projections, MLPs,
rotary embedding): no weights are copied and no modeling file is forked. Only attention is ours,
because it must read a static cache whose rows have different lengths and see a step's new
tokens without writing them to the cache: the cache only ever holds committed tokens
(:func:`clp_fast.backend.commit_kv_span_`), so a rejected draft is never visible to attention.

Why native rather than transformers' forward with a custom ``Cache``: the cache API changed
shape across transformers 4.x → 5.x (``DynamicLayer``, ``cache_position`` handling, mask
builders), and a per-row ragged commit needs writes it does not model. Calling the modules
directly depends only on attribute names that are stable across 4.51 … 5.24
(``model.model.layers[i].self_attn.q_proj`` …); the tests check our logits against
transformers' own.

Cache layout: slot ``s`` of row ``b`` holds the token at position ``s`` (prompts are stored
unpadded from slot 0), so RoPE positions equal cache slots and equal transformers' left-padded
``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clp_fast.models import graphs, packed

__all__ = ["StaticKVCache", "NativeBackbone"]

_SUPPORTED = ("qwen2", "llama")


@dataclass
class StaticKVCache:
    """Static KV cache ``[L, B, KVH, max_len, D]`` plus each row's committed length ``[B]``."""

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor  # [B] int64, on the cache's device

    @classmethod
    def allocate(cls, num_layers, batch, kv_heads, max_len, head_dim, dtype, device) -> StaticKVCache:
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NativeBackbone:
    """Forward of a loaded ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` over a :class:`StaticKVCache`.

    Args:
        model: the loaded transformers causal LM (its parameters are used in place).
    """

    def __init__(self, model):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in _SUPPORTED:
            raise ValueError(f"model_type={getattr(cfg, 'model_type', None)!r} is not supported; "
                             f"supported: {', '.join(_SUPPORTED)}")
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) and "sliding_attention" in layer_types:
            raise ValueError("sliding-window attention is not supported (use_sliding_window=True)")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        attn = self.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        plain = model.get_output_embeddings().weight  # [V, H]
        self.device, self.dtype = plain.device, plain.dtype
        # Every product of the step prepacked for oneDNN (bf16 on CPU; packed once per model, see
        # clp_fast.models.packed), else None: the model's own modules.
        self.step = packed.step_weights(model)
        # [V, H] LM head, plain or packed: pass it to backend.fused_heads / reference.head_rows, which multiply
        # through clp_fast.models.packed.linear.
        self.lm_head_weight = plain if self.step is None else self.step.lm_head
        self.plain_lm_head = plain  # the model's own [V, H] tensor (training, F.linear), packed or not
        H = plain.shape[1]
        # k = 0 head weight / bias for fused_heads' backbone-only call (greedy mode), built once.
        self.no_heads = (plain.new_zeros((0, H, H)), plain.new_zeros((0, H)))
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._graphed: graphs.GraphedStep | None = None  # CUDA graphs of the step, for one cache at a time

    def allocate_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache.allocate(len(self.layers), batch, self.kv_heads, max_len, self.head_dim,
                                      self.dtype, self.device)

    def _attention_mask(self, cache_len: torch.Tensor, new_len: torch.Tensor, S: int, T: int,
                        anc: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``[B, 1, T, S + T]``: query ``i`` of row ``b`` sees committed slots ``< cache_len[b]``
        and new keys ``i'`` with ``i' < new_len[b]`` that are ``i``'s ancestors or ``i`` itself in the draft
        tree ``anc [B, T, T]`` (None: a chain, ``i' <= i``), and always itself, so padded queries never
        produce NaN; their outputs are discarded."""
        dev = cache_len.device
        slots = torch.arange(S, device=dev)
        old = (slots[None, :] < cache_len[:, None])[:, None, :].expand(-1, T, -1)  # [B, T, S]
        i = torch.arange(T, device=dev)
        seen = (i[None, :] <= i[:, None])[None] if anc is None else anc  # [1 or B, T(q), T(k)]
        valid_new = (i[None, :] < new_len[:, None])[:, None, :]  # [B, 1, T(k)]
        new = (seen & valid_new) | torch.eye(T, dtype=torch.bool, device=dev)[None]
        return torch.cat([old, new], dim=-1)[:, None]

    def _qkv(self, li: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``h [N, H]`` -> q ``[N, NH, D]``, k and v ``[N, KVH, D]`` (one fused product when packed)."""
        N, D = h.shape[0], self.head_dim
        if self.step is None:
            attn = self.layers[li].self_attn
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = self.step.layers[li].qkv(h).split([self.num_heads * D, self.kv_heads * D, self.kv_heads * D], -1)
        return q.view(N, self.num_heads, D), k.view(N, self.kv_heads, D), v.view(N, self.kv_heads, D)

    def _o(self, li: int, o: torch.Tensor) -> torch.Tensor:
        """Attention output projection, ``[N, NH * D] -> [N, H]``."""
        return self.layers[li].self_attn.o_proj(o) if self.step is None else self.step.layers[li].o(o)

    def _mlp(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """``down(act(gate(x)) * up(x))``, ``[N, H] -> [N, H]`` (gate|up one fused product when packed)."""
        mlp = self.layers[li].mlp
        if self.step is None:
            return mlp(x)
        gate, up = self.step.layers[li].gate_up(x).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)  # down stays plain (see clp_fast.models.packed.LayerWeights)

    def decode_step(self, tokens: torch.Tensor, cache: StaticKVCache, new_len: torch.Tensor,
                    depth: torch.Tensor | None = None, anc: torch.Tensor | None = None):
        """:meth:`forward` for a decode step (after prefill), the way this device runs it fastest: eager on a
        CPU, a CUDA graph of the static step at a fed-token bucket on a GPU (:mod:`clp_fast.models.graphs`)."""
        kind = graphs.step_kind(self.device)
        if kind == "eager":
            return self.forward(tokens, cache, new_len, depth, anc)
        if kind == "static":
            T = tokens.shape[1]
            padded = graphs.pad_to_bucket(tokens, depth, anc, graphs.bucket_for(T))
            hidden, new_k, new_v = self.forward(padded[0], cache, new_len, padded[1], padded[2], static=True)
            return hidden[:, :T], new_k[..., :T, :], new_v[..., :T, :]
        if self._graphed is None or self._graphed.cache is not cache:
            self._graphed = graphs.GraphedStep(self, cache)
        return self._graphed(tokens, new_len, depth, anc)

    def forward(self, tokens: torch.Tensor, cache: StaticKVCache, new_len: torch.Tensor,
                depth: torch.Tensor | None = None, anc: torch.Tensor | None = None, static: bool = False):
        """Run the decoder over ``T`` new tokens per row, reading (never writing) the cache.

        Args:
            tokens: ``[B, T]`` int64; row ``b``'s first ``new_len[b]`` are real, the rest padding.
            cache: committed K/V and per-row lengths.
            new_len: ``[B]`` int64 in ``[0, T]``.
            depth, anc: a draft tree (both or neither): token ``i`` of row ``b`` sits at position
                ``cache.lengths[b] + depth[b, i]`` and attends to the new tokens ``j`` with
                ``anc[b, i, j]`` (``[B, T, T]`` bool, its ancestors and itself). None: a chain, token
                ``i`` at ``cache.lengths[b] + i``, attending to new tokens ``<= i``.
            static: no host syncs and no value-dependent shapes (a CUDA graph can capture it): attend over the whole
                cache (``max_len`` slots, masked past each row's length) and project every token, padding included.

        Returns:
            hidden ``[B, T, H]`` final (post-norm) hidden states (zeros at padding), and the step's keys/values
            ``new_k, new_v`` ``[L, B, KVH, T, D]`` (after RoPE), ready for
            :func:`clp_fast.backend.commit_kv_span_`.
        """
        B, T = tokens.shape
        S = cache.max_len if static else int(cache.lengths.max())
        offset = torch.arange(T, device=tokens.device)[None] if depth is None else depth
        pos = cache.lengths[:, None] + offset  # [B, T]
        x = self.inner.embed_tokens(tokens)  # [B, T, H]
        cos, sin = self.inner.rotary_emb(x, pos)  # [B, T, D] each
        mask = self._attention_mask(cache.lengths, new_len, S, T, anc)
        # Projections and MLPs (nearly all of the FLOPs) run over the real tokens only, packed [N, H]: a ragged
        # step (rows feeding different numbers of tokens, finished rows feeding none) pays for what it feeds,
        # not for B x T. Only attention sees the padded [B, T] layout.
        real = (torch.arange(T, device=tokens.device)[None] < new_len[:, None]).flatten()  # [B * T]
        idx = None if static or bool(real.all()) else real.nonzero().squeeze(1)
        x, cos, sin = (t.flatten(0, 1) for t in (x, cos, sin))
        if idx is not None:
            x, cos, sin = x[idx], cos[idx], sin[idx]
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, D]

        def padded(t: torch.Tensor, heads: int) -> torch.Tensor:  # [N, heads, D] -> [B, heads, T, D]
            if idx is not None:
                t = t.new_zeros((B * T, heads, self.head_dim)).index_copy_(0, idx, t)
            return t.view(B, T, heads, self.head_dim).transpose(1, 2)

        L = len(self.layers)
        new_k = torch.empty((L, B, self.kv_heads, T, self.head_dim), dtype=x.dtype, device=x.device)
        new_v = torch.empty_like(new_k)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(li, layer.input_layernorm(x))  # [N, NH, D], [N, KVH, D] x 2
            q = padded(q * cos + _rotate_half(q) * sin, self.num_heads)  # [B, NH, T, D]
            k = padded(k * cos + _rotate_half(k) * sin, self.kv_heads)  # [B, KVH, T, D]
            v = padded(v, self.kv_heads)
            new_k[li], new_v[li] = k, v
            keys = torch.cat([cache.k[li, :, :, :S], k], dim=2)  # [B, KVH, S + T, D]
            vals = torch.cat([cache.v[li, :, :, :S], v], dim=2)
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=self.num_heads != self.kv_heads)
            o = o.transpose(1, 2).reshape(B * T, self.num_heads * self.head_dim)
            x = x + self._o(li, o if idx is None else o[idx])
            x = x + self._mlp(li, layer.post_attention_layernorm(x))
        x = self.inner.norm(x)
        if idx is not None:
            x = x.new_zeros((B * T, x.shape[-1])).index_copy_(0, idx, x)
        return x.view(B, T, -1), new_k, new_v
