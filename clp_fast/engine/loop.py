"""The decode loop: prefill → draft → verify → commit, on a static per-row KV cache. One loop for every mode.

Each step feeds every decoding row a small **draft tree** rooted at its pending token ``p_b`` (the backbone's
own next token, always right), grown from every draft source's proposals (:mod:`clp_fast.drafts`) and pruned
by the cost model (:class:`clp_fast.engine.speculation.Speculator`). Attention follows the tree (a node sees
the cache and its own ancestors) and each node sits at position ``len_b + depth``. The verifier
(:mod:`clp_fast.engine.verify`: argmax, unverified chain, or processors + sampling) picks each row's deepest
accepted node; exactly that path's K/V is committed at the row's own offset, its tokens are kept up to the
budget, the first EOS and the first stopping criterion, streamed, and shown to every source.

Shapes: ``B`` rows, ``P`` prompt positions, ``T`` nodes fed per row in a step (padded), ``H`` hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from clp_fast import backend
from clp_fast.drafts.base import Accepted, DraftSource
from clp_fast.engine import streaming
from clp_fast.engine.speculation import Speculator
from clp_fast.engine.tree import Tree, grow, make_tree

__all__ = ["DecodeStats", "Plan", "run", "keep_tokens", "append_tokens"]

source_clock = time.perf_counter  # times each draft source's propose (SourceGate); tests swap in a scripted clock


@dataclass
class DecodeStats:
    """What one decode call did.

    ``tau`` is the mean number of tokens emitted per forward pass (EAGLE's "+1" convention: greedy gives 1.0),
    averaged over rows; forward passes include the prefill, which produces the first token.
    """

    mode: str
    forward_passes: int = 0
    new_tokens: list[int] = field(default_factory=list)
    row_forwards: list[int] = field(default_factory=list)
    accept_hist: list[int] = field(default_factory=list)  # accept_hist[m]: steps where a row took m guesses
    drafted: int = 0  # guesses sent to verification (lossless) or taken (clp)
    fed_tokens: int = 0  # tokens fed by the decode steps (prefill excluded), over all rows
    wall_time_s: float = 0.0
    cost_model: dict | None = None  # adaptive speculation: the step-cost points used (after this call's updates)
    # per draft source: steps it was asked / skipped, its averaged propose seconds and gain (SourceGate), and
    # its own DraftSource.report()
    sources: list[dict] = field(default_factory=list)

    @property
    def tau(self) -> float:
        per_row = [n / f for n, f in zip(self.new_tokens, self.row_forwards) if f]
        return sum(per_row) / len(per_row) if per_row else 0.0

    @property
    def accepted(self) -> int:
        """Guesses kept over the whole call, all rows (``accept_hist[m]``: row-steps that kept ``m``)."""
        return sum(m * h for m, h in enumerate(self.accept_hist))

    def count_accepts(self, m: torch.Tensor) -> None:
        """One step's accepted guesses per row ``m [B]`` (-1: the row did not decode)."""
        for v in m.tolist():
            if v >= 0:
                self.accept_hist[v] += 1

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "forward_passes": self.forward_passes, "new_tokens": self.new_tokens, "tau": self.tau,
            "accept_hist": self.accept_hist, "drafted": self.drafted, "fed_tokens": self.fed_tokens,
            "wall_time_s": self.wall_time_s, "sources": self.sources,
            "tokens_per_s": sum(self.new_tokens) / self.wall_time_s if self.wall_time_s > 0 else 0.0,
        }


@dataclass
class Plan:
    """Everything one decode call runs with (built by :mod:`clp_fast.engine.api`)."""

    bb: object  # NativeBackbone
    cache: object  # StaticKVCache, empty
    input_ids: torch.Tensor  # [B, P] as given (left-padded)
    prompts: torch.Tensor  # [B, P] the real tokens left-aligned
    prompt_len: torch.Tensor  # [B]
    max_new_tokens: int
    eos: torch.Tensor | None  # EOS ids
    pad_token_id: int
    verifier: object  # clp_fast.engine.verify.*Verifier
    sources: list[DraftSource]
    speculator: Speculator
    criteria: list = field(default_factory=list)  # stopping criteria: (ids [R, L], None) -> [R] bool
    streamer: object = None
    width: int = 0  # the deepest guess any source proposes

    @property
    def path_hidden(self) -> bool:
        """Whether some source reads the committed tokens' hidden states."""
        return any(s.wants_path_hidden for s in self.sources)


