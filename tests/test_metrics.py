"""clp_fast.eval.metrics against values computed by hand (the numbers in each comment)."""

from __future__ import annotations

import pytest

from clp_fast.engine import DecodeStats
from clp_fast.eval import metrics


def test_tau_single_row_and_pooled():
    # greedy: 8 tokens from 8 forwards (prefill included) -> 1.0
    assert metrics.tau(DecodeStats("greedy", forward_passes=8, new_tokens=[8], row_forwards=[8])) == 1.0
    # one row: 10 tokens in 4 forwards -> 2.5
    assert metrics.tau({"new_tokens": [10], "forward_passes": 4}) == 2.5
    # pooled over rows and calls: (10 + 6 + 9) / (4 + 6 + 5) = 25 / 15
    a = DecodeStats("lossless", forward_passes=6, new_tokens=[10, 6], row_forwards=[4, 6])
    b = {"new_tokens": [9], "row_forwards": [5], "forward_passes": 5}
    assert metrics.tau([a, b]) == pytest.approx(25 / 15)
    # DecodeStats.tau averages per-row ratios instead: (2.5 + 1.0) / 2
    assert a.tau == pytest.approx(1.75)


def test_tau_edge_cases():
    assert metrics.tau({"new_tokens": [0], "forward_passes": 0}) == 0.0
    with pytest.raises(ValueError, match="row_forwards"):
        metrics.tau({"new_tokens": [3, 4], "forward_passes": 2})
    with pytest.raises(ValueError, match="rows"):
        metrics.tau({"new_tokens": [3, 4], "row_forwards": [2], "forward_passes": 2})


def test_accept_histogram_sums_ragged():
    s1 = {"accept_hist": [3, 1, 0]}
    s2 = DecodeStats("clp", accept_hist=[1, 2, 3, 4])
    assert metrics.accept_histogram([s1, s2]) == [4, 3, 3, 4]


@pytest.mark.parametrize("ids, n, want", [
    ([1, 2, 1, 2, 1, 2], 2, 1 - 2 / 5),  # bigrams 12 21 12 21 12: 2 distinct of 5
    ([7, 7, 7, 7, 7, 7, 7], 4, 1 - 1 / 4),  # 4 four-grams, all (7,7,7,7)
    ([1, 2, 3, 4, 5, 6], 4, 0.0),  # 3 distinct four-grams
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 1 - 3 / 6),  # 6 four-grams: 1231 2312 3123 repeated twice
    ([1, 2, 3], 4, 0.0),  # no four-gram
    ([], 4, 0.0),
])
def test_seq_rep_n(ids, n, want):
    assert metrics.seq_rep_n(ids, n) == pytest.approx(want)


def test_seq_rep_n_rejects_bad_n():
    with pytest.raises(ValueError, match="n=0"):
        metrics.seq_rep_n([1, 2], 0)


def test_mean_seq_rep_n():
    # (0.75 + 0.0) / 2
    assert metrics.mean_seq_rep_n([[7] * 7, [1, 2, 3, 4, 5]], 4) == pytest.approx(0.375)
    assert metrics.mean_seq_rep_n([], 4) == 0.0


@pytest.mark.parametrize("a, b, want", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 5, 3], 1),
    ([9, 2, 3], [1, 2, 3], 0),
    ([1, 2], [1, 2, 3], 2),  # a stopped early (EOS): they diverge where a ends
    ([1, 2, 3, 4], [1, 2], 2),
    ([], [], None),
])
def test_first_divergence(a, b, want):
    assert metrics.first_divergence(a, b) == want


def test_exact_match_and_mean_first_divergence():
    refs = [[1, 2, 3], [4, 5, 6], [7, 8], [1, 1, 1, 1]]
    seqs = [[1, 2, 3], [4, 0, 6], [7, 8], [1, 1, 1]]
    assert metrics.exact_match(seqs, refs) == 0.5  # rows 0 and 2 identical
    assert metrics.mean_first_divergence(seqs, refs) == 2.0  # rows 1 (at 1) and 3 (at 3): (1 + 3) / 2
    assert metrics.mean_first_divergence(refs, refs) is None
    with pytest.raises(ValueError, match="3 sequences but 4"):
        metrics.exact_match(seqs[:3], refs)
    with pytest.raises(ValueError, match="no sequences"):
        metrics.exact_match([], [])


def test_median_ratio():
    # ratios 2.0, 1.5, 3.0, 1.0 -> median (1.5 + 2.0) / 2
    assert metrics.median_ratio([4.0, 3.0, 9.0, 5.0], [2.0, 2.0, 3.0, 5.0]) == pytest.approx(1.75)
    assert metrics.median_ratio([6.0], [4.0]) == 1.5
    with pytest.raises(ValueError, match="zero denominator"):
        metrics.median_ratio([1.0], [0.0])
    with pytest.raises(ValueError, match="2 numerators but 1"):
        metrics.median_ratio([1.0, 2.0], [1.0])


def test_throughput_ratio():
    # 100 tokens in 2 s (50 tok/s) vs base 100 tokens in 5 s (20 tok/s) -> 2.5 = 5 s / 2 s
    assert metrics.throughput_ratio([60, 40], [1.0, 1.0], [60, 40], [3.0, 2.0]) == pytest.approx(2.5)
    # unequal lengths: (90 / 3) / (120 / 6) = 30 / 20
    assert metrics.throughput_ratio([90], [3.0], [120], [6.0]) == pytest.approx(1.5)


def test_generated_ids_cuts_prompt_eos_and_padding():
    row = [11, 12, 13, 5, 6, 2, 0, 0]  # prompt of 3, EOS=2 then pad 0
    assert metrics.generated_ids(row, 3, eos=2) == [5, 6, 2]
    assert metrics.generated_ids(row, 3, eos=[9, 6]) == [5, 6]
    assert metrics.generated_ids(row, 3, n_new=2) == [5, 6]
    assert metrics.generated_ids(row, 3) == [5, 6, 2, 0, 0]
