"""Lossless speculative sampling: the acceptance rule and the whole loop against exact distributions.

Each statistical test draws tens of thousands of seeded samples as rows of one batch (seconds, not
minutes) and compares their histogram with the exact distribution by a chi-square test; each has a
negative control that swaps in a wrong rule ("accept every draft") and must be rejected.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from clp_fast.engine import generate_processed, sampling
from tests.conftest import tiny_model
from tests.test_decode import random_heads
from tests.test_tree import CAL as TREE_CAL

ALPHA = 1e-3  # seeded, so deterministic; a correct rule gives p ~ U(0, 1), a wrong one p < 1e-20 here


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of ``counts [K]`` under ``probs [K]``; bins expecting fewer than
    ``min_expected`` samples are pooled into one."""
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    if bool((obs[~keep] > 0).any()):  # a sample where the exact distribution has no mass
        return 0.0
    obs, ex = obs[keep], ex[keep]
    stat = ((obs - ex) ** 2 / ex).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def accept_all(p_x, u):
    return torch.ones_like(u, dtype=torch.bool)


# --------------------------------------------------------------------------- the rule on a fixed tree
# Root (node 0) with children 1 (token 1) and 2 (token 2); node 3 (token 3) is a child of node 1.
TREE_TOKENS = [0, 1, 2, 3]
TREE_PARENT = [0, 0, 0, 1]
V = 5
DISTS = torch.tensor([[0.10, 0.40, 0.20, 0.20, 0.10],  # after the root
                      [0.30, 0.10, 0.10, 0.40, 0.10],  # after node 1
                      [0.05, 0.05, 0.50, 0.20, 0.20],  # after node 2
                      [0.25, 0.25, 0.25, 0.15, 0.10]])  # after node 3
END = V  # "no token here": the walk stopped earlier


