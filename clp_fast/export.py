"""``clp-fast export --format vllm``: the MTP heads and the EAGLE-style drafter in layouts vLLM loads.

- **Medusa** (``speculative_config={"method": "medusa", "model": DIR}``): head ``j``'s residual block
  ``h + SiLU(W_j h + b_j)`` is vLLM's ``blocks.{j}.layers.0`` (``medusa_fc_bias``), and the backbone's own LM head
  is written once as ``lm_heads.0`` with ``original_lm_head`` (every head shares it). Full vocabulary only: vLLM
  0.32's loader fails on a truncated one ("Following weights were not initialized from checkpoint:
  {'token_map'}"), so heads trained on a draft vocabulary export with the full LM head (their guesses may then
  differ where a token past the draft vocabulary wins).
- **EAGLE** (``{"method": "eagle", "model": DIR}``, vLLM's ``EagleLlamaForCausalLM``): ``fc`` over
  ``cat(embed(x_{t+1}), h_t)``, one Llama decoder layer whose input norm is dropped (EAGLE-1's layout, ours), the
  target's embedding and LM head shared (not written). The config is a ``LlamaConfig`` of one layer with the
  backbone's shapes; a Qwen2 backbone's biased q/k/v become ``attention_bias: true`` with a zero ``o_proj`` bias
  (Llama's flag biases o_proj too; without the tensor vLLM 0.32 left that bias uninitialised and accepted no
  draft: 0 of 327 draft tokens, 2026-12-07); Qwen2's RoPE is Llama's default one. vLLM drafts over the full
  vocabulary; ours over the first ``draft_vocab`` rows.

Both are written into a temporary folder and renamed into place (nothing half-written is left under ``out``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from clp_fast.files import publish_folder, staging

__all__ = ["medusa_tensors", "medusa_config", "eagle_tensors", "eagle_config", "export_vllm"]


def medusa_tensors(heads, lm_head_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """vLLM Medusa tensors of ``heads`` (:class:`clp_fast.heads.MTPHeads`) with the backbone's ``[V, H]`` LM head."""
    out = {}
    for j in range(heads.k):
        out[f"blocks.{j}.layers.0.weight"] = heads.weight[j]
        out[f"blocks.{j}.layers.0.bias"] = heads.bias[j]
    out["lm_heads.0.weight"] = lm_head_weight
    return out


def medusa_config(heads, V: int) -> dict:
    return {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": heads.hidden_size,
            "vocab_size": V, "truncated_vocab_size": V, "num_heads": heads.k, "num_hidden_layers": 1,
            "medusa_fc_bias": True, "original_lm_head": True}


def eagle_tensors(drafter) -> dict[str, torch.Tensor]:
    """vLLM EAGLE-1 tensors of ``drafter`` (:class:`clp_fast.drafts.eagle.EagleDrafter`): ``fc`` and ``layers.0.*``
    (transformers' Llama names; the input norm is absent, as in EAGLE-1 checkpoints)."""
    out = {"fc.weight": drafter.fc.weight}
    for name, t in drafter.layer.state_dict().items():
        out[f"layers.0.{name}"] = t
    o_bias = "layers.0.self_attn.o_proj.bias"
    if drafter.attention_bias and o_bias not in out:  # Llama's attention_bias biases o_proj too, Qwen2's does not:
        out[o_bias] = drafter.fc.weight.new_zeros(drafter.hidden_size)  # a zero bias is Qwen2's layer exactly
    return out


def eagle_config(drafter, model_config) -> dict:
    """A one-layer ``LlamaConfig`` dict with the drafter's shapes (``model_config``: the backbone's)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
            "hidden_size": drafter.hidden_size, "intermediate_size": drafter.intermediate_size,
            "num_attention_heads": drafter.num_heads, "num_key_value_heads": drafter.kv_heads,
            "head_dim": drafter.head_dim, "rms_norm_eps": drafter.rms_norm_eps, "rope_theta": drafter.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": drafter.rope_theta},
            "attention_bias": drafter.attention_bias, "vocab_size": drafter.vocab_size,
            "max_position_embeddings": int(getattr(model_config, "max_position_embeddings", 32768)),
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": getattr(model_config, "bos_token_id", None),
            "eos_token_id": getattr(model_config, "eos_token_id", None)}


def export_vllm(model, out: str | os.PathLike, *, heads=None, drafter=None, dtype=torch.bfloat16) -> Path:
    """Write ``heads`` (Medusa) or ``drafter`` (EAGLE) for the loaded ``model`` into folder ``out`` (created; an
    existing non-empty folder is an error) and return it."""
    if (heads is None) == (drafter is None):
        raise ValueError("export_vllm needs exactly one of heads= and drafter=")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export folder {out} already exists and is not empty")
    W = model.get_output_embeddings().weight.detach()
    if heads is not None:
        heads.check_compatible(model)
        tensors, config = medusa_tensors(heads, W), medusa_config(heads, W.shape[0])
    else:
        drafter.check_compatible(model)
        tensors, config = eagle_tensors(drafter), eagle_config(drafter, model.config)
    tensors = {n: t.detach().to(dtype).contiguous().cpu() for n, t in tensors.items()}
    with staging(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return publish_folder(tmp, out)
