"""Adaptive speculation: which guesses each row feeds this step, from what they are expected to return and
what feeding them costs on this machine.

Every candidate node of every row's draft trie (prompt-lookup branches, the heads' chain) carries a
**prior**: the probability that it is the greedy token given that its parent is — a head guess's
calibrated confidence (:class:`clp_fast.drafts.calibration.TreeCalibration`, else its softmax probability), a lookup
guess's measured rate per depth. Each row corrects its priors per source by what it has recently accepted
(:class:`RowAcceptance`: a row of repetitive text accepts lookup guesses far above the prior, a row of
fresh code far below). A node's **expected return** ``e`` is the product of corrected priors along its
path. All nodes of all rows are then taken best first while the batch's expected tokens per second rises:

    rate(n) = (A + sum of the n best e) / cost(A + n)

with ``A`` the rows that decode this step (each emits its pending token for free) and ``cost`` the
measured forward time of ``A + n`` fed tokens (:class:`clp_fast.engine.cost.StepCost`). Where a fed token costs
more than it returns — a compute-bound batch — ``n`` falls to 0 and decoding is plain greedy; when rows
finish, ``A`` falls, the forward becomes cheap again and speculation comes back. Only speed depends on
this choice: lossless verification keeps the output greedy's.
"""

from __future__ import annotations

import torch

from clp_fast.engine.cost import StepCost
from clp_fast.engine.tree import Tree, corrected

__all__ = ["RowAcceptance", "SpeculationWorth", "SourceGate", "Speculator", "select_nodes", "SOURCES",
           "TREE_MAX_GUESSES"]

SOURCES = ("lookup", "heads", "lookup1")  # the built-in kinds of guess: 2/3-gram lookup, MTP heads, 1-gram lookup
TREE_MAX_GUESSES = 16  # most guesses one row's tree may grow in a step; the cost model usually stops well before
PRIOR_WEIGHT = 2.0  # strength of the prior in RowAcceptance, in expected accepted guesses
DECAY = 0.8  # per step: a row's acceptance history fades over ~5 steps
PROBE_EVERY = 8  # steps of the losing kind (greedy or speculation) before it is measured again
PRICED_SHARE = 0.02  # a source whose own time passes this share of a forward must pay for it (SourceGate)


class RowAcceptance:
    """Per row and source, accepted guesses over their priors' sum, both decayed per step: a factor on the
    priors, ``(PRIOR_WEIGHT + hits) / (PRIOR_WEIGHT + expected)``, clamped to ``[0.25, 2.5]``."""

    def __init__(self, batch: int, kinds: int = len(SOURCES)):
        self.kinds = kinds
        self.hits = torch.zeros(batch, kinds, dtype=torch.float64)
        self.expected = torch.zeros(batch, kinds, dtype=torch.float64)

    def factors(self) -> list[list[float]]:
        return ((PRIOR_WEIGHT + self.hits) / (PRIOR_WEIGHT + self.expected)).clamp(0.25, 2.5).tolist()

    def update(self, prior: torch.Tensor, src: torch.Tensor, parent_ok: torch.Tensor, ok: torch.Tensor,
               active: torch.Tensor, held: list[int] = ()) -> None:
        """After verification: ``prior``/``src [B, T]`` per fed node, ``parent_ok [B, T]`` whether its parent
        was accepted (the node was *tried*), ``ok [B, T]`` whether it was accepted; rows not ``active`` keep
        their history, and so do the ``held`` kinds (those of a source not asked this step: its record should
        not fade while it is not measured)."""
        tried = parent_ok.cpu()
        onehot = torch.nn.functional.one_hot(src.cpu().clamp(min=0), self.kinds).to(torch.float64)  # [B, T, S]
        onehot *= (tried & (src.cpu() >= 0))[..., None]
        exp = (onehot * prior.cpu().to(torch.float64)[..., None]).sum(1)
        hit = (onehot * ok.cpu()[..., None]).sum(1)
        live = active.cpu()[:, None].expand(-1, self.kinds).clone()
        live[:, list(held)] = False
        self.hits = torch.where(live, DECAY * self.hits + hit, self.hits)
        self.expected = torch.where(live, DECAY * self.expected + exp, self.expected)


