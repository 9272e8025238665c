"""Draft trees chosen by expected acceptance (Medusa's tree, built per step and per row).

Each head j returns its ``m`` most likely tokens for the position j places after the pending token.
Head j's guess does not depend on which guesses precede it, so every node at depth j - 1 may take
any of head j's candidates as a child (Medusa's cartesian tree). A node's **estimated acceptance**
is the product, along its path, of each candidate's calibrated probability of being the greedy
token — a per-depth table from the candidate's own softmax probability to the rate measured on
held-out data, shipped with the heads (``TreeCalibration``). A prompt-lookup branch joins the same
trie with its own per-depth rate.

Nodes are added best first (a child never beats its parent, so parents come first) while a node
still pays for itself: with every fed token costing ``cost`` of a one-token step, adding a node of
estimate ``e`` raises expected tokens per unit time iff ``e > cost * (1 + sum of estimates) / (1 +
cost * nodes)``, the current rate. So a row whose guesses are unlikely feeds few tokens (the
draft length follows the estimates), and at most ``budget`` nodes are fed in any case.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clp_fast.lookup import lookup_continuation

if TYPE_CHECKING:
    from clp_fast.decode import _Step

__all__ = ["TreeCalibration", "best_first_tree", "FED_TOKEN_COST"]

# Cost of one more fed token relative to a one-token decode step (Qwen2.5-0.5B, bf16, 2-core CPU: a forward
# of 4 tokens costs ~1.2x one token, 16 tokens ~2.8x, i.e. ~6-12 % per extra token while the batch is small).
FED_TOKEN_COST = 0.06


@dataclass(frozen=True)
class TreeCalibration:
    """Per-depth map from a head candidate's softmax probability to its measured acceptance rate.

    ``edges`` are increasing bin edges over [0, 1]; ``rates[j][b]`` is the fraction of held-out
    candidates of head ``j + 1`` with probability in bin ``b`` that were the greedy token.
    ``lookup`` is the acceptance rate of a prompt-lookup guess per depth (its last entry repeats).
    ``default``: whether lossless decoding uses the trees when the caller does not say (``tree_top_m=None``);
    set from a measurement (``bench/bench_tree.py``), since on a compute-bound CPU the argmax chain can win.
    """

    edges: tuple[float, ...]
    rates: tuple[tuple[float, ...], ...]
    lookup: tuple[float, ...] = (0.6, 0.75, 0.8)
    top_m: int = 4
    default: bool = True

    def __post_init__(self):
        if len(self.edges) < 2 or list(self.edges) != sorted(self.edges):
            raise ValueError(f"tree calibration edges={list(self.edges)!r} must be >= 2 increasing values")
        for j, r in enumerate(self.rates):
            if len(r) != len(self.edges) - 1 or not all(0.0 <= x <= 1.0 for x in r):
                raise ValueError(f"tree calibration rates[{j}] must hold {len(self.edges) - 1} values in [0, 1]")
        if not self.lookup or not all(0.0 <= x <= 1.0 for x in self.lookup):
            raise ValueError(f"tree calibration lookup={list(self.lookup)!r} must be values in [0, 1]")
        if not 1 <= self.top_m <= 8:
            raise ValueError(f"tree calibration top_m={self.top_m!r} must be in [1, 8]")

    def rate(self, depth: int, p: float) -> float:
        """Calibrated acceptance of a depth-``depth`` (1-based) head candidate of probability ``p``."""
        table = self.rates[min(depth, len(self.rates)) - 1]
        return table[min(max(bisect_right(self.edges, p) - 1, 0), len(table) - 1)]

    def lookup_rate(self, depth: int) -> float:
        return self.lookup[min(depth, len(self.lookup)) - 1]

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "rates": [list(r) for r in self.rates], "lookup": list(self.lookup),
                "top_m": self.top_m, "default": self.default}

    @classmethod
    def uncalibrated(cls, k: int, bins: int = 20) -> TreeCalibration:
        """A candidate's own probability as its rate (bin midpoints), the default lookup rates; for heads that
        ship no calibration."""
        edges = tuple(i / bins for i in range(bins + 1))
        mids = tuple((i + 0.5) / bins for i in range(bins))
        return cls(edges, (mids,) * max(k, 1), default=False)

    @classmethod
    def from_dict(cls, d: dict) -> TreeCalibration:
        try:
            return cls(tuple(d["edges"]), tuple(tuple(r) for r in d["rates"]), tuple(d.get("lookup", cls.lookup)),
                       int(d.get("top_m", 4)), bool(d.get("default", True)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed tree calibration {d!r}: {err}") from None


def best_first_tree(pending: int, cand: list[list[int]], prob: list[list[float]], lookup: list[int],
                    calib: TreeCalibration, budget: int, cost: float = FED_TOKEN_COST
                    ) -> tuple[list[int], list[int]]:
    """One row's tree: ``(tokens, parents)`` lists, node 0 the pending token (parents[0] unused).

    Args:
        pending: the backbone's next token (the root, always right).
        cand: ``cand[j][i]`` head ``j + 1``'s ``i``-th candidate; ``prob`` their probabilities.
        lookup: a prompt-lookup continuation (may be empty), guessed to follow ``pending``.
        calib: the acceptance tables.
        budget: most guesses (nodes besides the root) to feed.
        cost: a fed token's cost relative to a one-token step; 0 fills the budget.
    """
    toks, pars, est = [pending], [0], [1.0]
    where: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    # (-estimate, tie order, parent node, token, depth, index into lookup or -1 for a head candidate)
    heap: list[tuple[float, int, int, int, int, int]] = []
    order = 0

    def push(parent: int, depth: int, e: float, tok: int, li: int) -> None:
        nonlocal order
        heapq.heappush(heap, (-e, order, parent, tok, depth, li))
        order += 1

    def expand(node: int, depth: int, li: int) -> None:
        """Queue the children of ``node`` (at ``depth``): the next head's candidates, the next lookup guess."""
        if depth < len(cand):
            for tok, p in zip(cand[depth], prob[depth]):
                push(node, depth + 1, est[node] * calib.rate(depth + 1, p), tok, -1)
        if 0 <= li < len(lookup):
            push(node, depth + 1, est[node] * calib.lookup_rate(depth + 1), lookup[li], li)

    expand(0, 0, 0 if lookup else -1)
    gained = 0.0
    while heap and len(toks) - 1 < budget:
        neg, _, parent, tok, depth, li = heapq.heappop(heap)
        e = -neg
        if e <= cost * (1.0 + gained) / (1.0 + cost * (len(toks) - 1)):
            break  # this node (and every one after it) costs more than it is expected to return
        node = where.get((parent, tok))
        if node is not None:  # a head candidate equal to a lookup guess: one node; the lookup chain goes on
            if li >= 0:
                est[node] = max(est[node], e)
                if li + 1 < len(lookup):
                    push(node, depth + 1, est[node] * calib.lookup_rate(depth + 1), lookup[li + 1], li + 1)
            continue
        where[(parent, tok)] = len(toks)
        toks.append(tok)
        pars.append(parent)
        est.append(e)
        gained += e
        expand(len(toks) - 1, depth, li + 1 if li >= 0 else -1)
    return toks, pars


