"""Small-sample statistics for task quality: pass@1 with a Wilson interval, paired counts, McNemar's exact test.

Pure Python (no scipy): HumanEval has 164 problems, so exact binomial sums are cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mcnemar_exact", "paired_counts", "wilson_interval"]

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``passed / n`` (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n passes,
    which matters for pass@1 over tens of problems (0/10 -> 0.000 to 0.278).

    Raises:
        ValueError: ``n`` < 1 or ``passed`` outside ``0..n``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an int >= 1")
    if not isinstance(passed, int) or not 0 <= passed <= n:
        raise ValueError(f"passed={passed!r} must be an int in 0..{n}")
    p = passed / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> dict[str, int]:
    """Discordant and concordant pairs of two pass/fail vectors over the same problems.

    Returns ``{"a_only": a passed and b failed, "b_only": the reverse, "both": ..., "neither": ...}``.

    Raises:
        ValueError: the vectors differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired results need the same problems: {len(a)} vs {len(b)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b)]
    return {"a_only": pairs.count((True, False)), "b_only": pairs.count((False, True)),
            "both": pairs.count((True, True)), "neither": pairs.count((False, False))}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null hypothesis each discordant pair goes either way with probability 1/2, so
    ``p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``; 1.0 when there is no discordant pair.

    Raises:
        ValueError: a negative or non-integer count.
    """
    for name, v in (("b", b), ("c", c)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be an int >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