class SpeculationWorth:
    """Whether speculating beats plain greedy (one token per row) at this batch, by realized speed.

    The cost model prices a step by its fed tokens, measured on one row against a short context; a ragged,
    left-padded batch also pays for attention over its padded context and for the tree's [B, T] layout, which
    it does not see: on mixed prose and code prompts at B = 16 lossless ran 1.23x transformers' greedy where
    greedy ran 1.59x (issue 26). So tokens committed per second are kept for the last ``WINDOW`` steps that fed
    guesses and the last ``WINDOW`` that did not (sums over the window: one speculative step that accepts nothing
    says little); the faster kind decodes, and the slower one is probed again every ``PROBE_EVERY`` steps
    (``4 * PROBE_EVERY`` while it loses by more than 25 %, so a clear winner pays for few probes). Decoding
    starts by speculating, as the cost model chooses, and probes greedy after ``FIRST_PROBE`` steps. Used for
    batches only: at batch 1 the cost model's own measurement is the right price, and an early greedy probe that
    wins while the guesses happen to miss would cost a short decode its speculation (measured: 1.39x vs 2.09x).
    """

    WINDOW, FIRST_PROBE = 8, 3

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # off: always speculate as the cost model says (a fixed model, e.g. in tests)
        self.steps: dict[bool, list[tuple[int, float]]] = {True: [], False: []}  # (tokens, seconds), newest last
        self.since_loser = 0

    def rate(self, speculated: bool) -> float | None:
        """Tokens per second over the window of steps of that kind; None before the first."""
        steps = self.steps[speculated]
        return sum(t for t, _ in steps) / sum(s for _, s in steps) if steps else None

    def want(self) -> bool:
        """Speculate in the next step?"""
        spec, greedy = self.rate(True), self.rate(False)
        if not self.enabled or spec is None:
            return True
        if greedy is None:  # not measured yet: a few speculative steps, then one greedy step
            return self._pick(True, self.FIRST_PROBE)
        margin = max(spec, greedy) / max(min(spec, greedy), 1e-9)
        return self._pick(spec >= greedy, PROBE_EVERY * (4 if margin > 1.25 else 1))

    def winning(self) -> bool:
        """Whether speculation is (as far as measured) the faster kind: where it is not, the next steps are
        greedy and their guesses would go unused, so the heads need not run."""
        spec, greedy = self.rate(True), self.rate(False)
        return not self.enabled or spec is None or greedy is None or spec >= greedy

    def _pick(self, winner: bool, every: int) -> bool:
        """``winner``, except once every ``every`` steps the other kind (a probe)."""
        self.since_loser += 1
        if self.since_loser > every:
            self.since_loser = 0
            return not winner
        return winner

    def observe(self, speculated: bool, tokens: int, seconds: float) -> None:
        """One step: whether it fed any guess, the tokens it committed over all rows, its wall time."""
        if tokens < 1 or not seconds > 0:
            return
        steps = self.steps[speculated]
        steps.append((tokens, seconds))
        del steps[: -self.WINDOW]


