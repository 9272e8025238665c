"""The decode engine against transformers: native forward logits, greedy, lossless, clp, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clp_fast
from clp_fast.drafts import heads as heads_src
from clp_fast.drafts import lookup as lookup_mod
from clp_fast.engine import loop, verify
from clp_fast.heads import MTPHeads
from clp_fast.models.native import NativeBackbone
from tests.conftest import assert_equal_ids, left_pad, tiny_model

PROMPTS = [[5, 17, 300, 2, 999, 41, 8], [12, 13], [700], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


def hf_greedy(model, ids, mask, n, eos=None, pad=0):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad)


def random_heads(model, k=3, std=0.05):
    heads = MTPHeads.for_model(model, k)
    with torch.no_grad():
        heads.weight.normal_(std=std)
        heads.clp.linear.bias.fill_(3.0)  # the CLP takes every guess at threshold 0.5
    return heads


class OracleDrafts:
    """Replaces the heads' guesses with the true greedy continuation, corrupted at known places.

    Finds which (row, position) a hidden state belongs to by nearest neighbour among
    transformers' own final hidden states of the full greedy sequences, so the verify / commit
    path sees long accepted runs, partial runs and rejections.
    """

    def __init__(self, model, sequences: list[list[int]], corrupt_every: int = 4):
        self.bank, self.where = [], []
        with torch.no_grad():
            for r, seq in enumerate(sequences):
                hs = model.model(torch.tensor([seq])).last_hidden_state[0]
                self.bank.append(hs.float())
                self.where += [(r, t) for t in range(len(seq))]
        self.bank = torch.cat(self.bank)
        self.sequences, self.corrupt_every = sequences, corrupt_every
        self.V = model.config.vocab_size
        self.original = heads_src.fused_rows

    def __call__(self, bb, heads, hidden, mode, policy, threshold, top_m=1, **kw):
        ids, conf, n, *top = self.original(bb, heads, hidden, mode, policy, threshold, top_m, **kw)
        nearest = torch.cdist(hidden.float(), self.bank).argmin(-1).tolist()
        for i, b in enumerate(nearest):
            r, t = self.where[b]
            seq = self.sequences[r]
            for j in range(1, ids.shape[1]):
                if t + 1 + j < len(seq):
                    tok = seq[t + 1 + j]
                    if (t + 3 * j) % self.corrupt_every == 0:
                        tok = (tok + 1) % self.V
                    ids[i, j] = tok
        return (ids, conf, n, *top)


def oracle_batch(monkeypatch, n: int = 20, corrupt_every: int = 10**9):
    """The tiny Qwen2 model, PROMPTS left-padded, transformers' greedy output for ``n`` tokens, and the heads'
    guesses replaced by that output (:class:`OracleDrafts`): ``(model, ids, mask, want)``."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, n)
    seqs = [want[b][mask[b].bool().tolist() + [True] * n].tolist() for b in range(len(PROMPTS))]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, corrupt_every))
    return model, ids, mask, want


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_native_forward_matches_transformers_logits(arch):
    model = tiny_model(arch)
    bb = NativeBackbone(model)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want = model(ids, attention_mask=mask, position_ids=pos).logits  # [B, P, V]
        # prefill the first 3 real tokens of each row, then feed the rest as one multi-token step
        lens = mask.sum(-1)
        cache = bb.allocate_cache(len(PROMPTS), 32)
        first = torch.minimum(lens, torch.tensor(3))
        order = torch.sort(mask, dim=-1, descending=True, stable=True).indices
        unpadded = torch.gather(ids, 1, order)
        h1, nk, nv = bb.forward(unpadded[:, :3], cache, first)
        clp_fast.backend.commit_kv_span_(cache.k, cache.v, nk, nv, cache.lengths, first)
        cache.lengths += first
        rest = torch.stack([torch.roll(unpadded[b], -int(first[b])) for b in range(len(PROMPTS))])
        h2, _, _ = bb.forward(rest, cache, lens - first)
    for b, n in enumerate(lens.tolist()):
        P = ids.shape[1]
        f = int(first[b])
        got = torch.cat([h1[b, :f], h2[b, : n - f]]) @ bb.lm_head_weight.t()
        torch.testing.assert_close(got, want[b, P - n:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_equals_transformers_generate(arch):
    model = tiny_model(arch)
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 24, eos=7)
    got = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=24, mode="greedy", eos_token_id=7,
                            pad_token_id=0)
    assert_equal_ids(got, want)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("corrupt_every", [2, 5, 10**9])
