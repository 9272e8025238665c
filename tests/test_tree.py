"""Draft trees from the sources' proposals (clp_fast.engine.tree): construction, the cost model's choice, the engine."""

from __future__ import annotations

import pytest
import torch

import clp_fast
from clp_fast.drafts import heads as heads_src
from clp_fast.drafts.base import Branch, Layers
from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.engine.cost import StepCost
from clp_fast.engine.speculation import select_nodes
from clp_fast.engine.tree import grow
from clp_fast.heads import MTPHeads
from clp_fast.train import calibrate as calib_mod
from clp_fast.train import shards
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS, hf_greedy

# Two bins: p < 0.5 -> rate lo, p >= 0.5 -> rate hi, per depth.
CAL = TreeCalibration(edges=(0.0, 0.5, 1.01), rates=((0.3, 0.8), (0.2, 0.6), (0.1, 0.5)), lookup=(0.7, 0.9), top_m=3)


def _paths(toks, pars):
    """Each node's token path from the root (root excluded)."""
    out = []
    for i in range(1, len(toks)):
        path, j = [], i
        while j:
            path.append(toks[j])
            j = pars[j]
        out.append(tuple(reversed(path)))
    return out


def _heads(cand, prob):
    """The heads' top-m lists as a Layers proposal with CAL's priors."""
    return Layers(cand, [[CAL.rate(d + 1, p) for p in ps] for d, ps in enumerate(prob)], "heads")


def _lookup(tokens):
    return Branch(tokens, [CAL.lookup_rate(d + 1) for d in range(len(tokens))], "lookup")


KINDS = ["lookup", "heads"]


def test_grow_adds_nodes_by_estimate_parents_first():
    """Hand-computed: head 1 candidates (0.9 -> 0.8, 0.3 -> 0.3, 0.1 -> 0.3), head 2 (0.7 -> 0.6, 0.2 -> 0.2).
    Estimates: (1,) 0.8, (1, 4) 0.48, (2,) 0.3, (3,) 0.3, (1, 5) 0.16, (2, 4) 0.18, ... With a cap of 4 guesses
    the tree is the four best, parents before children."""
    toks, pars, pri, src = grow(7, [_heads([[1, 2, 3], [4, 5, 6]], [[0.9, 0.3, 0.1], [0.7, 0.2, 0.05]])], KINDS,
                                [1.0, 1.0], 4)
    assert toks[0] == 7
    assert _paths(toks, pars) == [(1,), (1, 4), (2,), (3,)]
    assert all(pars[i] < i for i in range(1, len(toks)))
    assert pri[1:] == [0.8, 0.6, 0.3, 0.3] and src[1:] == [1, 1, 1, 1]
    full = grow(7, [_heads([[1, 2, 3], [4, 5, 6]], [[0.9, 0.3, 0.1], [0.7, 0.2, 0.05]])], KINDS, [1.0, 1.0], 16)
    assert len(full[0]) - 1 == 3 + 9  # every node of the 3 x 3 cartesian tree


def test_the_cost_model_keeps_the_nodes_that_pay():
    """The grown tree, priced by a per-token cost: a node of return e joins while (1 + sum e) / cost(1 + n) rises.
    Cost 1 + 0.25 per extra token: (1,) 0.8 -> 1.8 / 1.25 = 1.44 > 1; (1, 4) 0.48 -> 2.28 / 1.5 = 1.52; (2,) 0.3 ->
    2.58 / 1.75 = 1.474 < 1.52: two guesses. A flat cost takes every node; a steep one none (the root alone)."""
    tree = grow(7, [_heads([[1, 2, 3], [4, 5, 6]], [[0.9, 0.3, 0.1], [0.7, 0.2, 0.05]])], KINDS, [1.0, 1.0], 16)
    per_token = StepCost({1: 1.0, 2: 1.25}, learn=False)
    (chosen,), info = select_nodes([tree], [[1.0, 1.0]], per_token)
    assert _paths(chosen[0], chosen[1]) == [(1,), (1, 4)] and info["fed"] == 3
    (flat,), _ = select_nodes([tree], [[1.0, 1.0]], StepCost.flat())
    assert len(flat[0]) == len(tree[0])
    (steep,), _ = select_nodes([tree], [[1.0, 1.0]], StepCost({1: 1.0, 2: 2.0}, learn=False))
    assert steep[0] == [7]