class SourceGate:
    """Whether each draft source pays for its own time: the drafter's layer steps and LM-head passes cost
    ~20 % of a bf16 forward on the 2-core CPU, which the forward's cost model does not see.

    The loop times every source's ``propose`` (a source that defers work, as the drafter's catch-up over the
    committed pairs, pays it there) and keeps a moving average ``c``. A source whose ``c`` passes
    ``PRICED_SHARE`` of the step's forward is *priced*: the step's trees are grown a second time without its
    proposals and the cost model chooses in both, so its worth is

        gain = (E / (C + c)) / rate_without

    with ``E`` the expected tokens and ``C`` the forward's price of the choice with it. A source whose averaged
    gain falls below 1 is asked for guesses only once every ``PROBE_EVERY`` steps (``4 * PROBE_EVERY`` below
    0.8), which measures it again; steps it is not asked cost it nothing. Only speed depends on this.
    """

    ALPHA = 0.25  # weight of the newest step in the moving averages

    def __init__(self, sources: int, enabled: bool = True):
        self.enabled = enabled
        self.seconds: list[float | None] = [None] * sources  # averaged seconds per propose
        self.gain: list[float | None] = [None] * sources
        self.since = [0] * sources
        self.asked = [0] * sources  # steps it was asked for guesses
        self.skipped = [0] * sources

    def asks(self, i: int) -> bool:
        """Ask source ``i`` for this step's guesses?"""
        g = self.gain[i]
        ask = not self.enabled or g is None or g >= 1.0
        if not ask:
            self.since[i] += 1
            if self.since[i] >= PROBE_EVERY * (4 if g < 0.8 else 1):
                self.since[i], ask = 0, True
        self.asked[i] += ask
        self.skipped[i] += not ask
        return ask

    def paid(self, i: int, seconds: float) -> None:
        c = self.seconds[i]
        self.seconds[i] = seconds if c is None else (1 - self.ALPHA) * c + self.ALPHA * seconds

    def priced(self, i: int, forward_seconds: float) -> bool:
        """Whether source ``i`` costs enough beside a forward of ``forward_seconds`` to be weighed."""
        c = self.seconds[i]
        return self.enabled and c is not None and c > PRICED_SHARE * forward_seconds

    def observe(self, i: int, with_it: dict, rate_without: float, forward_seconds: float) -> None:
        """One step's choice with source ``i`` (:func:`select_nodes`' info, its forward priced at
        ``forward_seconds``) against the best rate without it."""
        gain = with_it["expected"] / (forward_seconds + self.seconds[i]) / max(rate_without, 1e-12)
        g = self.gain[i]
        self.gain[i] = gain if g is None else (1 - self.ALPHA) * g + self.ALPHA * gain

    def summary(self) -> list[dict]:
        return [{"asked": a, "skipped": s, "propose_s": c, "gain": g}
                for a, s, c, g in zip(self.asked, self.skipped, self.seconds, self.gain)]


def _expected_returns(rows: list[tuple], factors: list[list[float]]) -> list[list[float]]:
    """Per row, per node, the product of corrected priors along its path (node 0, the pending token: 1)."""
    out = []
    for (toks, pars, prior, src), f in zip(rows, factors):
        e = [1.0] * len(toks)
        for i in range(1, len(toks)):
            e[i] = e[pars[i]] * corrected(prior[i], f[src[i]])
        out.append(e)
    return out


def select_nodes(rows: list[tuple], factors: list[list[float]], cost: StepCost, cap: int | None = None
                 ) -> tuple[list[tuple], dict]:
    """Prune every row's trie ``(tokens, parents, priors, sources)`` to the nodes that maximise the batch's
    expected tokens per second (module docstring). Rows with no nodes are not decoding.

    Args:
        rows: per row the trie as lists, node 0 the pending token, parents before children.
        factors: :meth:`RowAcceptance.factors`.
        cost: forward seconds against fed tokens.
        cap: at most this many tokens fed over the batch (None: no cap beyond the tries themselves).

    Returns:
        the pruned rows (same layout, parents remapped) and ``{"fed", "expected", "rate", "by_source"}`` of the
        choice (``by_source``: expected accepted guesses per kind, in the order of the sources' indices).
    """
    e = _expected_returns(rows, factors)
    A = sum(1 for toks, *_ in rows if toks)
    # best first; equal returns by row then node index, so a parent (lower index) precedes its child
    cands = sorted((-ei, b, i) for b, eb in enumerate(e) for i, ei in enumerate(eb) if i > 0)
    limit = len(cands) if cap is None else max(0, min(len(cands), cap - A))
    best_n, best_rate, gained = 0, A / cost(max(A, 1)), 0.0
    for n in range(1, limit + 1):
        gained += -cands[n - 1][0]
        rate = (A + gained) / cost(A + n)
        if rate > best_rate:
            best_n, best_rate = n, rate
    keep = [set() for _ in rows]
    for _, b, i in cands[:best_n]:
        keep[b].add(i)
    pruned = []
    for (toks, pars, prior, src), kb in zip(rows, keep):
        if not toks:
            pruned.append(([], [], [], []))
            continue
        idx = [0] + sorted(kb)
        new = {old: j for j, old in enumerate(idx)}
        pruned.append(([toks[i] for i in idx], [new[pars[i]] if i else 0 for i in idx],
                       [prior[i] for i in idx], [src[i] for i in idx]))
    by_source = [0.0] * (len(factors[0]) if factors else len(SOURCES))
    for ne, b, i in cands[:best_n]:
        by_source[rows[b][3][i]] -= ne
    return pruned, {"fed": A + best_n, "expected": A + sum(by_source), "rate": best_rate, "by_source": by_source}