def test_lossless_equals_greedy_with_partly_right_drafts(arch, corrupt_every, monkeypatch):
    model = tiny_model(arch)
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 30)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 30].tolist() for b in range(len(PROMPTS))]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, corrupt_every))
    got, stats = clp_fast.generate(model, ids, random_heads(model, 4), attention_mask=mask, max_new_tokens=30,
                                   mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=0,
                                   max_step_tokens=None, speculation="fixed",  # all k guesses for every row
                                   return_stats=True)
    assert_equal_ids(got, want)
    assert stats.new_tokens == [30] * 4
    assert sum(stats.accept_hist[1:]) > 0, stats.accept_hist  # some guesses were accepted ...
    if corrupt_every < 10**9:
        assert sum(stats.accept_hist[:-1]) > 0, stats.accept_hist  # ... and some cut short
    else:
        assert stats.tau > 3.0


def test_step_token_cap_limits_guesses_and_keeps_lossless_exact(monkeypatch):
    """Fixed speculation: max_step_tokens=8 over 4 rows leaves each row 8 // 4 - 1 = 1 guess a step, even with
    right guesses; a cap below 2 tokens per row still leaves each row its one guess."""
    model, ids, mask, want = oracle_batch(monkeypatch)
    kw = dict(attention_mask=mask, max_new_tokens=20, mode="lossless", eos_token_id=[], pad_token_id=0,
              prompt_lookup=0, return_stats=True, speculation="fixed")
    got, stats = clp_fast.generate(model, ids, random_heads(model, 4), max_step_tokens=8, **kw)
    assert_equal_ids(got, want)
    assert stats.accept_hist[1] > 0 and sum(stats.accept_hist[2:]) == 0, stats.accept_hist
    got, floor = clp_fast.generate(model, ids, random_heads(model, 4), max_step_tokens=1, **kw)
    assert_equal_ids(got, want)
    assert floor.accept_hist == stats.accept_hist and floor.forward_passes == stats.forward_passes
    _, free = clp_fast.generate(model, ids, random_heads(model, 4), max_step_tokens=None, **kw)
    assert sum(free.accept_hist[2:]) > 0 and free.forward_passes < stats.forward_passes


def test_draft_tree_verifies_lookup_and_heads_branches_together(monkeypatch):
    """Lookup guesses and head guesses form two branches of one draft tree, verified in one forward.

    An oracle lookup (the true continuation, its first guess spoiled on every other call) competes with
    oracle heads spoiled at other places; the output must equal greedy, and both branches must win steps:
    the lookup's deep ones (depth 3 > k = 2) and the heads' when the lookup was spoiled.
    """
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 24)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 24].tolist() for b in range(len(PROMPTS))]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, corrupt_every=3))
    calls = [0]

    def oracle_lookup(ctx, max_tokens, max_ngram=3, min_ngram=1):
        if min_ngram < 2:
            return []  # no 1-gram fallback: one lookup branch per step
        calls[0] += 1
        for seq in seqs:
            if seq[: len(ctx)] == ctx:
                guess = seq[len(ctx): len(ctx) + max_tokens]
                if calls[0] % 2 == 0 and guess:
                    guess[0] = (guess[0] + 1) % 1000  # spoiled: only the heads' branch can be right
                return guess
        return []

    monkeypatch.setattr(lookup_mod, "lookup_continuation", oracle_lookup)
    wins, original = [], verify.accept_argmax

    def spy(ids_, tree):
        best = original(ids_, tree)
        for b in range(tree.tokens.shape[0]):
            if tree.n_fed[b] > 1 and tree.depth[b, best[b]] > 0:
                wins.append("lookup" if bool(tree.anc[b, best[b], 1]) else "heads")
        return best

    monkeypatch.setattr(verify, "accept_argmax", spy)
    got, stats = clp_fast.generate(model, ids, random_heads(model, 2), attention_mask=mask, max_new_tokens=24,
                                   mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=4,
                                   max_step_tokens=None, speculation="fixed",  # whole trees for every row
                                   return_stats=True)
    assert_equal_ids(got, want)
    assert sum(stats.accept_hist[3:]) > 0, stats.accept_hist  # deeper than the heads reach: the lookup branch
    assert "heads" in wins and "lookup" in wins, wins