@dataclass
class Rows:
    """Per-row state between forwards."""

    seq: torch.Tensor  # [B, P + G + width + 2] the left-padded prompt row, then the kept tokens (pad after)
    seq_len: torch.Tensor  # [B]
    produced: torch.Tensor  # [B] tokens kept
    done: torch.Tensor  # [B] bool
    forwards: torch.Tensor  # [B] forwards the row took part in (the prefill included)
    pending: torch.Tensor | None = None  # [B] the next token, not yet in the cache


def run(p: Plan, stats: DecodeStats) -> torch.Tensor:
    """Decode ``p`` to the end; returns ``[B, P + G]``: the input, then up to G kept tokens per row (pad after)."""
    rows = _start_rows(p)
    streaming.put_prompt(p.streamer, p.input_ids)
    try:
        prefill(p, rows, stats)
        while not bool(rows.done.all()):
            t_step = time.perf_counter()
            tries, without = draft(p, rows)
            active = finish_known(p, rows, tries, stats)
            if not bool(active.any()):
                break
            tree = choose(p, tries, active, without)
            t_fwd = time.perf_counter()
            hidden, new_k, new_v = p.bb.decode_step(tree.tokens, p.cache, tree.n_fed, tree.depth, tree.anc)
            best, verdict = p.verifier.verify(hidden, tree, rows.seq, rows.seq_len)  # [B]
            fed = int(tree.n_fed.sum())
            if hidden.device.type == "cpu":  # the forward and its logit rows, as the cost model measured them
                p.speculator.observe_forward(fed, time.perf_counter() - t_fwd)
            path, cnt, order = commit(p, rows, tree, best, new_k, new_v, active, stats)
            r = torch.arange(best.shape[0], device=best.device)
            p.speculator.observe_step(tree, tree.anc[r, best], active, int(cnt.sum()), time.perf_counter() - t_step)
            new = [path[b, :c].tolist() for b, c in enumerate(cnt.tolist())]
            path_hidden = torch.take_along_dim(hidden, order[..., None], dim=1) if p.path_hidden else None
            advance(p, rows, verdict, hidden[r, best], new, p.speculator.price(fed) if fed else None, path_hidden)
    finally:
        streaming.end(p.streamer)
    stats.new_tokens = rows.produced.tolist()
    stats.row_forwards = rows.forwards.tolist()
    stats.sources = [{"source": type(s).__name__, "kinds": list(s.kinds), **g, **s.report()}
                     for s, g in zip(p.sources, p.speculator.gate.summary())]
    return rows.seq[:, : p.input_ids.shape[1] + int(rows.produced.max())]


def _start_rows(p: Plan) -> Rows:
    B, P = p.input_ids.shape
    dev = p.input_ids.device
    seq = torch.full((B, P + p.max_new_tokens + p.width + 2), p.pad_token_id, dtype=torch.long, device=dev)
    seq[:, :P] = p.input_ids
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    return Rows(seq, torch.full((B,), P, dtype=torch.long, device=dev), zeros.clone(),
                torch.zeros(B, dtype=torch.bool, device=dev), torch.ones_like(zeros))


def prefill(p: Plan, rows: Rows, stats: DecodeStats) -> None:
    """Run the unpadded prompts ``[B, P]``, commit them from slot 0, choose each row's first token at its last
    prompt position and show the sources the prompts."""
    hidden, new_k, new_v = p.bb.forward(p.prompts, p.cache, p.prompt_len)  # [B, P, H]
    backend.commit_kv_span_(p.cache.k, p.cache.v, new_k, new_v, p.cache.lengths, p.prompt_len)
    p.cache.lengths += p.prompt_len
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), p.prompt_len - 1]  # [B, H]
    verdict = p.verifier.first(last, rows.seq, rows.seq_len)
    stats.forward_passes = 1
    prompts = [p.prompts[b, :n].tolist() for b, n in enumerate(p.prompt_len.tolist())]
    advance(p, rows, verdict, last, prompts, None, hidden if p.path_hidden else None)