# ------------------------------------------------------------------ the step's trees as padded tensors
@dataclass
class _Tree:
    """One step's draft trees, one per row, as padded ``[B, T]`` tensors (node 0 = the pending token).

    Parents precede children, so a path read in index order is read root first.
    """

    tokens: torch.Tensor  # [B, T]
    parent: torch.Tensor  # [B, T] index of the parent node (node 0 and padding: 0)
    depth: torch.Tensor  # [B, T] guesses between the node and the root (position offset)
    anc: torch.Tensor  # [B, T, T] bool: anc[b, i, j] <=> j is i or one of its ancestors
    n_fed: torch.Tensor  # [B] real nodes per row (0 for rows not run)
    prior: torch.Tensor | None = None  # [B, T] a node's prior acceptance given its parent's (adaptive speculation)
    src: torch.Tensor | None = None  # [B, T] index into clp_fast.speculation.SOURCES (-1: root or padding)


def _make_tree(rows: list[tuple], device) -> _Tree:
    """``rows[b] = (tokens, parents)`` lists (parents[0] unused), optionally ``+ (priors, sources)``
    → padded :class:`_Tree`."""
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
    tree = _Tree(*(x.to(device) for x in (tokens, parent, depth, anc, n_fed)))
    if rows and len(rows[0]) == 4:
        prior = torch.zeros((B, T), dtype=torch.float32)
        src = torch.full((B, T), -1, dtype=torch.long)
        for b, (toks, _, pri, sr) in enumerate(rows):
            if len(toks) > 1:
                prior[b, 1 : len(toks)] = torch.tensor(pri[1:], dtype=torch.float32)
                src[b, 1 : len(toks)] = torch.tensor(sr[1:], dtype=torch.long)
        tree.prior, tree.src = prior.to(device), src.to(device)
    return tree