def test_clp_mode_takes_guesses_unverified(monkeypatch):
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 20)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(len(PROMPTS))]
    heads = random_heads(model, 3)
    # right guesses: clp output equals greedy with fewer forwards
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, 10**9))
    got, stats = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=20, mode="clp",
                                   eos_token_id=[], pad_token_id=0, clp_threshold=0.5, return_stats=True)
    assert_equal_ids(got, want)
    assert stats.forward_passes <= 6  # ceil(20 / 4) + prefill
    # wrong guesses are accepted too: that is what distinguishes clp from lossless
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, 2))
    got = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=20, mode="clp", eos_token_id=[],
                            pad_token_id=0, clp_threshold=0.5)
    assert not torch.equal(got, want)
    # threshold 1.0 (never sure) takes no guesses: greedy again
    got = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=20, mode="clp", eos_token_id=[],
                            pad_token_id=0, clp_threshold=1.0)
    assert_equal_ids(got, want)


def test_clp_mode_computes_logit_rows_only_at_each_rows_last_fed_node(monkeypatch):
    """clp mode takes the whole fed chain, so the next step needs the heads only at its last node: every draft
    call sees one hidden row per batch row, whatever the chain length (lossless sees every fed node)."""
    model = tiny_model("qwen2")
    heads = random_heads(model, 3)  # the CLP takes every guess
    sizes, original = [], heads_src.fused_rows

    def spy(bb, heads_, hidden, *args, **kw):
        sizes.append(hidden.shape[0])
        return original(bb, heads_, hidden, *args, **kw)

    monkeypatch.setattr(heads_src, "fused_rows", spy)
    ids, mask = left_pad(PROMPTS)
    _, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=16, mode="clp", eos_token_id=[],
                              pad_token_id=0, clp_threshold=0.5, return_stats=True)
    assert sum(st.accept_hist[1:]) > 0, st.accept_hist  # chains longer than one node were fed
    assert sizes and set(sizes) == {len(PROMPTS)}, sizes
    sizes.clear()
    clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=16, mode="lossless", eos_token_id=[],
                      pad_token_id=0, prompt_lookup=0, max_step_tokens=None, speculation="fixed")
    assert max(sizes) > len(PROMPTS), sizes


