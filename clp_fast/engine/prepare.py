"""What every decode loop needs before its prefill: argument checks naming the offending value, the EOS and
pad ids, unpadded prompts and a static KV cache checked against the model's context and the memory available,
and the tree-mode setup. Used by :func:`clp_fast.engine.generate` and :func:`clp_fast.engine.generate_processed`.
"""

from __future__ import annotations

import torch

from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.heads import MTPHeads
from clp_fast.models.memory import check_cache_fits
from clp_fast.models.native import NativeBackbone

MODES = ("greedy", "lossless", "clp")
POLICIES = ("clp", "gate")


def _check_inputs(model, bb, heads, input_ids, attention_mask, max_new_tokens, mode, policy, threshold, prompt_lookup,
                  max_step_tokens):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if input_ids.device != bb.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {bb.device}")
    V = bb.lm_head_weight.shape[0]
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {V})")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask shape {shape} does not match input_ids shape {tuple(input_ids.shape)}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
        if not torch.isin(attention_mask, torch.tensor([0, 1], device=attention_mask.device)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"empty prompt: rows {empty_rows} of attention_mask have no tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if heads is not None:
        heads.check_compatible(model)
        if heads.weight.device != bb.device:
            raise ValueError(f"heads are on {heads.weight.device} but the model is on {bb.device}")
        if policy == "gate" and heads.gate is None:
            raise ValueError("policy='gate' needs heads saved with a gate (with_gate=True)")
    if max_step_tokens is not None and (isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int)
                                        or max_step_tokens < 0):
        raise ValueError(f"max_step_tokens={max_step_tokens!r} must be a non-negative int or None")
    if isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, int) or not 0 <= prompt_lookup <= 32:
        raise ValueError(f"prompt_lookup={prompt_lookup!r} must be an int in [0, 32]")
    if prompt_lookup and mode != "lossless":
        raise ValueError(f"prompt_lookup={prompt_lookup} needs mode='lossless' (its guesses must be verified)")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"clp_threshold={threshold!r} must be a probability in [0, 1]")


def _start(model, bb: NativeBackbone, input_ids, attention_mask, max_new_tokens: int, width: int, eos_token_id,
           pad_token_id, max_cache_bytes):
    """What every decode loop needs before its prefill: the unpadded prompts ``[B, P]`` (row b's real tokens
    left-aligned, so cache slot == position), their lengths ``[B]``, the EOS ids, the pad id (the generation
    config's, else EOS, else 0) and a static cache for ``prompt + max_new_tokens + width + 1`` positions,
    checked against the model's context and the memory available first."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    prompt_len = mask.sum(-1)  # [B]
    if bb.max_positions is not None and int(prompt_len.max()) + max_new_tokens > bb.max_positions:
        raise ValueError(f"prompt length {int(prompt_len.max())} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context of {bb.max_positions} positions")
    eos = _eos_tensor(model, eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    order = torch.sort(mask, dim=-1, descending=True, stable=True).indices  # real tokens first, order kept
    prompts = torch.gather(input_ids, 1, order)  # [B, P]
    max_len = int(prompt_len.max()) + max_new_tokens + width + 1
    check_cache_fits(bb, input_ids.shape[0], max_len, max_cache_bytes)  # a named error, not the OOM killer
    return prompts, prompt_len, eos, pad_token_id, bb.allocate_cache(input_ids.shape[0], max_len)


def _tree_setup(heads: MTPHeads | None, mode: str, tree_top_m: int | None) -> tuple[TreeCalibration | None, int]:
    """The tree calibration and candidates per head for this call: ``(None, 1)`` outside tree mode."""
    calib = heads.tree_calibration if heads is not None else None
    if tree_top_m is None:
        use = calib is not None and calib.default and mode == "lossless"
        return (calib, calib.top_m) if use else (None, 1)
    if isinstance(tree_top_m, bool) or not isinstance(tree_top_m, int) or not 1 <= tree_top_m <= 8:
        raise ValueError(f"tree_top_m={tree_top_m!r} must be an int in [1, 8] or None")
    if tree_top_m > 1 and mode != "lossless":
        raise ValueError(f"tree_top_m={tree_top_m} needs mode='lossless', got mode={mode!r}")
    if tree_top_m > 1 and calib is None:
        raise ValueError(f"tree_top_m={tree_top_m} needs heads with a tree calibration (config 'extra.tree'); "
                         "these heads have none")
    return (calib, tree_top_m) if tree_top_m > 1 else (None, 1)


def _eos_tensor(model, eos_token_id, device):
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
