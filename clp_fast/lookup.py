"""Drafts from the context itself (prompt-lookup decoding), offered beside the heads' drafts.

Code and much prose repeat spans of their own context (identifiers, signatures, docstring
phrases). When the last few tokens occurred before, the tokens that followed them then are a
free guess of what follows now. In lossless mode such guesses are verified like the heads' ones,
so they can only change speed, never the output.
"""

from __future__ import annotations

__all__ = ["lookup_continuation"]


def lookup_continuation(context: list[int], max_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the context's suffix.

    Tries suffix n-grams of ``max_ngram`` down to ``min_ngram`` tokens and returns, for the
    first size that occurred earlier, up to ``max_tokens`` tokens that followed its latest
    occurrence (possibly fewer, near the end of the context). Returns ``[]`` without a match.

    Args:
        context: token ids, oldest first; its last token is the one the guesses follow.
        max_tokens: the most guesses to return (``>= 0``).
        max_ngram, min_ngram: suffix sizes tried, longest first.

    Example: context ``[5, 6, 7, 9, 5, 6]`` with ``max_ngram=2`` → suffix ``[5, 6]`` occurred at 0,
    followed by ``[7, 9, 5, 6]`` → ``[7, 9]`` for ``max_tokens=2``.
    """
    if max_tokens <= 0:
        return []
    n = len(context)
    for g in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        suffix = context[n - g:]
        first = suffix[0]
        for start in range(n - g - 1, -1, -1):  # latest earlier occurrence first
            if context[start] == first and context[start:start + g] == suffix:
                return context[start + g:start + g + max_tokens]
    return []
