"""The MTP heads as a draft source, and the fused LM-head pass they share with the backbone.

Backbone-as-Architect: one pass over the final hidden states reads the LM-head weight once and computes
the backbone's row (its next token, always emitted) and every head's row (the guesses after it), their
argmaxes, confidences and the CLP's accept length (:func:`fused_rows`, the Triton kernel on a GPU, its
reference on the CPU). Where the verifier already has the backbone's row, only the head rows are computed
(:meth:`clp_fast.heads.MTPHeads.head_rows`).

As a source, the heads propose the argmax chain (:class:`~clp_fast.drafts.base.Branch`) or, in tree mode,
each head's top-m candidates (:class:`~clp_fast.drafts.base.Layers`), with calibrated priors
(:class:`~clp_fast.drafts.calibration.TreeCalibration`). Under adaptive speculation they skip their own
computation while their guesses do not pay for it (:class:`HeadsWorth`).
"""

from __future__ import annotations

import time

import torch

from clp_fast import backend
from clp_fast.drafts.base import Accepted, Branch, DraftSource, Layers, Proposal
from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.heads import MTPHeads

__all__ = ["HeadsSource", "HeadsWorth", "fused_rows", "PROBE_EVERY"]

PROBE_EVERY = 8  # steps without the heads before they are computed again to re-measure what they bring


def fused_rows(bb, heads: MTPHeads | None, hidden: torch.Tensor, mode: str, policy: str, threshold: float,
               top_m: int = 1, backbone: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The LM-head pass over ``hidden [R, H]`` → ids ``[R, k + 1]``, conf ``[R, k + 1]``, n ``[R]``; with
    ``top_m > 1`` also each head's top-m ids and probabilities ``[R, k, m]``.

    Column 0 of ids is the backbone's next token; n is the number of head guesses the policy takes (0 without
    heads or in greedy mode). ``backbone = (ids [R], conf [R])``: that column is already known, so only the
    head rows are computed.
    """
    if backbone is not None and heads is not None and mode != "greedy":
        ids_h, conf_h, n, *top = heads.head_rows(hidden, bb.lm_head_weight, threshold,
                                                 policy=policy if policy in ("clp", "gate") else None, top_m=top_m)
        return (torch.cat([backbone[0][:, None], ids_h], 1), torch.cat([backbone[1][:, None], conf_h], 1), n, *top)
    if heads is None or mode == "greedy":
        ids, conf, _ = backend.fused_heads(hidden, bb.no_heads[0], bb.no_heads[1], bb.lm_head_weight)
        return ids, conf, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    use_clp = policy == "clp"
    ids, conf, n, *top = heads.fused(hidden, bb.lm_head_weight, threshold, with_clp=use_clp, top_m=top_m)
    if not use_clp:
        n = heads.gate.accept_lengths(hidden, conf[:, 1:], threshold)
    return (ids, conf, n, *top)


class HeadsWorth:
    """Whether computing the heads' guesses pays for itself: their share of the step's expected tokens must beat
    their share of its time (the head MLPs and their logit rows: ~10 % of a 0.5B step on the 2-core CPU).

    A compute-bound batch that selects few head guesses decodes faster without computing them at all
    (prompt-lookup guesses are free); every ``PROBE_EVERY`` skipped steps the heads run again, so a change
    (rows finishing, more predictable text) brings them back.
    """

    def __init__(self):
        self.gain = None  # EMA of the selected head guesses' share of the step's expected tokens
        self.share = None  # EMA of the heads' share of a step's time
        self.skipped = 0

    def observe_gain(self, heads_expected: float, total_expected: float) -> None:
        g = heads_expected / max(total_expected, 1e-9)
        self.gain = g if self.gain is None else self.gain + 0.3 * (g - self.gain)

    def observe_cost(self, heads_seconds: float, step_seconds: float) -> None:
        c = heads_seconds / max(step_seconds, 1e-9)
        self.share = c if self.share is None else self.share + 0.3 * (c - self.share)

    def want(self) -> bool:
        """Compute the heads for the next step?"""
        if self.gain is None or self.share is None or self.gain > self.share:
            self.skipped = 0
            return True
        self.skipped += 1
        if self.skipped > PROBE_EVERY:
            self.skipped = 0
            return True
        return False


class HeadsSource(DraftSource):
    """The MTP heads' guesses at each row's accepted node.

    Args:
        bb: the :class:`~clp_fast.models.native.NativeBackbone` (its LM-head weight).
        heads: the trained heads.
        mode, policy, threshold: as :func:`clp_fast.generate` takes them; the policy's accept length bounds
            the chain unless ``all_heads``.
        calib: the acceptance tables behind the priors (None: the candidates' own probabilities).
        top_m: > 1 proposes each head's top-m candidates (tree mode) instead of the argmax chain.
        all_heads: propose all k guesses and let the cost model choose (adaptive speculation).
        worth: a :class:`HeadsWorth` to skip the heads while they do not pay (adaptive speculation, CPU).
    """

    kinds = ("heads",)

    def __init__(self, bb, heads: MTPHeads, mode: str, policy: str, threshold: float, calib: TreeCalibration | None,
                 top_m: int = 1, all_heads: bool = False, worth: HeadsWorth | None = None):
        self.bb, self.heads, self.mode, self.policy, self.threshold = bb, heads, mode, policy, threshold
        self.calib = calib or TreeCalibration.uncalibrated(heads.k)
        self.top_m, self.all_heads, self.worth = top_m, all_heads, worth
        self.max_depth = heads.k
        self.rows: tuple | None = None  # (ids [B, k], conf [B, k], n [B], *top) at each row's accepted node

    def wants_rows(self) -> bool:
        """Whether the verifier's LM-head pass should compute head rows beside the backbone's."""
        return True

    def advance(self, acc: Accepted) -> None:
        if acc.head_rows is not None:
            self.rows = acc.head_rows
            return
        if self.worth is not None and not (acc.speculating and self.worth.want()):
            self.rows = None  # the next step feeds no head guess: lookup guesses only, or greedy
            return
        t0 = time.perf_counter()
        conf = acc.pending_conf if acc.pending_conf is not None else torch.zeros_like(acc.pending, dtype=torch.float)
        ids, conf_all, n, *top = fused_rows(self.bb, self.heads, acc.hidden, self.mode, self.policy,
                                            self.threshold, self.top_m, backbone=(acc.pending, conf))
        self.rows = (ids[:, 1:], conf_all[:, 1:], n, *top)
        if self.worth is not None and acc.step_seconds is not None:
            self.worth.observe_cost(time.perf_counter() - t0, acc.step_seconds)

    def chosen(self, expected: dict[str, float], total: float) -> None:
        if self.worth is not None and self.rows is not None:
            self.worth.observe_gain(expected.get("heads", 0.0), total)

    def propose(self, live: list[bool]) -> list[list[Proposal]]:
        if self.rows is None:
            return [[] for _ in live]
        ids, conf, n, *top = self.rows
        if self.top_m > 1 and top:
            cand, prob = top[0].tolist(), top[1].tolist()
            return [[Layers(cand[b], [[self.calib.rate(d + 1, p) for p in ps] for d, ps in enumerate(prob[b])],
                            "heads")] if ok else [] for b, ok in enumerate(live)]
        ids, conf, n = ids.tolist(), conf.tolist(), n.tolist()
        out = []
        for b, ok in enumerate(live):
            take = len(ids[b]) if self.all_heads else n[b]
            out.append([Branch(ids[b][:take], [self.calib.rate(d + 1, c) for d, c in enumerate(conf[b][:take])],
                               "heads")] if ok and take else [])
        return out