class Speculator:
    """Which guesses each step feeds, over the batch: per-row caps, the cost model's choice, what it learns.

    Adaptive (``cost`` measured): each row's tree is grown up to its cap, then :func:`select_nodes` keeps the
    nodes that raise the batch's expected tokens per second, with priors corrected by each row's acceptance
    (:class:`RowAcceptance`); a batch also compares realized speed with plain greedy steps
    (:class:`SpeculationWorth`). Fixed (``StepCost.flat()``): every grown guess is fed, each row capped at
    ``max(1, max_step_tokens // rows - 1)`` guesses. Unverified guesses (clp mode) are fed as proposed.

    Args:
        kinds: every kind of guess the sources propose, in the loop's order.
        batch: rows.
        cost: the forward's cost model.
        max_step_tokens: adaptive: at most this many tokens fed per forward over the batch; fixed: the per-row
            cap above; None or 0: no cap.
        adaptive: learn acceptance and speed (False: ``cost`` decides alone, nothing is learned).
    """

    def __init__(self, kinds: list[str], batch: int, cost: StepCost, max_step_tokens: int | None = None,
                 adaptive: bool = True, sources: int = 0):
        self.kinds, self.cost, self.adaptive, self.max_step_tokens = kinds, cost, adaptive, max_step_tokens or None
        self.gate = SourceGate(sources, enabled=adaptive)
        self.held: list[int] = []  # this step's kinds of the sources the gate did not ask
        self.acceptance = RowAcceptance(batch, len(kinds)) if adaptive else None
        # The cost model was measured on one row: it prices a single row right, a ragged batch not always. A fixed
        # model (tests) decides alone.
        self.worth = SpeculationWorth(enabled=cost.learn and batch > 1) if adaptive else None

    def caps(self, remaining: torch.Tensor, live: torch.Tensor) -> list[int]:
        """Most guesses per row this step ``[B]``: never past the row's budget."""
        cap = (remaining - 1).clamp(min=0, max=TREE_MAX_GUESSES)
        if not self.adaptive and self.max_step_tokens:
            cap = cap.clamp(max=max(1, self.max_step_tokens // max(int(live.sum()), 1) - 1))
        if self.adaptive and not self.worth.want():  # greedy is faster at this batch: the pending tokens alone
            cap = torch.zeros_like(cap)
        return cap.tolist()

    def factors(self, batch: int) -> list[list[float]]:
        return self.acceptance.factors() if self.adaptive else [[1.0] * len(self.kinds)] * batch

    def select(self, tries: list[tuple]) -> tuple[list[tuple], dict]:
        return select_nodes(tries, self.factors(len(tries)), self.cost, self.max_step_tokens if self.adaptive else None)

    def weigh(self, i: int, choice: dict, without: list[tuple]) -> None:
        """Price source ``i`` (:class:`SourceGate`): ``choice`` was made with its guesses, ``without`` are the
        step's trees grown without them."""
        _, alt = self.select(without)
        self.gate.observe(i, choice, alt["rate"], self.cost(choice["fed"]))

    def speculating(self) -> bool:
        """Whether guesses are (as far as measured) worth feeding next step."""
        return self.worth.winning() if self.adaptive else True

    def price(self, fed: int) -> float | None:
        """The cost model's seconds for a forward of ``fed`` tokens (adaptive only)."""
        return self.cost(fed) if self.adaptive else None

    def observe_forward(self, fed: int, seconds: float) -> None:
        if self.adaptive:
            self.cost.observe(fed, seconds)

    def observe_step(self, tree: Tree, on_path: torch.Tensor, active: torch.Tensor, committed: int,
                     seconds: float) -> None:
        """After a step: which fed nodes were tried and accepted (``on_path [B, T]``), tokens committed, time."""
        if not self.adaptive:
            return
        node = torch.arange(tree.tokens.shape[1], device=tree.tokens.device)[None]
        fed = (node < tree.n_fed[:, None]) & (node > 0)
        self.acceptance.update(tree.prior, tree.src, on_path.gather(1, tree.parent) & fed, on_path & fed, active,
                               self.held)
        self.worth.observe(bool((tree.n_fed > 1).any()), committed, seconds)
