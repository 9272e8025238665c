"""Verifiers: from a forward's hidden states over a draft tree to each row's accepted path and next token.

The only part of the decode loop that differs between modes:

- :class:`ArgmaxVerifier` (``greedy``, ``lossless``): a node is accepted iff its token equals the backbone's
  argmax at its parent and its parent is accepted; the deepest accepted node wins. The output is greedy
  decoding's by construction.
- :class:`ChainVerifier` (``clp``, the paper's mode): the fed chain is taken unverified; only its last node's
  logit rows are computed.
- :class:`SamplingVerifier` (:func:`clp_fast.generate_processed`): every verified node's full logit row goes
  through the logits processors with its own prefix, then the tree is walked greedily or by lossless
  speculative sampling (:func:`clp_fast.engine.sampling.walk_tree`).

Each returns a :class:`Verdict`; the argmax verifiers compute the backbone's row in the fused LM-head pass
(:func:`clp_fast.drafts.heads.fused_rows`), which also yields the heads' rows where they are needed at a node
known before the pass (the prefill, clp's last node) or where the pass costs no more for them (the Triton
kernel, one read of the weight for every fed node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clp_fast.drafts import heads as heads_mod
from clp_fast.engine.processors import node_scorer, pick, process
from clp_fast.engine.sampling import walk_tree
from clp_fast.engine.tree import Tree

__all__ = ["Verdict", "ArgmaxVerifier", "ChainVerifier", "SamplingVerifier", "accept_argmax"]


@dataclass
class Verdict:
    """Each row's next token ``pending [B]`` (its probability ``conf [B]`` where known) and, from a fused pass, the
    heads' rows at the node it follows: ``(ids [B, k], conf [B, k], n [B], *top)``."""

    pending: torch.Tensor
    conf: torch.Tensor | None = None
    head_rows: tuple | None = None


def accept_argmax(backbone_ids: torch.Tensor, tree: Tree) -> torch.Tensor:
    """Each row's deepest accepted node ``[B]`` (lowest index on ties).

    ``backbone_ids [B, T]``: the backbone's argmax after each fed node. A node is accepted when every node on its
    path (itself included) equals the argmax at its parent; the root always is.
    """
    T = tree.tokens.shape[1]
    real = torch.arange(T, device=backbone_ids.device)[None] < tree.n_fed[:, None]
    ok = tree.tokens == backbone_ids.gather(1, tree.parent)
    ok[:, 0] = True
    ok &= real
    accepted = ~(tree.anc & ~ok[:, None, :]).any(-1) & real  # [B, T]
    return torch.where(accepted, tree.depth, -1).argmax(-1)


class ArgmaxVerifier:
    """Greedy acceptance: the output is the backbone's greedy decoding.

    Args:
        bb: the backbone.
        heads: the MTP heads whose rows the prefill's pass computes too (None: greedy mode, or no heads).
        mode, policy, threshold, top_m: as the heads' source takes them.
        fuse_all: compute the heads' rows at every fed node in the verifying pass (the Triton kernel: one read
            of the LM-head weight for all rows). Otherwise only the backbone's rows; the heads then run at the
            accepted node alone (on the CPU each logit row costs compute).
    """

    unverified = False

    def __init__(self, bb, heads, mode: str, policy: str, threshold: float, top_m: int = 1, fuse_all: bool = False):
        self.bb, self.heads, self.mode, self.policy = bb, heads, mode, policy
        self.threshold, self.top_m = threshold, top_m
        self.fuse_all = fuse_all and heads is not None and top_m == 1

    def first(self, hidden: torch.Tensor, seq: torch.Tensor, seq_len: torch.Tensor) -> Verdict:
        """The token after the prompt, from its last position's hidden state ``[B, H]``."""
        return _fused_verdict(self, hidden, self.top_m)

    def verify(self, hidden: torch.Tensor, tree: Tree, seq: torch.Tensor, seq_len: torch.Tensor
               ) -> tuple[torch.Tensor, Verdict]:
        """``hidden [B, T, H]`` over ``tree`` → deepest accepted node ``[B]`` and the verdict there."""
        heads = self.heads if self.fuse_all else None
        ids, conf, n = _rows_at_fed(self, heads, hidden, tree.n_fed)  # [B, T, k + 1], [B, T, k + 1], [B, T]
        best = accept_argmax(ids[..., 0], tree)
        r = torch.arange(ids.shape[0], device=ids.device)
        rows = (ids[r, best, 1:], conf[r, best, 1:], n[r, best]) if heads is not None else None
        return best, Verdict(ids[r, best, 0], conf[r, best, 0], rows)