def test_draft_vocabulary_reaches_the_heads_and_lossless_stays_exact(monkeypatch):
    """Heads with a 40-token draft vocabulary only ever guess ids < 40; verification keeps the output greedy's."""
    model = tiny_model("qwen2")
    heads = MTPHeads.for_model(model, 3, draft_vocab=40)
    with torch.no_grad():
        heads.weight.normal_(std=0.05)
    seen, original = [], heads_src.fused_rows

    def spy(*args, **kw):
        ids, conf, n = original(*args, **kw)
        seen.append(ids)
        return ids, conf, n

    monkeypatch.setattr(heads_src, "fused_rows", spy)
    ids, mask = left_pad(PROMPTS)
    # fixed speculation: the heads run every step (adaptive may find greedy steps faster on this machine, issue 26)
    got = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=16, mode="lossless",
                            eos_token_id=[], pad_token_id=0, prompt_lookup=0, speculation="fixed")
    assert_equal_ids(got, hf_greedy(model, ids, mask, 16))
    drafted = torch.cat([s for s in seen if s.shape[1] == 4])  # calls with the heads (others: backbone rows only)
    assert drafted.shape[0] >= 16, drafted.shape
    assert bool((drafted[:, 1:] < 40).all()), drafted[:, 1:].max()
    assert bool((drafted[:, 0] >= 40).any()), "the backbone column must range over the whole vocabulary"


def test_gate_policy_runs_in_clp_mode():
    model = tiny_model("qwen2")
    heads = MTPHeads.for_model(model, 2, with_gate=True)
    with torch.no_grad():
        heads.gate.net[2].bias.fill_(-5.0)  # the gate never accepts: output must be greedy's
    ids, mask = left_pad(PROMPTS)
    got = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=12, mode="clp", policy="gate",
                            eos_token_id=[], pad_token_id=0)
    assert_equal_ids(got, hf_greedy(model, ids, mask, 12))
    assert heads.num_parameters_report()["gate"] > 100_000


@pytest.mark.parametrize("policy", ["clp", "gate"])
def test_policy_probability_exactly_at_the_threshold_is_accepted(policy):
    """Through the engine: a CLP / gate whose last layer is zero says sigmoid(0) = 0.5 for every guess. At
    clp_threshold=0.5 every step takes all k guesses (``>=``); at the next float32 above 0.5 none."""
    model = tiny_model("qwen2")
    k, n_new = 3, 12
    heads = MTPHeads.for_model(model, k, with_gate=True)  # the CLP starts at zero weights and bias
    with torch.no_grad():
        heads.gate.net[0].weight.normal_()
        heads.gate.net[2].weight.zero_()
        heads.gate.net[2].bias.zero_()
    ids, mask = left_pad(PROMPTS)
    above = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()
    kw = dict(attention_mask=mask, max_new_tokens=n_new, mode="clp", policy=policy, eos_token_id=[], pad_token_id=0,
              return_stats=True)
    _, at = clp_fast.generate(model, ids, heads, clp_threshold=0.5, **kw)
    assert at.accept_hist[k] == 4 * (n_new // (k + 1)), at.accept_hist  # every step of every row took k guesses
    assert sum(at.accept_hist[:k]) == 0, at.accept_hist
    _, over = clp_fast.generate(model, ids, heads, clp_threshold=above, **kw)
    assert sum(over.accept_hist[1:]) == 0 and over.tau == 1.0, over.accept_hist


@pytest.mark.parametrize("mode", ["greedy", "lossless"])
def test_each_batched_row_equals_that_row_alone_with_eos(mode, monkeypatch):
    """Ragged batch with an EOS that stops row 0 early. In lossless mode the drafts are the true (EOS-blind)
    continuation, so guesses are accepted and row 0's EOS arrives *inside* an accepted span: the verified
    tokens after it must be dropped, in the batch and alone."""
    model = tiny_model("qwen2")
    heads = random_heads(model, 3)
    ids, mask = left_pad(PROMPTS)
    free = hf_greedy(model, ids, mask, 20)
    eos = free[0, ids.shape[1] + 6].item()  # row 0 stops early at this token
    cut_inside = []
    if mode == "lossless":
        seqs = [free[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(len(PROMPTS))]
        monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, 10**9))
        keep = loop.keep_tokens

        def spy(p, rows, fed, n_fed):
            remaining = p.max_new_tokens - rows.produced
            cnt, stopped = keep(p, rows, fed, n_fed)
            cut_inside.append(bool((stopped & (cnt < torch.minimum(n_fed, remaining))).any()))
            return cnt, stopped

        monkeypatch.setattr(loop, "keep_tokens", spy)
    batched, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=20, mode=mode,
                                    eos_token_id=eos, pad_token_id=0, max_step_tokens=None, speculation="fixed",
                                    return_stats=True)
    assert_equal_ids(batched, hf_greedy(model, ids, mask, 20, eos=eos))
    if mode == "lossless":
        assert sum(st.accept_hist[1:]) > 0, st.accept_hist
        assert any(cut_inside), "no EOS fell inside an accepted span"
    P = ids.shape[1]
    for b, row in enumerate(PROMPTS):
        alone = clp_fast.generate(model, torch.tensor([row]), heads, max_new_tokens=20, mode=mode,
                                  eos_token_id=eos, pad_token_id=0)[0, len(row):]
        got = batched[b, P:P + alone.shape[0]]
        assert_equal_ids(got, alone)
        assert (batched[b, P + alone.shape[0]:] == 0).all()  # finished rows are padded