def test_lookup_branch_joins_the_trie_once():
    """The lookup guess 1 equals head 1's best candidate: one node, which carries both the head-2 candidates
    and the lookup chain (rates 0.7, 0.9 per depth); no (parent, token) appears twice."""
    toks, pars, _, _ = grow(7, [_heads([[1, 2], [4, 5]], [[0.9, 0.1], [0.1, 0.1]]), _lookup([1, 9, 8])], KINDS,
                            [1.0, 1.0], 6)
    paths = _paths(toks, pars)
    assert len(paths) == len(set(paths))
    assert paths[:3] == [(1,), (1, 9), (1, 9, 8)]  # 0.8, 0.8 * 0.9, 0.72 * 0.9 (lookup rate repeats its last)


def test_row_factors_reorder_the_sources():
    """A row that has been accepting lookup guesses far above their prior (factor 2.5) grows the lookup branch
    before the heads' second candidates; with the factors reversed, the heads' nodes come first."""
    props = [_heads([[1, 2]], [[0.9, 0.6]]), _lookup([5, 6])]
    toks, pars, _, _ = grow(7, props, KINDS, [2.5, 0.25], 2)
    assert _paths(toks, pars) == [(5,), (5, 6)]
    toks, pars, _, _ = grow(7, props, KINDS, [0.25, 2.5], 2)
    assert _paths(toks, pars) == [(1,), (2,)]


@pytest.mark.parametrize("bad", [dict(edges=(0.5,)), dict(rates=((0.1, 2.0),)), dict(top_m=9), dict(lookup=())])
def test_bad_calibration_is_named(bad):
    kw = dict(edges=(0.0, 0.5, 1.01), rates=((0.1, 0.2),), lookup=(0.5,), top_m=2) | bad
    with pytest.raises(ValueError, match="tree calibration"):
        TreeCalibration(**kw)


class RankedOracle:
    """Puts the true greedy token at rank ``rank`` of every head's top-m list and a wrong token everywhere
    else (rank 0 too), found by nearest neighbour like test_decode.OracleDrafts."""

    def __init__(self, model, sequences, rank):
        with torch.no_grad():
            self.bank = torch.cat([model.model(torch.tensor([s])).last_hidden_state[0].float() for s in sequences])
        self.where = [(r, t) for r, s in enumerate(sequences) for t in range(len(s))]
        self.sequences, self.rank, self.V = sequences, rank, model.config.vocab_size
        self.original = heads_src.fused_rows

    def __call__(self, bb, heads, hidden, mode, policy, threshold, top_m=1, **kw):
        ids, conf, n, *top = self.original(bb, heads, hidden, mode, policy, threshold, top_m, **kw)
        for i, b in enumerate(torch.cdist(hidden.float(), self.bank).argmin(-1).tolist()):
            r, t = self.where[b]
            seq = self.sequences[r]
            for j in range(ids.shape[1] - 1):
                if t + 2 + j < len(seq):
                    truth = seq[t + 2 + j]
                    ids[i, 1 + j] = (truth + 1) % self.V  # the argmax chain is always wrong
                    if top:
                        top[0][i, j] = torch.tensor([(truth + 1 + c) % self.V for c in range(top_m)])
                        top[0][i, j, self.rank] = truth
        if top:
            top[1][:] = torch.linspace(0.6, 0.4, top_m)  # rank 0 estimated best
        return (ids, conf, n, *top)