class ChainVerifier(ArgmaxVerifier):
    """The paper's ``clp`` mode: the fed chain is accepted as fed; the next token and the heads' next guesses come
    from its last node, in one fused pass."""

    unverified = True

    def verify(self, hidden: torch.Tensor, tree: Tree, seq: torch.Tensor, seq_len: torch.Tensor
               ) -> tuple[torch.Tensor, Verdict]:
        best = (tree.n_fed - 1).clamp(min=0)
        return best, _fused_verdict(self, hidden[torch.arange(hidden.shape[0], device=hidden.device), best], 1)


class SamplingVerifier:
    """Processed distributions: logits processors at every node with its own prefix, then greedy (argmax of the
    processed scores) or lossless speculative sampling. ``lm_head`` maps hidden states to full logit rows."""

    unverified = False

    def __init__(self, lm_head, processors: list, do_sample: bool, generator: torch.Generator | None):
        self.lm_head, self.procs, self.do_sample, self.generator = lm_head, processors, do_sample, generator

    def first(self, hidden: torch.Tensor, seq: torch.Tensor, seq_len: torch.Tensor) -> Verdict:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        scores = process(self.procs, seq, seq_len, rows, self.lm_head(hidden).float())
        return Verdict(pick(scores, self.do_sample, self.generator))

    def verify(self, hidden: torch.Tensor, tree: Tree, seq: torch.Tensor, seq_len: torch.Tensor
               ) -> tuple[torch.Tensor, Verdict]:
        scores_at = node_scorer(self.procs, self.lm_head, tree.tokens, tree.n_fed, hidden, seq, seq_len)
        best, nxt = walk_tree(tree.tokens, tree.parent, tree.n_fed, scores_at, do_sample=self.do_sample,
                              generator=self.generator)
        return best, Verdict(nxt)


def _fused_verdict(v: ArgmaxVerifier, hidden: torch.Tensor, top_m: int) -> Verdict:
    """One fused pass at one node per row ``hidden [B, H]``: the backbone's token and the heads' rows."""
    ids, conf, n, *top = heads_mod.fused_rows(v.bb, v.heads, hidden, v.mode, v.policy, v.threshold, top_m)
    rows = (ids[:, 1:], conf[:, 1:], n, *top) if v.heads is not None else None
    return Verdict(ids[:, 0], conf[:, 0], rows)


def _rows_at_fed(v: ArgmaxVerifier, heads, hidden: torch.Tensor, n_fed: torch.Tensor):
    """The fused pass at the real nodes of ``hidden [B, T, H]`` (row b's first ``n_fed[b]``): ids and conf
    ``[B, T, k + 1]``, accept lengths ``[B, T]``; padding holds 0 and is never read. In a ragged batch a row fed
    fewer tokens than the longest (or none, once finished) would otherwise pay its logit rows per padding slot."""
    B, T, H = hidden.shape
    real = torch.arange(T, device=hidden.device)[None] < n_fed[:, None]  # [B, T]
    if bool(real.all()):
        ids, conf, n = heads_mod.fused_rows(v.bb, heads, hidden.reshape(B * T, H), v.mode, v.policy, v.threshold)
        return ids.view(B, T, -1), conf.view(B, T, -1), n.view(B, T)
    ids_r, conf_r, n_r = heads_mod.fused_rows(v.bb, heads, hidden[real], v.mode, v.policy, v.threshold)
    ids = ids_r.new_zeros((B, T, ids_r.shape[1]))
    conf = conf_r.new_zeros((B, T, conf_r.shape[1]))
    n = n_r.new_zeros((B, T))
    ids[real], conf[real], n[real] = ids_r, conf_r, n_r
    return ids, conf, n
