"""The EAGLE-style drafter's held-out evaluation: per-depth accuracy, the calibration table behind its priors, and
its CLP for ``mode="clp"`` (:mod:`clp_fast.train.eagle` trains it and calls these at the end of a run)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clp_fast.drafts.eagle import EagleDrafter
from clp_fast.train.eagle import EagleTrainConfig, unrolled
from clp_fast.train.shards import load_shard, shard_paths

__all__ = ["heldout_accuracy", "calibration_table", "evaluate_eagle", "fit_drafter_clp", "CALIB_BINS", "CALIB_PSEUDO"]

CALIB_BINS = 10  # probability bins of the drafter's calibration table
CALIB_PSEUDO = 4.0  # pseudo-counts at a bin's midpoint: a bin seen a few times keeps near its own probability


@torch.no_grad()
def heldout_accuracy(cache: Path, depth: int, guesses, kind: str = "heldout_tf", max_windows: int = 64,
                     greedy_only: bool = False) -> dict:
    """Per-depth top-1 agreement with the backbone's argmax over the first ``max_windows`` windows of ``kind``
    shards (from each window's ``start``, or with ``greedy_only`` from its ``gen_start``: a continuation's greedy
    part, its prompt left out). ``guesses(data, w, L)`` gives anchor ``i``'s depth-``j`` guess of the token after
    ``i + j`` as a ``[L - 1, depth]`` id tensor (a drafter's, or the heads'), or a pair (ids, their probabilities).
    Returns ``acc[j-1]`` = P(depth-j guess right), ``chain[j-1]`` = P(depths 1..j all right) and ``tau = 1 +
    sum(chain)``; given probabilities, also ``calibration`` (:func:`calibration_table`)."""
    right, chain_right, count, seen = torch.zeros(depth), torch.zeros(depth), 0, 0
    binned = torch.zeros(2, depth, CALIB_BINS)  # [hits, seen] of a guess whose parents were right, per prob bin
    for p in shard_paths(cache, kind):
        data = load_shard(p)
        n = min(data["length"].shape[0], max_windows - seen)
        if n <= 0:
            break
        seen += n
        for w in range(n):
            L = int(data["length"][w])
            i = torch.arange(L - 1)
            ok = (i >= int(data["gen_start" if greedy_only else "start"][w])) & (i + depth <= L - 1)
            if not bool(ok.any()):
                continue
            am = data["argmax"][w, :L].long()
            want = torch.stack([am[(i + j).clamp(max=L - 1)] for j in range(1, depth + 1)], 1)
            got = guesses(data, w, L)
            ids, probs = got if isinstance(got, tuple) else (got, None)
            hits = (ids == want)[ok]  # [R, depth]
            right += hits.float().sum(0)
            chain_right += hits.long().cumprod(1).float().sum(0)
            count += hits.shape[0]
            if probs is not None:
                _bin(binned, hits, probs[ok])
    if count == 0:
        return {"positions": 0}
    acc, chain = (right / count).tolist(), (chain_right / count).tolist()
    out = {"positions": count, "kind": kind + (" (greedy part)" if greedy_only else ""), "acc": acc, "chain": chain,
           "tau": 1 + sum(chain)}
    if binned[1].sum() > 0:
        out["calibration"] = calibration_table(binned)
    return out


def _bin(binned: torch.Tensor, hits: torch.Tensor, probs: torch.Tensor) -> None:
    """Add guesses whose parents were all right (depth 1: every one) to ``binned [2, depth, bins]``."""
    parents_right = torch.cat([torch.ones_like(hits[:, :1]), hits[:, :-1].long().cumprod(1).bool()], dim=1)
    b = (probs.float() * CALIB_BINS).long().clamp(0, CALIB_BINS - 1)
    for j in range(hits.shape[1]):
        sel = parents_right[:, j]
        binned[0, j].index_add_(0, b[sel, j], hits[sel, j].float())
        binned[1, j].index_add_(0, b[sel, j], torch.ones(int(sel.sum())))


def calibration_table(binned: torch.Tensor) -> dict:
    """Per depth and probability bin, the measured acceptance of a guess given its parents' (the loop's priors
    are conditional): hits over seen, with :data:`CALIB_PSEUDO` pseudo-counts at the bin's midpoint. The layout
    of :class:`clp_fast.drafts.calibration.TreeCalibration` (``edges``, ``rates``), plus the ``counts``."""
    mids = (torch.arange(CALIB_BINS) + 0.5) / CALIB_BINS
    rates = (binned[0] + CALIB_PSEUDO * mids) / (binned[1] + CALIB_PSEUDO)
    return {"edges": [i / CALIB_BINS for i in range(CALIB_BINS + 1)], "rates": rates.tolist(),
            "counts": binned[1].long().tolist()}


def fit_drafter_clp(drafter: EagleDrafter, model, cache: Path, cfg: EagleTrainConfig, progress: bool = True) -> dict:
    """Attach a CLP to ``drafter`` and fit it on the held-out shards (teacher-forced windows and greedy
    continuations; :func:`clp_fast.train.policies.fit_clp`): features the decode step has (the backbone's hidden
    state at the anchor, the chain's per-depth probabilities), label "depths 1..j all right on the greedy path".
    Its threshold: the smallest reaching ``cfg.clp_precision`` at every depth on the validation sequences."""
    from clp_fast.train.policies import fit_clp, heldout_rows

    W = model.get_output_embeddings().weight.detach()
    embed = model.get_input_embeddings()
    depth = cfg.depth

    @torch.no_grad()
    def outputs(data):  # [n, L, depth, H]: position t's depth-j output guesses the token after t + j
        n, L, H = data["hidden"].shape
        z = torch.zeros(n, L, depth, H)
        for w in range(n):
            Lw = int(data["length"][w])
            outs = unrolled(drafter, embed, data["hidden"][w : w + 1, :Lw].float(),
                            data["tokens"][w : w + 1, :Lw].long(), depth)
            z[w, : Lw - 1] = torch.stack([o[0] for o in outs], 1).float()
        return z

    kinds = tuple(k for k in ("heldout_tf", "heldout") if shard_paths(cache, k))
    rows = heldout_rows(outputs, W, cache, depth, drafter.draft_vocab, kinds=kinds, progress=progress,
                        per_shard=True)
    report = fit_clp(drafter.attach_clp(depth), rows, cfg.seed, cfg.clp_precision, progress)
    drafter.clp_threshold = report["clp"]["threshold"]
    return report


def evaluate_eagle(drafter: EagleDrafter, model, cache: Path, depth: int, kind: str = "heldout_tf",
                   max_windows: int = 64, greedy_only: bool = False) -> dict:
    """:func:`heldout_accuracy` of the drafter, unrolled ``depth`` times over teacher-forced tokens and fed its own
    features (``tau`` is then a greedy chain's expected tokens per step where the text is the backbone's own)."""
    W = model.get_output_embeddings().weight.detach()
    embed = model.get_input_embeddings()

    def guesses(data, w, L):
        outs = unrolled(drafter, embed, data["hidden"][w : w + 1, :L].float(), data["tokens"][w : w + 1, :L].long(),
                        depth)
        logits = [F.linear(f[0].to(W.dtype), W[: drafter.draft_vocab]).float() for f in outs]
        ids = torch.stack([lg.argmax(-1) for lg in logits], 1)
        return ids, torch.stack([torch.softmax(lg, -1).amax(-1) for lg in logits], 1)

    return heldout_accuracy(cache, depth, guesses, kind, max_windows, greedy_only)