def advance(p: Plan, rows: Rows, verdict, hidden: torch.Tensor, new: list[list[int]], price: float | None,
            path_hidden: torch.Tensor | None = None) -> None:
    """The next pending tokens ``[B]``; every source learns the step (``hidden [B, H]`` at the accepted nodes,
    ``path_hidden [B, N, H]`` at the ``new`` tokens where a source asked for them)."""
    rows.pending = verdict.pending
    acc = Accepted(verdict.pending, verdict.conf, hidden, new, (~rows.done).tolist(), verdict.head_rows,
                   p.speculator.speculating(), price, path_hidden)
    for src in p.sources:
        src.advance(acc)


def draft(p: Plan, rows: Rows) -> tuple[list[tuple], dict[int, list[tuple]]]:
    """Per row, its tree ``(tokens, parents, priors, kinds)`` grown from every source's proposals up to the
    row's cap (empty lists for finished rows); and, for each source the speculator prices
    (:class:`clp_fast.engine.speculation.SourceGate`), the trees grown without it. Sources the gate does not
    ask this step propose nothing."""
    live = ~rows.done
    caps = p.speculator.caps(p.max_new_tokens - rows.produced, live)
    live_l, pending = live.tolist(), rows.pending.tolist()
    gate, none = p.speculator.gate, [[] for _ in live_l]
    proposals = []  # [source][row] -> list of proposals
    p.speculator.held = []
    for i, src in enumerate(p.sources):
        if not gate.asks(i):
            proposals.append(none)
            p.speculator.held += [p.speculator.kinds.index(k) for k in src.kinds]
            continue
        t = source_clock()
        proposals.append(src.propose(live_l))
        gate.paid(i, source_clock() - t)
    factors = p.speculator.factors(len(live_l))

    def trees(drop: int = -1) -> list[tuple]:
        return [grow(pending[b], [pr for i, per_src in enumerate(proposals) if i != drop for pr in per_src[b]],
                     p.speculator.kinds, factors[b], caps[b]) if live_l[b] else ([], [], [], [])
                for b in range(len(live_l))]

    forward = p.speculator.price(max(1, sum(live_l))) or 0.0
    return trees(), {i: trees(i) for i, pr in enumerate(proposals) if pr is not none and gate.priced(i, forward)}


def finish_known(p: Plan, rows: Rows, tries: list[tuple], stats: DecodeStats) -> torch.Tensor:
    """Rows whose remaining output is already known need no forward: the pending token (or, unverified, the
    whole chain) reaches the budget or holds an EOS. They keep it and finish; returns the rows that decode."""
    live = ~rows.done
    dev = live.device
    n_known = torch.tensor([len(t[0]) if p.verifier.unverified else min(len(t[0]), 1) for t in tries], device=dev)
    K = max(1, int(n_known.max()))
    chain = torch.tensor([(t[0] + [0] * K)[:K] for t in tries], dtype=torch.long, device=dev)  # [B, K]
    known = live & (p.max_new_tokens - rows.produced <= n_known)
    if p.eos is not None:
        j = torch.arange(K, device=dev)[None]
        known |= live & (torch.isin(chain, p.eos) & (j < n_known[:, None])).any(-1)
    if bool(known.any()):
        cnt, _ = keep_tokens(p, rows, chain, torch.where(known, n_known, 0))
        _emit(p, rows, chain, cnt)
        if p.verifier.unverified:
            stats.count_accepts(torch.where(known, n_known - 1, -1))
        rows.done |= known
    return ~rows.done


def choose(p: Plan, tries: list[tuple], active: torch.Tensor, without: dict[int, list[tuple]] | None = None
           ) -> Tree:
    """The nodes this step feeds: the cost model's choice over the decoding rows' trees, as a padded tree; each
    priced source is weighed against the choice ``without`` its guesses."""
    act = active.tolist()
    tries = [t if a else ([], [], [], []) for t, a in zip(tries, act)]
    chosen, choice = p.speculator.select(tries)
    for i, alt in (without or {}).items():
        p.speculator.weigh(i, choice, [t if a else ([], [], [], []) for t, a in zip(alt, act)])
    if p.speculator.adaptive:
        expected = dict(zip(p.speculator.kinds, choice["by_source"]))
        for src in p.sources:
            src.chosen(expected, choice["expected"])
    return make_tree(chosen, active.device)


