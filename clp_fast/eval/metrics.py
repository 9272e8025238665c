"""Speed and quality metrics of decoding runs: τ, seq-rep-n, exact match, first divergence, ratios.

Pure Python over plain lists (token ids as ``list[int]``, times as floats), so the benchmark and
the tests share one definition of every number it prints. Sequences are the *generated* ids
only (prompt removed), cut after the first EOS, the way :func:`generated_ids` returns them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = [
    "accept_histogram",
    "exact_match",
    "first_divergence",
    "generated_ids",
    "mean_first_divergence",
    "median_ratio",
    "seq_rep_n",
    "mean_seq_rep_n",
    "tau",
    "throughput_ratio",
]


def _field(stats, name: str):
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)


def tau(stats) -> float:
    """Mean tokens emitted per forward pass, pooled over rows and calls.

    ``stats`` is a :class:`~clp_fast.decode.DecodeStats`, its ``to_dict()``, or a list of either.
    Pooled means ``sum(new_tokens) / sum(row_forwards)`` over every row of every call, so a long
    sequence weighs more than a short one (``DecodeStats.tau`` instead averages per-row ratios;
    the two agree for one row). A dict without ``row_forwards`` must hold a single row, whose
    forward count is then ``forward_passes``. Greedy decoding gives 1.0; the prefill counts as a
    forward, as it produces the first token. Returns 0.0 when nothing was decoded.
    """
    items = stats if isinstance(stats, (list, tuple)) else [stats]
    tokens = forwards = 0
    for s in items:
        new = list(_field(s, "new_tokens"))
        rows = s.get("row_forwards") if isinstance(s, dict) else s.row_forwards
        if not rows:
            if len(new) != 1:
                raise ValueError(f"stats of {len(new)} rows need 'row_forwards' to compute tau")
            rows = [_field(s, "forward_passes")]
        if len(rows) != len(new):
            raise ValueError(f"{len(new)} rows of new_tokens but {len(rows)} of row_forwards")
        tokens += sum(new)
        forwards += sum(rows)
    return tokens / forwards if forwards else 0.0


def accept_histogram(stats) -> list[int]:
    """Element-wise sum of ``accept_hist`` over a list of stats (lists may differ in length)."""
    items = stats if isinstance(stats, (list, tuple)) else [stats]
    out: list[int] = []
    for s in items:
        hist = list(_field(s, "accept_hist"))
        out += [0] * (len(hist) - len(out))
        for i, v in enumerate(hist):
            out[i] += int(v)
    return out


def generated_ids(row: Sequence[int], prompt_len: int, eos: int | Sequence[int] | None = None,
                  n_new: int | None = None) -> list[int]:
    """The generated part of one output row ``[P + G]``: ids after ``prompt_len``, cut after the first EOS.

    ``n_new`` (e.g. ``DecodeStats.new_tokens[b]``) cuts it to that many tokens first; padding
    that ``generate`` adds after a finished row is removed by the EOS cut (or by ``n_new``).
    """
    ids = [int(t) for t in row[prompt_len:]]
    if n_new is not None:
        ids = ids[:n_new]
    if eos is not None:
        stop = {eos} if isinstance(eos, int) else set(eos)
        for i, t in enumerate(ids):
            if t in stop:
                return ids[: i + 1]
    return ids


def seq_rep_n(ids: Sequence[int], n: int = 4) -> float:
    """``1 - unique n-grams / n-grams`` of one sequence (Welleck et al., 2019); 0.0 if it has no n-gram.

    >>> seq_rep_n([1, 2, 1, 2, 1, 2], n=2)  # 5 bigrams, 2 distinct
    0.6
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_seq_rep_n(seqs: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean of :func:`seq_rep_n` over sequences (each sequence weighs the same); 0.0 for none."""
    return statistics.fmean(seq_rep_n(s, n) for s in seqs) if seqs else 0.0


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ; None if they are identical.

    If one is a strict prefix of the other, they diverge at the shorter one's length.
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def exact_match(seqs: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Fraction of pairs ``(seqs[i], refs[i])`` that are identical token for token."""
    if len(seqs) != len(refs):
        raise ValueError(f"{len(seqs)} sequences but {len(refs)} references")
    if not seqs:
        raise ValueError("exact_match of no sequences")
    return sum(first_divergence(s, r) is None for s, r in zip(seqs, refs)) / len(seqs)


def mean_first_divergence(seqs: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float | None:
    """Mean first-divergence position over the pairs that diverge; None if none does."""
    if len(seqs) != len(refs):
        raise ValueError(f"{len(seqs)} sequences but {len(refs)} references")
    pos = [d for d in (first_divergence(s, r) for s, r in zip(seqs, refs)) if d is not None]
    return statistics.fmean(pos) if pos else None


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over i of ``numerators[i] / denominators[i]`` (e.g. per-prompt tokens/s ratios)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    if not numerators:
        raise ValueError("median_ratio of no pairs")
    if any(d == 0 for d in denominators):
        raise ValueError(f"zero denominator in {list(denominators)}")
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def throughput_ratio(tokens: Sequence[int], times: Sequence[float], base_tokens: Sequence[int],
                     base_times: Sequence[float]) -> float:
    """``(sum(tokens) / sum(times)) / (sum(base_tokens) / sum(base_times))``.

    When both runs produce the same number of tokens this is the total-time ratio
    ``sum(base_times) / sum(times)``.
    """
    if sum(times) <= 0 or sum(base_times) <= 0 or sum(base_tokens) == 0:
        raise ValueError("throughput_ratio needs positive total times and base tokens")
    return (sum(tokens) / sum(times)) / (sum(base_tokens) / sum(base_times))
