"""Retrieval drafts: a datastore of the code on this machine (REST) and of the process's own outputs
(SuffixDecoding), offered beside the heads and prompt lookup.

The store (corpus, index, files) is :mod:`clp_fast.drafts.corpus`. Per live row and step the source proposes,
from the longest match of the row's context in it (at least :data:`MIN_MATCH` tokens), a small trie: out of up
to :data:`SAMPLE` occurrences' continuations, the :data:`N_BRANCHES` most frequent first tokens, each followed
by its most frequent continuation up to ``width`` tokens (kind ``"datastore"``). A node's prior is the
calibrated acceptance (:data:`DATASTORE_CALIBRATION`) of its depth and its support ``k / (n + 1)`` (``k`` of the
``n`` sampled occurrences through its parent continue with it). Kind ``"outputs"``: the continuation of an
earlier occurrence of the context's last :data:`OUT_NGRAM` tokens in what the model wrote before, in this
call's other rows or in earlier calls (:class:`OutputStore`, bounded, process-wide per model), with prompt
lookup's calibrated rates.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from pathlib import Path

from clp_fast.drafts.base import Accepted, Branch, DraftSource, Proposal
from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.drafts.corpus import (  # noqa: F401  (re-exported: the store's names, for callers of this module)
    MAX_MATCH,
    MIN_MATCH,
    N_BRANCHES,
    SAMPLE,
    SORT_DEPTH,
    Datastore,
    DatastoreError,
    open_or_build,
    suffix_array,
    top_branches,
    vocab_id,
)

__all__ = ["Datastore", "DatastoreError", "DatastoreSource", "OutputStore", "suffix_array", "open_or_build",
           "datastore_source", "outputs_source", "datastore_factory", "DATASTORE_CALIBRATION"]

OUT_NGRAM = 3  # the online store's key: the context's last 3 tokens

# Acceptance of a datastore guess given its parent's, by support bin ``k / (n + 1)`` (edges 0, 0.1, ..., 1): depth 1,
# then depths 2..8 pooled (too few deeper guesses to tell apart). Measured by ``bench/calibrate_datastore.py
# --prompts 8 --new-tokens 48``: Qwen2.5-Coder-0.5B bf16 greedy continuations of 8 windows of clp_fast's own sources
# (not in the corpus), 376 steps; 725 depth-1 guesses tried (a right one among the branches in 29.5 % of steps), 168
# deeper ones. Laplace-smoothed (hit + 0.5) / (tried + 1); a small sample: rates between bins are noisy.
DATASTORE_CALIBRATION: TreeCalibration | None = TreeCalibration(
    (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-6),
    ((0.031, 0.074, 0.102, 0.12, 0.183, 0.265, 0.288, 0.528, 0.738, 0.974),
     (0.031, 0.114, 0.017, 0.05, 0.227, 0.346, 0.3, 0.685, 0.864, 0.962)), default=False)


@functools.lru_cache(maxsize=4)
def _store_for(model_path: str) -> Datastore:
    """The store of the tokenizer beside a model folder, opened (or built) once per process."""
    from clp_fast.models.hub import _load_tokenizer

    tok = _load_tokenizer(model_path) if model_path and Path(model_path).is_dir() else None
    if tok is None:
        raise ValueError(f"datastore: no tokenizer beside the model ({model_path!r}); pass "
                         f"drafts=[datastore_factory(tokenizer)] instead of the name")
    return open_or_build(tok)


# --------------------------------------------------------------------------------------- online outputs
class OutputStore:
    """What the model wrote, for the next rows and calls (SuffixDecoding's online tree, as n-gram pointers).

    Each decoded row's token list is kept by reference (it grows as the row decodes); ``index`` maps every
    :data:`OUT_NGRAM`-gram of the output to its latest positions, and a continuation is read from the list when
    asked for, so a row's guesses can come from another row of the same batch a step after it wrote them.
    Bounded: past ``max_tokens`` kept tokens the least recently used sequences go, with their index entries.
    """

    PER_KEY = 8  # positions kept per n-gram (the latest)

    def __init__(self, max_tokens: int = 200_000):
        self.max_tokens = max_tokens
        self.seqs: OrderedDict[int, tuple[list[int], int]] = OrderedDict()  # id -> (tokens, first output index)
        self.indexed: dict[int, int] = {}  # id -> positions indexed so far
        self.index: dict[tuple, list[tuple[int, int]]] = {}
        self.kept, self._next = 0, 0

    def add(self, tokens: list[int], start: int) -> int:
        """Track a row's token list (read by reference); outputs begin at index ``start``. Returns its id."""
        sid, self._next = self._next, self._next + 1
        self.seqs[sid] = (tokens, start)
        self.indexed[sid] = max(start, OUT_NGRAM)
        return sid

    def update(self, sid: int) -> None:
        """Index the n-grams of sequence ``sid`` written since the last call; evict past the bound."""
        if sid not in self.seqs:
            return
        toks, _ = self.seqs[sid]
        for i in range(self.indexed[sid], len(toks) + 1):
            ent = self.index.setdefault(tuple(toks[i - OUT_NGRAM:i]), [])
            ent.append((sid, i))
            del ent[: -self.PER_KEY]
        self.kept += len(toks) + 1 - self.indexed[sid]
        self.indexed[sid] = len(toks) + 1
        while self.kept > self.max_tokens and len(self.seqs) > 1:
            self._evict(next(iter(self.seqs)))

    def _evict(self, sid: int) -> None:
        toks, start = self.seqs.pop(sid)
        end = self.indexed.pop(sid)
        for i in range(max(start, OUT_NGRAM), end):
            key = tuple(toks[i - OUT_NGRAM:i])
            ent = [e for e in self.index.get(key, []) if e[0] != sid]
            if ent:
                self.index[key] = ent
            else:
                self.index.pop(key, None)
        self.kept -= end - max(start, OUT_NGRAM)

    def propose(self, context: list[int], width: int) -> tuple[list[int], float]:
        """The longest (then latest) continuation, up to ``width``, of an earlier occurrence of ``context``'s last
        n-gram whose first token is the most frequent among its occurrences, and that token's share; else
        ``([], 0.0)``."""
        ent = self.index.get(tuple(context[-OUT_NGRAM:])) if len(context) >= OUT_NGRAM else None
        if not ent:
            return [], 0.0
        conts = [(sid, self.seqs[sid][0][i:i + width]) for sid, i in reversed(ent) if sid in self.seqs]
        conts = [(sid, c) for sid, c in conts if c]
        if not conts:
            return [], 0.0
        firsts = Counter(c[0] for _, c in conts)
        tok, k = firsts.most_common(1)[0]
        sid, best = max(((s, c) for s, c in conts if c[0] == tok), key=lambda e: len(e[1]))  # longest, then latest
        self.seqs.move_to_end(sid)
        return best, k / len(conts)


_OUTPUTS: dict[tuple, OutputStore] = {}


def shared_outputs(model) -> OutputStore:
    """The process-wide :class:`OutputStore` of a model (by its path and vocabulary size)."""
    key = (str(getattr(model.config, "_name_or_path", "")), int(model.config.vocab_size))
    return _OUTPUTS.setdefault(key, OutputStore())


# ---------------------------------------------------------------------------------------------- the source
class DatastoreSource(DraftSource):
    """Guesses retrieved from the corpus store (kind ``"datastore"``) and from earlier outputs (``"outputs"``).

    Args:
        store: an opened :class:`Datastore` (None: outputs only).
        outputs: an :class:`OutputStore` (None: corpus only); shared across calls, it learns this call's rows.
        width: deepest guess (tokens per branch).
        calib: the datastore guesses' acceptance per depth and support (default :data:`DATASTORE_CALIBRATION`,
            else the support itself).
        lookup: rates per depth for the outputs' guesses (prompt lookup's, :class:`TreeCalibration`).
    """

    kinds = ("datastore", "outputs")

    def __init__(self, store: Datastore | None, outputs: OutputStore | None = None, width: int = 8,
                 calib: TreeCalibration | None = None, lookup: TreeCalibration | None = None,
                 branches: int = N_BRANCHES):
        if width < 1:
            raise ValueError(f"datastore width={width!r} must be >= 1")
        self.store, self.outputs, self.max_depth, self.branches = store, outputs, width, branches
        self.calib = calib or DATASTORE_CALIBRATION
        self.lookup = lookup or TreeCalibration.uncalibrated(1)
        self.contexts: list[list[int]] = []
        self.ids: list[int] = []
        self.pending: list[int] = []
        self.last: list[list[Proposal]] = []  # per row, the branches proposed in the step just verified
        self.steps: Counter = Counter()  # per kind: row-steps it proposed in
        self.accepted: Counter = Counter()  # per kind: accepted guesses one of its branches held (shared credit)

    def _credit(self, new_tokens: list[list[int]]) -> None:
        """Per kind, the accepted guesses (a row's new tokens after its pending one) its branches held."""
        for props, new in zip(self.last, new_tokens):
            for kind in {p.kind for p in props}:
                self.steps[kind] += 1
                self.accepted[kind] += max(_common_prefix(p.tokens, new[1:]) for p in props if p.kind == kind)

    def advance(self, acc: Accepted) -> None:
        self._credit(acc.new_tokens)
        self.last = []
        if not self.contexts:
            self.contexts = [list(new) for new in acc.new_tokens]
            if self.outputs is not None:
                self.ids = [self.outputs.add(ctx, len(ctx)) for ctx in self.contexts]
        else:
            for ctx, new in zip(self.contexts, acc.new_tokens):
                ctx += new
        if self.outputs is not None:
            for sid in self.ids:
                self.outputs.update(sid)
        self.pending = acc.pending.tolist()

    def report(self) -> dict:
        """Per kind: row-steps it proposed in and accepted guesses its branches held."""
        return {"by_kind": {k: {"steps": self.steps[k], "accepted": self.accepted[k]} for k in self.kinds}}

    def propose(self, live: list[bool]) -> list[list[Proposal]]:
        self.last = [self._row(b) if ok else [] for b, ok in enumerate(live)]
        return self.last

    def _prior(self, depth: int, support: float) -> float:
        return self.calib.rate(depth, support) if self.calib is not None else support

    def _row(self, b: int) -> list[Proposal]:
        ctx = self.contexts[b] + [self.pending[b]]
        out: list[Proposal] = []
        if self.store is not None:
            for toks, sup in self.store.propose(ctx, self.max_depth, self.branches):
                out.append(Branch(toks, [self._prior(d + 1, s) for d, s in enumerate(sup)], "datastore"))
        if self.outputs is not None:
            toks, share = self.outputs.propose(ctx, self.max_depth)
            if toks:
                out.append(Branch(toks, [self.lookup.lookup_rate(d + 1) * (share if d == 0 else 1.0)
                                         for d in range(len(toks))], "outputs"))
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def datastore_factory(tok=None, *, store: Datastore | None = None, outputs: bool = True, width: int = 8):
    """A ``generate(..., drafts=[...])`` factory for the datastore of tokenizer ``tok`` (built on first use) or
    an opened ``store``; with the model's shared :class:`OutputStore` unless ``outputs=False``. The sources it
    made are kept in ``factory.sources`` (their ``steps`` / ``accepted`` counters per kind)."""
    if store is None:
        if tok is None:
            raise ValueError("datastore_factory needs a tokenizer or an opened store")
        store = open_or_build(tok)

    def factory(bb, heads, calib):
        src = DatastoreSource(store, shared_outputs(bb.model) if outputs else None, width, lookup=calib)
        factory.sources.append(src)  # the bench reads their per-kind acceptance
        return src
    factory.sources = []
    return factory


def datastore_source(bb, heads, calib) -> DatastoreSource:
    """Registered as ``"datastore"``: the store of the model's own tokenizer (found beside the model; built on
    first use) and the model's shared output store."""
    model = bb.model
    store = _store_for(str(getattr(model.config, "_name_or_path", "")))
    return DatastoreSource(store, shared_outputs(model), lookup=calib)


def outputs_source(bb, heads, calib) -> DatastoreSource:
    """Registered as ``"outputs"``: the model's shared output store alone (no corpus)."""
    return DatastoreSource(None, shared_outputs(bb.model), lookup=calib)