def tree_outcomes(best: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Emitted tokens after the root, padded with END to length 3, as one index in [0, (V + 1) ** 3)."""
    path = {0: [], 1: [1], 2: [2], 3: [1, 3]}
    codes = []
    for b, n in zip(best.tolist(), nxt.tolist()):
        seq = (path[b] + [n] + [END, END])[:3]
        codes.append((seq[0] * (V + 1) + seq[1]) * (V + 1) + seq[2])
    return torch.tensor(codes)


def tree_exact() -> torch.Tensor:
    """Autoregressive sampling truncated where the tree ends: X ~ p_root; Y ~ p_X if X is a node's token;
    Z ~ p_3 if (X, Y) = (1, 3)."""
    probs = torch.zeros((V + 1) ** 3, dtype=torch.float64)
    node_of = {1: 1, 2: 2}
    for x in range(V):
        px = float(DISTS[0, x])
        if x not in node_of:
            probs[(x * (V + 1) + END) * (V + 1) + END] += px
            continue
        for y in range(V):
            py = float(DISTS[node_of[x], y])
            if (x, y) == (1, 3):
                for z in range(V):
                    probs[(x * (V + 1) + y) * (V + 1) + z] += px * py * float(DISTS[3, z])
            else:
                probs[(x * (V + 1) + y) * (V + 1) + END] += px * py
    return probs


def walk_fixed_tree(rows: int, seed: int, do_sample: bool = True):
    tokens = torch.tensor([TREE_TOKENS] * rows)
    parent = torch.tensor([TREE_PARENT] * rows)
    n_fed = torch.full((rows,), 4)
    logp = DISTS.log()

    def scores_at(r, i):
        return logp[i].expand(r.numel(), -1).clone()

    g = torch.Generator().manual_seed(seed)
    return sampling.walk_tree(tokens, parent, n_fed, scores_at, do_sample=do_sample, generator=g)


def test_rule_matches_autoregressive_sampling_on_a_fixed_tree():
    best, nxt = walk_fixed_tree(40_000, seed=1)
    counts = torch.bincount(tree_outcomes(best, nxt), minlength=(V + 1) ** 3)
    p = chi2_pvalue(counts, tree_exact())
    assert p > ALPHA, f"chi-square p={p:.2e}: sampled tree walk does not match autoregressive sampling"
    assert {0, 1, 2, 3} <= set(best.tolist()), "every node should be the deepest accepted one sometimes"


def test_rule_check_rejects_accept_every_draft(monkeypatch):
    monkeypatch.setattr(sampling, "accept_draft", accept_all)
    best, nxt = walk_fixed_tree(40_000, seed=1)
    counts = torch.bincount(tree_outcomes(best, nxt), minlength=(V + 1) ** 3)
    assert chi2_pvalue(counts, tree_exact()) < 1e-6


def test_greedy_walk_follows_argmaxes():
    best, nxt = walk_fixed_tree(3, seed=0, do_sample=False)
    # argmax after the root is 1 (node 1), after node 1 it is 3 (node 3), after node 3 it is 0
    assert best.tolist() == [3, 3, 3] and nxt.tolist() == [0, 0, 0]


def test_walk_is_reproducible_with_a_generator():
    a, b, c = walk_fixed_tree(500, seed=7), walk_fixed_tree(500, seed=7), walk_fixed_tree(500, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


# -------------------------------------------------------------------- the whole loop on a tiny model
SMALL_V = 8
PROMPT = [3, 1, 4, 1, 5, 2, 6]
N_SAMPLES = 20_000


@pytest.fixture(scope="module", params=["chain+lookup", "top-3 tree"])
def small_vocab(request):
    """The tiny 8-token model and heads drafting either a chain plus lookup branches or (with a tree
    calibration) top-3 trees, whose nodes have several children: rejections then renormalise."""
    model = tiny_model("qwen2", vocab_size=SMALL_V)
    # zero-initialised heads guess the backbone's own argmax for every depth: on this model that gives
    # accepted chains of both depths and many rejections (random heads' depth-2 guesses were never accepted)
    heads = random_heads(model, k=2, std=0.0)
    if request.param == "top-3 tree":
        heads.extra_config["tree"] = TREE_CAL.to_dict()
    return model, heads


def processors():
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    # the repetition penalty makes every node's distribution depend on its own prefix
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                TopKLogitsWarper(6)])


def exact_first3(model) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) under the processed distributions, by enumerating all SMALL_V ** 3 sequences
    with transformers' own forward: ``[SMALL_V ** 3]`` indexed (t1 * V + t2) * V + t3."""
    procs = processors()
    P = len(PROMPT)
    seqs = torch.tensor([PROMPT + [a, b] for a, b in itertools.product(range(SMALL_V), repeat=2)])  # [V^2, P + 2]
    with torch.no_grad():
        logits = model(seqs).logits.float()  # [V^2, P + 2, V]

    def step(prefix_len):
        return torch.softmax(procs(seqs[:, :prefix_len], logits[:, prefix_len - 1].clone()), -1).double()

    p1, p2, p3 = step(P), step(P + 1), step(P + 2)  # rows of p1 all equal; p2 depends on t1 only
    t1, t2 = seqs[:, P], seqs[:, P + 1]
    joint = p1[torch.arange(len(seqs)), t1] * p2[torch.arange(len(seqs)), t2]  # [V^2]
    return (joint[:, None] * p3).flatten()


def sample_first3(model, heads, seed: int) -> tuple[torch.Tensor, object]:
    ids = torch.tensor([PROMPT] * N_SAMPLES)
    g = torch.Generator().manual_seed(seed)
    out, stats = generate_processed(model, ids, heads, max_new_tokens=3, mode="lossless", logits_processor=processors(),
                                    do_sample=True, generator=g, eos_token_id=[], max_step_tokens=None,
                                    return_stats=True)
    new = out[:, len(PROMPT):]
    return (new[:, 0] * SMALL_V + new[:, 1]) * SMALL_V + new[:, 2], stats


@pytest.mark.slow
def test_sampled_first_three_tokens_match_enumeration(small_vocab):
    model, heads = small_vocab
    codes, stats = sample_first3(model, heads, seed=11)
    # the trees really were exercised: guesses accepted at depth 1 and 2, and rejected
    assert min(stats.accept_hist[:3]) > 500, stats.accept_hist
    counts = torch.bincount(codes, minlength=SMALL_V ** 3)
    p = chi2_pvalue(counts, exact_first3(model))
    assert p > ALPHA, f"chi-square p={p:.2e}: lossless sampling does not match the processed distribution"


@pytest.mark.slow
def test_enumeration_check_rejects_accept_every_draft(small_vocab, monkeypatch):
    model, heads = small_vocab
    monkeypatch.setattr(sampling, "accept_draft", accept_all)
    codes, _ = sample_first3(model, heads, seed=11)
    counts = torch.bincount(codes, minlength=SMALL_V ** 3)
    assert chi2_pvalue(counts, exact_first3(model)) < 1e-6


def test_sampling_is_reproducible_with_a_generator(small_vocab):
    model, heads = small_vocab
    ids = torch.tensor([PROMPT] * 4)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_processed(model, ids, heads, max_new_tokens=10, logits_processor=processors(), do_sample=True,
                                  generator=g, eos_token_id=[])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