def _insert(toks: list[int], pars: list[int], children: dict, branch: list[int], budget: int,
            est: tuple[list[float], list[int], list[float], int] | None = None) -> None:
    """Add ``branch`` below the root of a trie held as ``toks``/``pars`` lists, sharing existing nodes;
    stops when the trie has ``budget`` nodes. With ``est = (priors, sources, branch priors, source)`` the
    trie's per-node priors and sources are kept too (a shared node keeps the larger prior and its source)."""
    node = 0
    for d, t in enumerate(branch):
        nxt = children.get((node, t))
        if nxt is None:
            if len(toks) >= budget:
                return
            nxt = len(toks)
            toks.append(t)
            pars.append(node)
            children[(node, t)] = nxt
            if est is not None:
                est[0].append(est[2][d])
                est[1].append(est[3])
        elif est is not None and est[2][d] > est[0][nxt]:
            est[0][nxt], est[1][nxt] = est[2][d], est[3]
        node = nxt


def _lossless_tree(step: _Step, contexts: list[list[int]], width: int, max_guesses: torch.Tensor,
                   active: torch.Tensor, device) -> _Tree:
    """The fixed-speculation step's trees: :func:`_lossless_tries` as a padded :class:`_Tree`."""
    return _make_tree(_lossless_tries(step, contexts, width, max_guesses, active), device)


