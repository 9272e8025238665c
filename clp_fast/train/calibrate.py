"""Tree calibration: how often a head's candidate, or a prompt-lookup guess, is the greedy token.

Measured on the cached held-out greedy continuations (the ``heldout`` shards of a training cache): at
every position, each head's top-m candidates and probabilities come from the cached final hidden
state (:func:`clp_fast.reference.fused_heads`), the truth is the backbone's own greedy continuation,
and the table maps (depth, probability bin) to the hit rate (Laplace-smoothed). Prompt-lookup guesses
are replayed on the same sequences: the rate at depth d is P(guess d right | guesses before it right).
The result is a :class:`clp_fast.engine.tree.TreeCalibration`, stored in the heads' config (``extra.tree``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clp_fast import reference
from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.drafts.lookup import lookup_continuation
from clp_fast.heads import MTPHeads
from clp_fast.train.shards import load_shard, shard_paths

EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _positions(data: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) pairs of the greedy part whose next k greedy tokens are all cached."""
    b, t = [], []
    for s in range(data["length"].shape[0]):
        lo, hi = int(data["gen_start"][s]), int(data["length"][s]) - k - 1
        b += [s] * max(0, hi - lo)
        t += list(range(lo, hi))
    return torch.tensor(b, dtype=torch.long), torch.tensor(t, dtype=torch.long)


@torch.no_grad()
def head_rates(heads: MTPHeads, W: torch.Tensor, shards: list[Path], top_m: int, edges=EDGES,
               chunk: int = 512) -> tuple[list[list[float]], list[list[float]]]:
    """Per depth and probability bin, the hit rate of the heads' top-m candidates; also per depth and
    rank, the plain hit rate (for the report)."""
    k, nb = heads.k, len(edges) - 1
    hits, counts = torch.zeros(k, nb), torch.zeros(k, nb)
    rank_hits, n = torch.zeros(k, top_m), 0
    inner = torch.tensor(edges[1:-1])
    for path in shards:
        data = load_shard(path)
        sb, st = _positions(data, k)
        am = data["argmax"].long()
        for i in range(0, len(sb), chunk):
            b, t = sb[i: i + chunk], st[i: i + chunk]
            h = data["hidden"][b, t].to(W.dtype)
            _, _, _, top, p = reference.fused_heads(h, heads.weight.to(W.dtype), heads.bias.to(W.dtype), W,
                                                    draft_vocab=heads.draft_vocab, top_m=top_m)
            truth = torch.stack([am[b, t + j] for j in range(1, k + 1)], 1)  # token j places after the pending one
            hit = (top == truth[..., None]).float()  # [R, k, m]
            bins = torch.bucketize(p, inner)
            for j in range(k):
                counts[j] += torch.bincount(bins[:, j].flatten(), minlength=nb).float()
                hits[j] += torch.bincount(bins[:, j].flatten(), weights=hit[:, j].flatten(), minlength=nb)
            rank_hits += hit.sum(0)
            n += len(b)
    if n == 0:
        raise ValueError(f"no held-out greedy positions in {[str(s) for s in shards]}")
    return ((hits + 0.5) / (counts + 1.0)).tolist(), (rank_hits / n).tolist()


def lookup_rates(shards: list[Path], width: int, depths: int) -> list[float]:
    """P(lookup guess d right | guesses 1..d-1 right), d = 1..depths, replaying the lookup branch of
    :func:`clp_fast.engine.tree._topm_tree` on the held-out greedy continuations."""
    right, tried = [0] * depths, [0] * depths
    for path in shards:
        data = load_shard(path)
        toks, am = data["tokens"].long(), data["argmax"].long()
        for s in range(toks.shape[0]):
            lo, hi = int(data["gen_start"][s]), int(data["length"][s])
            seq = toks[s, :hi].tolist()
            for t in range(lo, hi - 1):
                ctx = seq[: t + 1] + [int(am[s, t])]  # the pending token is the backbone's greedy one
                guess = lookup_continuation(ctx, width, min_ngram=2) or lookup_continuation(
                    ctx, max(1, width // 2), max_ngram=1)
                for d, g in enumerate(guess[:depths]):
                    if t + 2 + d >= hi:
                        break
                    tried[d] += 1
                    if g != seq[t + 2 + d]:
                        break
                    right[d] += 1
    return [(r + 0.5) / (n + 1.0) for r, n in zip(right, tried)]


def calibrate(heads: MTPHeads, W: torch.Tensor, cache: str | Path, top_m: int = 4, lookup_width: int = 6,
              kinds=("heldout",)) -> tuple[TreeCalibration, dict]:
    """The tree calibration of ``heads`` from a training cache's held-out greedy shards, and a report."""
    shards = [p for kind in kinds for p in shard_paths(Path(cache), kind)]
    if not shards:
        raise ValueError(f"no {'/'.join(kinds)} shards under {cache}")
    rates, by_rank = head_rates(heads, W, shards, top_m)
    lookup = lookup_rates(shards, lookup_width, lookup_width)
    calib = TreeCalibration(tuple(EDGES[:-1]) + (1.0 + 1e-6,), tuple(tuple(r) for r in rates), tuple(lookup), top_m)
    return calib, {"hit_rate_by_rank": by_rank, "lookup_rate_by_depth": lookup, "shards": [str(s) for s in shards]}