def commit(p: Plan, rows: Rows, tree: Tree, best: torch.Tensor, new_k, new_v, active: torch.Tensor,
           stats: DecodeStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's accepted path (root to ``best [B]``) up to budget, EOS and stopping criteria; commit its
    K/V at the row's offset. Returns the path tokens ``[B, T]`` (root first), the kept counts ``[B]`` and the
    node order that lists the path first ``[B, T]``."""
    r = torch.arange(best.shape[0], device=best.device)
    m = tree.depth[r, best]  # guesses accepted
    stats.forward_passes += 1
    stats.fed_tokens += int(tree.n_fed.sum())
    stats.drafted += int((tree.n_fed - 1).clamp(min=0).sum())
    stats.count_accepts(torch.where(active, m, -1))
    rows.forwards += active.long()
    on_path = tree.anc[r, best]  # [B, T]; parents precede children, so the path in index order is root first
    order = torch.sort((~on_path).to(torch.uint8), dim=1, stable=True).indices
    path = tree.tokens.gather(1, order)
    cnt, stopped = keep_tokens(p, rows, path, torch.where(active, 1 + m, 0))
    sel = order[None, :, None, :, None]
    backend.commit_kv_span_(p.cache.k, p.cache.v, torch.take_along_dim(new_k, sel, dim=3),
                            torch.take_along_dim(new_v, sel, dim=3), p.cache.lengths, cnt)
    p.cache.lengths += cnt
    _emit(p, rows, path, cnt)
    rows.done |= (stopped & active) | (rows.produced >= p.max_new_tokens)
    return path, cnt, order


def keep_tokens(p: Plan, rows: Rows, path: torch.Tensor, n_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of each row's tokens ``path [B, T]`` (first ``n_path[b]`` real) are kept, and whether the row
    stops: cut at the budget, just after the first EOS, and just after the first token at which a stopping
    criterion fires (checked on the row's full sequence so far). Writes the kept tokens into ``rows.seq`` after
    ``seq_len`` (not advanced). Returns (count ``[B]``, stopped ``[B]`` bool)."""
    T = path.shape[1]
    remaining = p.max_new_tokens - rows.produced
    count = torch.minimum(n_path, remaining)
    stopped = (n_path > 0) & (n_path >= remaining)
    if p.eos is not None:
        j = torch.arange(T, device=path.device)[None]
        is_eos = torch.isin(path, p.eos) & (j < count[:, None])
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(count, T))
        count = torch.minimum(count, first + 1)
        stopped |= is_eos.any(-1)
    append_tokens(rows.seq, rows.seq_len.clone(), path, count)
    for j in range(int(count.max()) if p.criteria else 0):
        _criteria_at(p, rows, j, count, stopped)
    return count, stopped


def _criteria_at(p: Plan, rows: Rows, j: int, count: torch.Tensor, stopped: torch.Tensor) -> None:
    """Stopping criteria after each row's ``j``-th kept token, rows of one length together; a firing row keeps
    ``j + 1`` tokens and stops (mutates ``count``, ``stopped``)."""
    idx = (j < count).nonzero().flatten()
    lens = rows.seq_len[idx] + j + 1
    for L in lens.unique().tolist():
        r = idx[lens == L]
        fire = torch.zeros(r.numel(), dtype=torch.bool, device=count.device)
        for crit in p.criteria:
            fire |= crit(rows.seq[r, :L], None).to(fire.device)
        count[r[fire]] = j + 1
        stopped[r[fire]] = True


def _emit(p: Plan, rows: Rows, path: torch.Tensor, cnt: torch.Tensor) -> None:
    """The kept tokens (already in ``rows.seq``) become part of each row; stream them."""
    rows.seq_len += cnt
    rows.produced += cnt
    streaming.put_tokens(p.streamer, path, cnt)


def append_tokens(out: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor, cnt: torch.Tensor) -> None:
    """Copy row b's first ``cnt[b]`` of ``tokens [B, T]`` to ``out[b, at[b]:]``; advances ``at`` (mutated)."""
    T = tokens.shape[1]
    j = torch.arange(T, device=tokens.device)[None]
    keep = j < cnt[:, None]
    cols = (at[:, None] + j).clamp(max=out.shape[1] - 1)
    r = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand(-1, T)
    out[r[keep], cols[keep]] = tokens[keep]
    at += cnt