def _lossless_tries(step: _Step, contexts: list[list[int]], width: int, max_guesses: torch.Tensor,
                    active: torch.Tensor, calib: TreeCalibration | None = None, all_heads: bool = False
                    ) -> list[tuple]:
    """Per active row: a 2/3-gram prompt-lookup branch of up to ``width`` guesses (the strongest guess:
    held-out chain accuracy of the heads beyond head 1 is ~0.08 / 0.02), the heads' chain, then, when no
    longer n-gram matched, a 1-gram lookup branch of up to ``width // 2``, merged into one trie of at most
    ``1 + max_guesses[b]`` nodes.

    Simulated on the greedy outputs of 24 HumanEval prompts (Qwen2.5-Coder-0.5B, k = 2 heads): tau 1.70
    for the best single branch per step, 1.86 for the tree; the cheaper alternatives measured there
    (3 lookup branches: +0.045 tau for +2.2 fed tokens; a stdlib n-gram datastore: +0.10 for +1.3) cost
    about what they gain on this CPU, where each fed token costs ~2.5 % of a step.

    Returns per row ``(tokens, parents)`` lists; with ``calib`` (adaptive speculation) ``(tokens, parents,
    priors, sources)`` for :func:`clp_fast.speculation.select_nodes`: a head guess's prior is
    its calibrated confidence (``calib.rate``; ``step.conf``), a lookup guess's the calibrated lookup rate
    of its depth (a 1-gram guess ``WEAK_LOOKUP`` of it); ``all_heads`` offers all k head guesses (the
    selection, not the CLP, decides how many are fed)."""
    from clp_fast.speculation import SOURCES, WEAK_LOOKUP

    pending, drafts, n_heads = step.pending.tolist(), step.drafts.tolist(), step.n_drafts.tolist()
    conf = step.conf.tolist() if calib is not None and step.conf is not None else None
    cap = max_guesses.tolist()
    rows = []
    for b, live in enumerate(active.tolist()):
        if not live:
            rows.append(([], [], [], []) if calib is not None else ([], []))
            continue
        toks, pars, children = [pending[b]], [0], {}
        n_h = len(drafts[b]) if all_heads else n_heads[b]
        heads = drafts[b][:n_h]
        branches = []  # (tokens, source)
        if width:
            ctx = contexts[b] + [pending[b]]
            strong = lookup_continuation(ctx, width, min_ngram=2)
            branches.append((strong, "lookup"))
            branches.append((heads, "heads"))
            if not strong:  # a 1-gram match is a weak signal: a short branch (simulated: +1 % tok/s over width)
                branches.append((lookup_continuation(ctx, max(1, width // 2), max_ngram=1), "lookup1"))
        else:
            branches.append((heads, "heads"))
        est = None
        if calib is not None:
            pri, srcs = [1.0], [-1]
        for br, name in branches:
            if calib is not None:
                if name == "heads":
                    p = [calib.rate(d + 1, conf[b][d]) if conf else 0.5 for d in range(len(br))]
                else:
                    w = 1.0 if name == "lookup" else WEAK_LOOKUP
                    p = [w * calib.lookup_rate(d + 1) for d in range(len(br))]
                est = (pri, srcs, p, SOURCES.index(name))
            _insert(toks, pars, children, br[: cap[b]], 1 + cap[b], est)
        rows.append((toks, pars, pri, srcs) if calib is not None else (toks, pars))
    return rows


def _chain_tree(step: _Step, n: torch.Tensor, active: torch.Tensor, device) -> _Tree:
    """The pending token followed by the first ``n[b]`` head guesses (greedy: n = 0; clp mode)."""
    pending, drafts = step.pending.tolist(), step.drafts.tolist()
    rows = []
    for b, (live, nb) in enumerate(zip(active.tolist(), n.tolist())):
        toks = [pending[b]] + drafts[b][:nb] if live else []
        rows.append((toks, list(range(-1, len(toks) - 1))))
    return _make_tree(rows, device)


def _topm_tree(step: _Step, contexts: list[list[int]], width: int, max_guesses: torch.Tensor, active: torch.Tensor,
               calib: TreeCalibration, cost: float, device) -> _Tree:
    """Per active row: :func:`best_first_tree` over the heads' top-m candidates (``step.top_ids/top_p``) and a
    prompt-lookup branch of up to ``width`` guesses (2/3-gram, else 1-gram), at most ``max_guesses[b]`` guesses."""
    pending, cap = step.pending.tolist(), max_guesses.tolist()
    cand, prob = step.top_ids.tolist(), step.top_p.tolist()
    rows = []
    for b, live in enumerate(active.tolist()):
        if not live:
            rows.append(([], []))
            continue
        lookup = []
        if width:
            ctx = contexts[b] + [pending[b]]
            lookup = lookup_continuation(ctx, width, min_ngram=2) or lookup_continuation(ctx, max(1, width // 2),
                                                                                         max_ngram=1)
        rows.append(best_first_tree(pending[b], cand[b], prob[b], lookup, calib, cap[b], cost))
    return _make_tree(rows, device)
