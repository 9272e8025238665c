"""The heads' objectives, each a pure function of logits / hidden states and cached targets.

- :func:`sampled_ce` -- cross-entropy on the backbone's argmax (the hard label), over a sampled
  candidate vocabulary (the batch's targets + random negatives): a ``V x H`` product per row would
  cost more than everything else in a step on the CPU.
- :func:`topk_kl` -- distillation: ``KL(q || p)`` with ``q`` the backbone's cached top-k distribution
  at the target position (renormalised over the ids inside the draft vocabulary) and ``p`` the
  head's softmax over the same candidate vocabulary.
- :func:`logit_mse` -- EAGLE-style regression of the backbone's later hidden state, scored through
  the LM head: ``mean_v (w_v . d)^2 = d^T (W^T W / V) d`` costs one ``H x H`` product per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def candidates(hard_ids: torch.Tensor, soft_ids: torch.Tensor | None, vocab_limit: int, negatives: int,
               gen: torch.Generator) -> torch.Tensor:
    """Sorted unique candidate ids: every target id below ``vocab_limit`` plus ``negatives`` random ids."""
    parts = [hard_ids[hard_ids < vocab_limit].flatten(), torch.randint(vocab_limit, (negatives,), generator=gen)]
    if soft_ids is not None:
        parts.append(soft_ids[soft_ids < vocab_limit].flatten())
    return torch.unique(torch.cat(parts))


def sampled_ce(logits: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits [..., C]`` over ``cand``, hard targets ``ids [...]`` (in ``cand`` or masked by the caller)
    → per-row cross-entropy ``[...]``."""
    pos = torch.searchsorted(cand, ids).clamp(max=len(cand) - 1)
    C = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, C), pos.reshape(-1), reduction="none").view(ids.shape)


def topk_kl(logits: torch.Tensor, cand: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
            vocab_limit: int) -> torch.Tensor:
    """Per-row ``KL(q || p)`` ``[...]``.

    Args:
        logits: ``[..., C]`` the head's logits over ``cand``.
        cand: ``[C]`` sorted candidate ids; must contain every ``top_ids`` entry below ``vocab_limit``.
        top_ids: ``[..., m]`` the backbone's top-m ids at the target position.
        top_logp: ``[..., m]`` their log-probabilities (over the full vocabulary).
        vocab_limit: ids at or past it (outside the draft vocabulary) are dropped from ``q``.

    ``q`` is ``softmax(top_logp)`` over the kept ids (the truncated, renormalised target); a row that
    keeps no id gets 0. ``p`` is ``softmax(logits)`` over the candidates.
    """
    keep = (top_ids < vocab_limit) & torch.isfinite(top_logp)
    lq = torch.log_softmax(top_logp.float().masked_fill(~keep, -torch.inf), dim=-1)
    q = lq.exp().masked_fill(~keep, 0.0)
    lp = torch.log_softmax(logits.float(), dim=-1)
    pos = torch.searchsorted(cand, top_ids.clamp(max=vocab_limit - 1).contiguous()).clamp(max=len(cand) - 1)
    lp_t = lp.gather(-1, pos)
    kl = (q * (lq.masked_fill(~keep, 0.0) - lp_t)).sum(-1)
    return torch.where(keep.any(-1), kl, torch.zeros_like(kl))


def logit_mse(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``d [..., H]`` (head output minus the backbone's later hidden state) → ``d^T gram d`` ``[...]``."""
    return ((d @ gram) * d).sum(-1)
