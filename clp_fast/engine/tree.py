"""One step's draft trees: grown per row from every source's proposals, then held as padded tensors.

Each row's tree is rooted at its pending token. Every proposal (:mod:`clp_fast.drafts.base`) offers
guesses with **priors** (acceptance given the parent's); a node's **expected return** ``e`` is the product
of its path's priors, each corrected by the row's measured acceptance of that kind of guess (``factors``)
and capped at ``MAX_RATE`` (no guess is certain, so a child's ``e`` stays below its parent's). Nodes are
added best first — parents always before their children — up to the row's cap; a guess two sources share
is one node. Which of the grown nodes one forward verifies is the cost model's choice over the whole batch
(:func:`clp_fast.engine.speculation.select_nodes`).

A :class:`~clp_fast.drafts.base.Layers` proposal (the heads' top-m lists) hangs its depth-d candidates
below every node at depth d (Medusa's cartesian tree: head d + 1 guesses a position, not a path); a
:class:`~clp_fast.drafts.base.Branch` continues only below its own previous guess.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from clp_fast.drafts.base import Branch, Layers, Proposal

__all__ = ["Tree", "grow", "make_tree", "MAX_RATE", "MIN_RATE"]

MAX_RATE = 0.98  # no guess is certain: a child's e stays below its parent's, so parents are always taken first
MIN_RATE = 1e-6  # nor impossible: a zero prior still ranks (a flat cost, "fixed" speculation, feeds it)


def corrected(prior: float, factor: float) -> float:
    """A guess's acceptance given its parent's: its prior times its row's factor for its kind, in range."""
    return min(MAX_RATE, max(MIN_RATE, prior * factor))


def grow(pending: int, proposals: list[Proposal], kinds: list[str], factors: list[float], cap: int
         ) -> tuple[list[int], list[int], list[float], list[int]]:
    """One row's tree of at most ``cap`` guesses below ``pending``, best expected return first.

    Args:
        pending: the root token.
        proposals: every source's proposals for this row.
        kinds: all kinds in the loop's order; a node's source index is its kind's position here.
        factors: the row's correction per kind (same order).
        cap: most guesses (nodes besides the root).

    Returns:
        ``(tokens, parents, priors, sources)`` lists, node 0 the root (its parent, prior and source unused:
        0, 1.0, -1); parents precede children.
    """
    toks, pars, pri, src, est = [pending], [0], [1.0], [-1], [1.0]
    where: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    heap: list[tuple] = []  # (-e, tie order, parent, token, prior, kind index, branch index or -1, position)
    order = itertools.count()
    layers = [(p, kinds.index(p.kind)) for p in proposals if isinstance(p, Layers)]
    branches = [(p, kinds.index(p.kind)) for p in proposals if isinstance(p, Branch)]

    def push(parent: int, tok: int, prior: float, ki: int, bi: int, pos: int) -> None:
        e = est[parent] * corrected(prior, factors[ki])
        heapq.heappush(heap, (-e, next(order), parent, tok, prior, ki, bi, pos))

    def expand(node: int, depth: int) -> None:
        """Queue the position-wise candidates for the depth below ``node``."""
        for lay, ki in layers:
            if depth < len(lay.tokens):
                for tok, p in zip(lay.tokens[depth], lay.priors[depth]):
                    push(node, tok, p, ki, -1, depth)

    def follow(node: int, bi: int, pos: int) -> None:
        """Queue branch ``bi``'s guess at ``pos`` below ``node``."""
        br, ki = branches[bi]
        if pos < len(br.tokens):
            push(node, br.tokens[pos], br.priors[pos], ki, bi, pos)

    depth = [0]
    expand(0, 0)
    for bi in range(len(branches)):
        follow(0, bi, 0)
    while heap and len(toks) - 1 < cap:
        neg, _, parent, tok, prior, ki, bi, pos = heapq.heappop(heap)
        node = where.get((parent, tok))
        if node is None:
            node = where[(parent, tok)] = len(toks)
            toks.append(tok)
            pars.append(parent)
            pri.append(prior)
            src.append(ki)
            est.append(-neg)
            depth.append(depth[parent] + 1)
            expand(node, depth[node])
        elif -neg > est[node]:  # a guess two sources share: one node, the better prior and its source
            est[node], pri[node], src[node] = -neg, prior, ki
        if bi >= 0:
            follow(node, bi, pos + 1)
    return toks, pars, pri, src


@dataclass
class Tree:
    """One step's draft trees, one per row, as padded ``[B, T]`` tensors (node 0 = the pending token).

    Parents precede children, so a path read in index order is read root first.
    """

    tokens: torch.Tensor  # [B, T]
    parent: torch.Tensor  # [B, T] index of the parent node (node 0 and padding: 0)
    depth: torch.Tensor  # [B, T] guesses between the node and the root (position offset)
    anc: torch.Tensor  # [B, T, T] bool: anc[b, i, j] <=> j is i or one of its ancestors
    n_fed: torch.Tensor  # [B] real nodes per row (0 for rows not run)
    prior: torch.Tensor | None = None  # [B, T] a node's prior acceptance given its parent's (adaptive speculation)
    src: torch.Tensor | None = None  # [B, T] kind index (the loop's kinds; -1: root or padding)


def make_tree(rows: list[tuple], device) -> Tree:
    """``rows[b] = (tokens, parents)`` lists (parents[0] unused), optionally ``+ (priors, sources)``
    → padded :class:`Tree`."""
    B, T = len(rows), max(1, max(len(r[0]) for r in rows))
    tokens = torch.zeros((B, T), dtype=torch.long)
    parent = torch.zeros((B, T), dtype=torch.long)
    depth = torch.zeros((B, T), dtype=torch.long)
    anc = torch.zeros((B, T, T), dtype=torch.bool)
    for b, (toks, pars, *_) in enumerate(rows):
        n = len(toks)
        if n:
            tokens[b, :n] = torch.tensor(toks, dtype=torch.long)
        anc[b, torch.arange(T), torch.arange(T)] = True  # itself (padding nodes: only itself)
        for i in range(1, n):
            parent[b, i] = pars[i]
            depth[b, i] = depth[b, pars[i]] + 1
            anc[b, i] |= anc[b, pars[i]]
    n_fed = torch.tensor([len(r[0]) for r in rows], dtype=torch.long)
    tree = Tree(*(x.to(device) for x in (tokens, parent, depth, anc, n_fed)))
    if rows and len(rows[0]) == 4:
        prior = torch.zeros((B, T), dtype=torch.float32)
        src = torch.full((B, T), -1, dtype=torch.long)
        for b, (toks, _, pri, sr) in enumerate(rows):
            if len(toks) > 1:
                prior[b, 1 : len(toks)] = torch.tensor(pri[1:], dtype=torch.float32)
                src[b, 1 : len(toks)] = torch.tensor(sr[1:], dtype=torch.long)
        tree.prior, tree.src = prior.to(device), src.to(device)
    return tree