def test_stats_are_consistent():
    model = tiny_model("qwen2")
    heads = random_heads(model, 3)
    ids, mask = left_pad(PROMPTS)
    _, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=15, mode="clp",
                              eos_token_id=[], return_stats=True)
    assert st.new_tokens == [15] * 4
    # every row: 1 token per step + its accepted guesses
    emitted = sum(h * (m + 1) for m, h in enumerate(st.accept_hist))
    assert 4 * 15 <= emitted <= 4 * 15 + 4 * 3  # only a row's last step may be cut by the budget
    assert st.tau == pytest.approx(sum(15 / f for f in st.row_forwards) / 4)
    d = st.to_dict()
    assert d["tokens_per_s"] > 0 and d["forward_passes"] == st.forward_passes


# --------------------------------------------------------------------------- real model (SmolLM2)
def test_smollm2_lossless_equals_transformers_greedy_fp32(smollm2):
    """The shipped SmolLM2 heads, heads only (no prompt lookup), ragged B=4 and B=1: output equals
    transformers' greedy ``generate`` exactly in fp32, and the heads' guesses were actually accepted."""
    from pathlib import Path

    model, tok = smollm2
    heads = MTPHeads.from_pretrained(Path(clp_fast.__file__).parent / "assets" / "heads" / "smollm2-135m-instruct",
                                     model=model)
    texts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "The capital of France is",
             "import os\nimport sys\n\ndef main():\n",
             "# Sort a list of integers in place\ndef bubble_sort(xs):"]
    rows = [tok(t)["input_ids"] for t in texts]
    ids, mask = left_pad(rows, pad=tok.pad_token_id or 0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=pad)
    got, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=32, mode="lossless",
                                pad_token_id=pad, prompt_lookup=0, return_stats=True, speculation="fixed")
    assert_equal_ids(got, want)
    assert sum(st.accept_hist[1:]) > 0, st.accept_hist  # some head guess was verified and kept
    single, st1 = clp_fast.generate(model, torch.tensor([rows[0]]), heads, max_new_tokens=32, mode="lossless",
                                    prompt_lookup=0, return_stats=True, speculation="fixed")
    assert_equal_ids(single, model.generate(torch.tensor([rows[0]]), max_new_tokens=32, do_sample=False,
                                            pad_token_id=pad))
    assert sum(st1.accept_hist[1:]) > 0, st1.accept_hist


def test_fused_heads_logits_match_lm_head(tiny_qwen2):
    """The engine's draft step uses the model's own LM head: column 0 is transformers' argmax."""
    bb = NativeBackbone(tiny_qwen2)
    h = torch.randn(5, 96)
    ids, _, _ = heads_src.fused_rows(bb, None, h, "greedy", "clp", 0.5)
    assert_equal_ids(ids[:, 0], F.linear(h, tiny_qwen2.lm_head.weight).argmax(-1))