def test_engine_accepts_second_candidates_and_stays_exact(monkeypatch):
    """Every head's argmax is wrong and its second candidate right: the argmax chain accepts nothing, the
    top-3 tree accepts second candidates at several depths, and the output is transformers' greedy."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 20)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(len(PROMPTS))]
    heads = MTPHeads.for_model(model, 3)
    heads.extra_config["tree"] = CAL.to_dict()
    monkeypatch.setattr(heads_src, "fused_rows", RankedOracle(model, seqs, rank=1))
    kw = dict(attention_mask=mask, max_new_tokens=20, mode="lossless", eos_token_id=[], pad_token_id=0,
              prompt_lookup=0, max_step_tokens=None, return_stats=True, speculation="fixed")
    chain, st_chain = clp_fast.generate(model, ids, heads, tree_top_m=1, **kw)
    tree, st_tree = clp_fast.generate(model, ids, heads, **kw)  # None -> the heads' calibrated m = 3
    assert_equal_ids(chain, want)
    assert_equal_ids(tree, want)
    assert sum(st_chain.accept_hist[1:]) == 0, st_chain.accept_hist
    assert sum(st_tree.accept_hist[2:]) > 0, st_tree.accept_hist  # depth >= 2 reached through rank-2 nodes
    assert st_tree.forward_passes < st_chain.forward_passes
    # a calibration that does not make trees the default (as measured for the shipped Qwen heads): the chain
    heads.extra_config["tree"] = {**CAL.to_dict(), "default": False}
    _, st_default = clp_fast.generate(model, ids, heads, **kw)
    assert st_default.accept_hist == st_chain.accept_hist


@pytest.mark.parametrize("kw,match", [(dict(tree_top_m=0), "tree_top_m=0"), (dict(tree_top_m=9), "tree_top_m=9"),
                                      (dict(tree_top_m=2, mode="clp"), "needs mode='lossless'"),
                                      (dict(tree_top_m=2, calibrated=False), "tree calibration")])
def test_tree_arguments_are_checked(kw, match):
    model = tiny_model("qwen2")
    heads = MTPHeads.for_model(model, 2)
    if kw.pop("calibrated", True):
        heads.extra_config["tree"] = CAL.to_dict()
    with pytest.raises(ValueError, match=match):
        clp_fast.generate(model, torch.ones(1, 3, dtype=torch.long), heads, max_new_tokens=3,
                          **{"mode": "lossless", **kw})


def _fake_shard(path, seqs, H=8):
    n, L = len(seqs), max(len(s) for s in seqs)
    tokens = torch.zeros(n, L, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    argmax = torch.roll(tokens, -1, dims=1)  # greedy continuation: the next token
    shards.write_shard({"hidden": torch.zeros(n, L, H, dtype=torch.bfloat16), "argmax": argmax,
                        "top_ids": torch.zeros(n, L, 2, dtype=torch.int32),
                        "top_logp": torch.zeros(n, L, 2, dtype=torch.float16), "tokens": tokens,
                        "length": torch.tensor([len(s) for s in seqs], dtype=torch.int32),
                        "start": torch.zeros(n, dtype=torch.int32),
                        "gen_start": torch.full((n,), 8, dtype=torch.int32)}, path)


def test_lookup_rates_on_periodic_and_aperiodic_text(tmp_path):
    """A period-4 sequence is predicted by lookup once it has repeated: depth-1 and depth-2 rates near 1;
    a sequence of distinct tokens offers no guess at all (the rate stays the 0.5 prior of no data)."""
    periodic = [1, 2, 3, 4] * 12
    distinct = list(range(100, 148))
    _fake_shard(tmp_path / "p.safetensors", [periodic])
    _fake_shard(tmp_path / "d.safetensors", [distinct])
    rates = calib_mod.lookup_rates([tmp_path / "p.safetensors"], width=4, depths=2)
    assert rates[0] > 0.95 and rates[1] > 0.95, rates
    assert calib_mod.lookup_rates([tmp_path / "d.safetensors"], width=4, depths=2) == [0.5, 0.5]
