"""Adaptive speculation: the cost model, the node selection, per-row acceptance, the packed forward and the
heads-only rows it relies on — and, end to end, that the policy switches speculation off and on while the
output stays greedy's."""

from __future__ import annotations

import pytest
import torch

import clp_fast
from clp_fast import reference
from clp_fast.drafts import heads as heads_src
from clp_fast.drafts.base import Branch, DraftSource
from clp_fast.engine import cost as cost_mod
from clp_fast.engine import loop
from clp_fast.engine.cost import StepCost, step_cost
from clp_fast.engine.speculation import SOURCES, RowAcceptance, SourceGate, select_nodes
from clp_fast.heads import MTPHeads
from clp_fast.models.native import NativeBackbone
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS, OracleDrafts, hf_greedy, oracle_batch, random_heads

FLAT = {1: 1.0, 64: 1.0}  # a fed token costs nothing: every guess with any chance pays
PER_TOKEN = {1: 1.0}  # a forward costs in proportion to its tokens: no guess (e < 1) ever pays


def chain(pending, priors, src="heads"):
    """A row's trie as select_nodes takes it: a chain below the pending token."""
    n = len(priors)
    return ([pending] + list(range(100, 100 + n)), [-1] + list(range(n)), [1.0] + list(priors),
            [-1] + [SOURCES.index(src)] * n)


# ------------------------------------------------------------------------------------------- StepCost
def test_step_cost_interpolates_and_extrapolates():
    c = StepCost({1: 1.0, 4: 1.6, 8: 3.2})
    assert c(1) == 1.0 and c(4) == 1.6
    assert c(2) == pytest.approx(1.2)  # 1 + (1.6 - 1) / 3
    assert c(6) == pytest.approx(2.4)  # halfway between 4 and 8
    assert c(12) == pytest.approx(4.8)  # past the last point: the last segment's slope (0.4 per token)
    assert StepCost({2: 3.0})(4) == pytest.approx(6.0)  # one point: proportional beyond it
    assert StepCost({2: 3.0})(1) == 3.0  # never cheaper than the smallest measured count


@pytest.mark.parametrize("points", [{}, {0: 1.0}, {1: 0.0}, {1: -2.0}, {1.5: 1.0}])
def test_step_cost_rejects_bad_points(points):
    with pytest.raises(ValueError, match="StepCost"):
        StepCost(points)


def test_step_cost_observe_moves_towards_measurements_unless_fixed():
    c = StepCost({1: 1.0, 4: 2.0})
    c.observe(4, 3.0, weight=0.5)
    assert c.points[4] == pytest.approx(2.5)
    c.observe(16, 5.0)  # beyond the measured range: a new point
    assert c.points[16] == 5.0 and c.observed == 2
    fixed = StepCost({1: 1.0, 4: 2.0}, learn=False)
    fixed.observe(4, 30.0)
    assert fixed.points == {1: 1.0, 4: 2.0} and fixed.observed == 0


def test_step_cost_is_measured_once_then_read_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CLP_FAST_HOME", str(tmp_path))
    model = tiny_model("qwen2")
    model.config._name_or_path = "tiny-named-model"
    bb = NativeBackbone(model)
    calls = []
    monkeypatch.setattr(cost_mod, "measure", lambda bb_: calls.append(1) or StepCost({1: 0.5, 8: 1.0},
                                                                                    source="measured"))
    monkeypatch.setattr(cost_mod, "_CACHE", {})
    first = step_cost(bb)
    assert calls == [1] and first.source == "measured" and len(list((tmp_path / "cost").glob("*.json"))) == 1
    assert step_cost(bb) is first and calls == [1]  # the process's cache
    monkeypatch.setattr(cost_mod, "_CACHE", {})
    again = step_cost(bb)
    assert calls == [1] and again.source == "disk" and again.points == {1: 0.5, 8: 1.0}
    (next((tmp_path / "cost").glob("*.json"))).write_text("{not json")
    monkeypatch.setattr(cost_mod, "_CACHE", {})
    assert step_cost(bb).source == "measured" and calls == [1, 1]  # unreadable: measured again


def test_measure_times_every_size():
    c = cost_mod.measure(NativeBackbone(tiny_model("qwen2")), sizes=(1, 2, 4), context=8, reps=1)
    assert list(c.points) == [1, 2, 4] and all(t > 0 for t in c.points.values()) and c.source == "measured"


# ------------------------------------------------------------------------------------------ selection
def test_select_nodes_hand_computed():
    """A = 2 rows; returns e: row 0 0.9 then 0.45, row 1 0.3; cost 1 + 0.25 per token past 2.
    rate: n=0 2/1 = 2.0; n=1 2.9/1.25 = 2.32; n=2 3.35/1.5 = 2.23; n=3 3.65/1.75 = 2.09 -> one guess."""
    rows = [chain(7, [0.9, 0.5]), chain(8, [0.3])]
    c = StepCost({2: 1.0, 3: 1.25, 4: 1.5, 5: 1.75})
    pruned, info = select_nodes(rows, [[1.0] * 3] * 2, c)
    assert pruned[0][0] == [7, 100] and pruned[1][0] == [8]
    assert info["fed"] == 3 and info["expected"] == pytest.approx(2.9) and info["rate"] == pytest.approx(2.32)


def test_select_nodes_flat_cost_takes_everything_per_token_cost_nothing():
    rows = [chain(7, [0.9, 0.5, 0.1]), ([], [], [], []), chain(8, [0.02])]
    everything, _ = select_nodes(rows, [[1.0] * 3] * 3, StepCost(FLAT))
    assert [len(r[0]) for r in everything] == [4, 0, 2]
    nothing, info = select_nodes(rows, [[1.0] * 3] * 3, StepCost(PER_TOKEN))
    assert [len(r[0]) for r in nothing] == [1, 0, 1] and info["fed"] == 2
    capped, _ = select_nodes(rows, [[1.0] * 3] * 3, StepCost(FLAT), cap=3)  # 2 rows + 1 guess: the best one
    assert [r[0] for r in capped] == [[7, 100], [], [8]]


def test_select_nodes_uses_row_factors_and_remaps_parents():
    # a trie: node 1 and node 3 below the root, node 2 below node 1; node 3 is a lookup guess
    row = ([5, 11, 12, 13], [-1, 0, 1, 0], [1.0, 0.6, 0.6, 0.5], [-1, SOURCES.index("heads"),
                                                                   SOURCES.index("heads"), SOURCES.index("lookup")])
    c = StepCost({1: 1.0, 2: 1.2, 3: 1.4, 4: 1.6})  # 0.2 per token
    plain, _ = select_nodes([row], [[1.0, 1.0, 1.0]], c)
    # e = 0.6, 0.5, 0.36: rates 1.6 / 1.2 = 1.33, 2.1 / 1.4 = 1.5, 2.46 / 1.6 = 1.54 -> all three
    assert plain[0][0] == [5, 11, 12, 13]
    # this row's head guesses have been failing (factor 0.25): e = 0.5 (lookup), 0.15, 0.0225 -> rates 1.25,
    # 1.18, ... -> the lookup guess alone, its parent remapped to the root
    lookup_only, _ = select_nodes([row], [[1.0, 0.25, 1.0]], c)
    assert lookup_only[0][0] == [5, 13] and lookup_only[0][1] == [0, 0]
    # factor 2.5 on lookup makes its prior 1.25 -> capped at MAX_RATE 0.98, still below the root's 1
    _, info = select_nodes([row], [[2.5, 1.0, 1.0]], StepCost(FLAT))
    assert info["expected"] == pytest.approx(1 + 0.6 + 0.36 + 0.98)


def test_row_acceptance_factors():
    acc = RowAcceptance(2)
    assert acc.factors() == [[1.0] * 3] * 2
    li, hi = SOURCES.index("lookup"), SOURCES.index("heads")
    prior = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0.5]])
    src = torch.tensor([[-1, li, li, hi], [-1, li, li, hi]])
    tried = torch.tensor([[False, True, True, True], [False, True, True, True]])
    ok = torch.tensor([[False, True, True, False], [False, True, False, False]])
    acc.update(prior, src, tried, ok, torch.tensor([True, False]))
    f = acc.factors()
    assert f[0][li] == pytest.approx((2 + 2) / (2 + 1.0)) and f[0][hi] == pytest.approx(2 / 2.5)
    assert f[1] == [1.0, 1.0, 1.0]  # an inactive row keeps its history
    for _ in range(60):  # a row that never accepts: PRIOR_WEIGHT / (PRIOR_WEIGHT + expected per step / (1 - DECAY))
        acc.update(prior, src, tried, torch.zeros_like(ok), torch.tensor([True, True]))
    f = acc.factors()[1]
    assert f[li] == pytest.approx(2 / (2 + 1.0 / 0.2), rel=1e-3)
    assert f[hi] == pytest.approx(2 / (2 + 0.5 / 0.2), rel=1e-3)


# ------------------------------------------------------------------------------ packed forward, head rows
def test_packed_forward_runs_real_tokens_only_and_matches_each_row_alone():
    model = tiny_model("qwen2")
    bb = NativeBackbone(model)
    ids, mask = left_pad(PROMPTS)
    prompt_len = mask.sum(-1)
    prompts = torch.gather(ids, 1, torch.sort(mask, dim=-1, descending=True, stable=True).indices)
    cache = bb.allocate_cache(4, 32)
    with torch.no_grad():
        _, k0, v0 = bb.forward(prompts, cache, prompt_len)
        clp_fast.backend.commit_kv_span_(cache.k, cache.v, k0, v0, cache.lengths, prompt_len)
        cache.lengths += prompt_len
        tokens = torch.randint(0, 1000, (4, 4))
        new_len = torch.tensor([3, 1, 0, 2])
        rows_seen = []
        hook = bb.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
        hidden, new_k, _ = bb.forward(tokens, cache, new_len)
        hook.remove()
        assert rows_seen == [6]  # 3 + 1 + 0 + 2 real tokens, not 4 x 4
        for b in range(4):
            n = int(new_len[b])
            assert not hidden[b, n:].any()  # padding holds zeros
            if n == 0:
                continue
            alone = bb.allocate_cache(1, 32)
            alone.k[:, 0], alone.v[:, 0], alone.lengths[0] = cache.k[:, b], cache.v[:, b], cache.lengths[b]
            h1, k1, _ = bb.forward(tokens[b : b + 1, :n], alone, new_len[b : b + 1])
            torch.testing.assert_close(hidden[b, :n], h1[0], rtol=0, atol=1e-5)  # fp32, ~1e-7 observed
            torch.testing.assert_close(new_k[:, b, :, :n], k1[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("draft_vocab,top_m", [(40, 1), (40, 3), (None, 1)])
def test_head_rows_equal_fused_heads_head_columns(draft_vocab, top_m):
    g = torch.Generator().manual_seed(0)
    R, H, V, k = 5, 32, 100, 3
    hidden, W = torch.randn(R, H, generator=g), torch.randn(V, H, generator=g)
    hw, hb = 0.3 * torch.randn(k, H, H, generator=g), 0.1 * torch.randn(k, H, generator=g)
    full = reference.fused_heads(hidden, hw, hb, W, draft_vocab=draft_vocab, top_m=top_m)
    part = reference.head_rows(hidden, hw, hb, W, draft_vocab=draft_vocab, top_m=top_m)
    assert torch.equal(part[0], full[0][:, 1:])
    # fp32: the same products; with the whole vocabulary fused_heads multiplies k + 1 rows in one matmul
    torch.testing.assert_close(part[1], full[1][:, 1:], rtol=0, atol=1e-6)
    if top_m > 1:
        assert torch.equal(part[2], full[3]) and torch.allclose(part[3], full[4], atol=1e-6)


# ------------------------------------------------------------------------------------------ end to end
def test_adaptive_turns_speculation_off_when_a_token_costs_more_than_it_returns(monkeypatch):
    """Right guesses (oracle drafts): a flat cost feeds them, a per-token cost feeds none and decodes as greedy
    does (one forward per token); both outputs are transformers' greedy (fp32)."""
    model, ids, mask, want = oracle_batch(monkeypatch)
    kw = dict(attention_mask=mask, max_new_tokens=20, mode="lossless", eos_token_id=[], pad_token_id=0,
              prompt_lookup=0, return_stats=True)
    on, st_on = clp_fast.generate(model, ids, random_heads(model, 3), cost_model=StepCost(FLAT, learn=False), **kw)
    off, st_off = clp_fast.generate(model, ids, random_heads(model, 3), cost_model=StepCost(PER_TOKEN, learn=False),
                                    **kw)
    assert_equal_ids(on, want)
    assert_equal_ids(off, want)
    assert sum(st_on.accept_hist[1:]) > 0 and st_on.forward_passes < 15, st_on.accept_hist
    assert sum(st_off.accept_hist[1:]) == 0 and st_off.forward_passes == 20
    assert st_off.fed_tokens == 19 * 4  # every step feeds each row its pending token only


def _early_eos(want: torch.Tensor, P: int) -> tuple[int, int]:
    """A token row 0 emits at some step 2..6 that row 1 never emits in its first 20 (nor row 0 earlier)."""
    r0, r1 = want[0, P:].tolist(), want[1, P:].tolist()
    for t in range(2, 7):
        if r0[t] not in r1 and r0[t] not in r0[:t]:
            return r0[t], t
    raise AssertionError(f"no early EOS candidate in {r0} / {r1}")


def test_adaptive_turns_speculation_back_on_when_rows_finish(monkeypatch):
    """Cost flat up to 2 fed tokens, 10x beyond: while both rows decode (A = 2) no guess pays; once row 0 has
    hit its EOS, row 1 alone (A = 1) feeds a guess again. Output: transformers' greedy with that EOS."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS[:2])
    P = ids.shape[1]
    plain = hf_greedy(model, ids, mask, 20)
    eos, when = _early_eos(plain, P)
    want = hf_greedy(model, ids, mask, 20, eos=[eos])
    seqs = [plain[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(2)]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, 10**9))
    fed, forward = [], NativeBackbone.forward

    def spy(self, tokens, cache, new_len, *a):
        fed.append(new_len.tolist())
        return forward(self, tokens, cache, new_len, *a)

    monkeypatch.setattr(NativeBackbone, "forward", spy)
    got = clp_fast.generate(model, ids, random_heads(model, 3), attention_mask=mask, max_new_tokens=20,
                            mode="lossless", eos_token_id=[eos], pad_token_id=0, prompt_lookup=0,
                            cost_model=StepCost({1: 1.0, 2: 1.0, 3: 10.0, 4: 20.0}, learn=False))
    assert_equal_ids(got, want)
    steps = fed[1:]  # fed[0] is the prefill
    both = [s for s in steps if s[0] > 0 and s[1] > 0]
    alone = [s for s in steps if s[0] == 0]
    assert len(both) == when and all(s == [1, 1] for s in both), steps
    assert alone and max(s[1] for s in alone) == 2, steps  # one guess again (c(3) = 10 keeps it to one)


def test_speculation_argument_is_checked():
    model = tiny_model("qwen2")
    heads = MTPHeads.for_model(model, 2)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="speculation='sometimes'"):
        clp_fast.generate(model, ids, heads, max_new_tokens=2, speculation="sometimes")
    with pytest.raises(TypeError, match="cost_model must be"):
        clp_fast.generate(model, ids, heads, max_new_tokens=2, cost_model={1: 1.0})


@pytest.mark.parametrize("cost_model", ["flat", "measured"])
def test_ragged_batch_of_16_lossless_equals_transformers_greedy(monkeypatch, cost_model):
    """16 ragged left-padded rows (lengths 1-12), right and wrong guesses (oracle drafts, every 3rd corrupted),
    prompt lookup on, an EOS some rows hit: fp32 lossless == transformers' batched greedy row for row, with a
    flat cost (everything fed) and with this machine's measured one."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 13, (16,),
                                                                                              generator=g)]
    ids, mask = left_pad(prompts)
    plain = hf_greedy(model, ids, mask, 24)
    P = ids.shape[1]
    eos = plain[0, P + 5].item()  # row 0 stops after 6 tokens; others wherever this token occurs
    want = hf_greedy(model, ids, mask, 24, eos=[eos])
    seqs = [plain[b][mask[b].bool().tolist() + [True] * 24].tolist() for b in range(16)]
    monkeypatch.setattr(heads_src, "fused_rows", OracleDrafts(model, seqs, corrupt_every=3))
    cm = StepCost(FLAT, learn=False) if cost_model == "flat" else None
    got, st = clp_fast.generate(model, ids, random_heads(model, 3), attention_mask=mask, max_new_tokens=24,
                                mode="lossless", eos_token_id=[eos], pad_token_id=0, return_stats=True, cost_model=cm)
    assert_equal_ids(got, want)
    if cost_model == "flat":
        assert sum(st.accept_hist[1:]) > 0 and st.forward_passes < 24, st.accept_hist


def test_heads_worth_skips_heads_that_do_not_pay_and_probes_again():
    from clp_fast.drafts.heads import PROBE_EVERY, HeadsWorth

    w = HeadsWorth()
    assert w.want()  # nothing measured yet
    w.observe_gain(0.05, 5.0)  # head guesses: 1 % of the expected tokens
    w.observe_cost(0.01, 0.1)  # ... for 10 % of the step
    assert [w.want() for _ in range(PROBE_EVERY + 1)] == [False] * PROBE_EVERY + [True]
    w.observe_gain(2.0, 5.0)  # 40 % of the tokens (EMA 0.01 -> 0.127) now beats 10 % of the time
    assert w.gain == pytest.approx(0.01 + 0.3 * (0.4 - 0.01)) and w.want() and w.want()


def test_heads_are_not_computed_while_no_head_guess_pays(monkeypatch):
    """A per-token cost selects no guess, so the heads bring nothing: after the first step they run only as
    probes (every PROBE_EVERY + 1 steps); the output stays transformers' greedy."""
    from clp_fast.drafts.heads import PROBE_EVERY

    model = tiny_model("qwen2")
    heads = random_heads(model, 3)
    calls, original = [], MTPHeads.head_rows

    def spy(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(MTPHeads, "head_rows", spy)
    ids, mask = left_pad(PROMPTS)
    got, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=30, mode="lossless",
                                eos_token_id=[], pad_token_id=0, return_stats=True,
                                cost_model=StepCost(PER_TOKEN, learn=False))
    assert_equal_ids(got, hf_greedy(model, ids, mask, 30))
    steps = st.forward_passes - 1
    assert 1 <= len(calls) <= 2 + steps // (PROBE_EVERY + 1), (len(calls), steps)
    calls.clear()
    _, st = clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=30, mode="lossless",
                              eos_token_id=[], pad_token_id=0, return_stats=True,
                              cost_model=StepCost(FLAT, learn=False))
    assert len(calls) == st.forward_passes - 1  # every guess pays (free tokens): the heads run after every step


def test_speculation_worth_follows_the_faster_kind_and_probes_the_other():
    """Speculation first; greedy probed after FIRST_PROBE steps; then the faster kind by tokens/s summed over the
    window, the slower one probed again every PROBE_EVERY steps (4x as rarely when it loses by more than 25 %)."""
    from clp_fast.engine.speculation import PROBE_EVERY, SpeculationWorth

    w = SpeculationWorth()
    first = w.FIRST_PROBE
    assert w.want()
    w.observe(True, 16, 1.0)  # speculating: 16 tokens/s
    assert [w.want() for _ in range(first + 1)] == [True] * first + [False]  # greedy probed once
    w.observe(False, 30, 1.0)  # greedy: 30 tokens/s, > 25 % faster
    assert not w.winning()
    picks = [w.want() for _ in range(4 * PROBE_EVERY + 1)]
    assert picks == [False] * (4 * PROBE_EVERY) + [True]  # greedy wins; speculation re-probed rarely
    for _ in range(w.WINDOW):  # the batch changed: speculation now far faster, and the window forgets the old
        w.observe(True, 300, 1.0)
    assert w.rate(True) == 300.0 and w.winning() and w.want()
    w.observe(True, 0, 1.0)  # nothing committed: ignored
    w.observe(False, 5, 0.0)  # no time: ignored
    assert w.rate(False) == 30.0 and w.rate(True) == 300.0
    w.observe(False, 10, 2.0)  # a window is a sum: 40 tokens in 3 s
    assert w.rate(False) == pytest.approx(40 / 3)
    assert SpeculationWorth(enabled=False).want() and SpeculationWorth(enabled=False).winning()


class ScriptedClock:
    """The loop's source clock (``loop.source_clock``): time moves only when a scripted source says it worked, so
    the gate sees exactly the cost it is given however loaded the machine is."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowScript(DraftSource):
    """A draft source that costs ``delay`` seconds per propose (on ``clock``) and guesses the next three tokens of
    ``text`` (the full sequence, prompt first): the greedy continuation (useful) or noise (useless). Batch 1."""

    kinds, max_depth = ("scripted",), 3

    def __init__(self, text: list[int], delay: float, clock: ScriptedClock):
        self.text, self.delay, self.clock, self.seq = text, delay, clock, []

    def advance(self, acc) -> None:
        self.seq += acc.new_tokens[0]

    def propose(self, live):
        self.clock.now += self.delay
        n = len(self.seq) + 1  # the pending token follows the committed ones
        return [[Branch(self.text[n : n + 3], [0.5] * 3, "scripted")]]


@pytest.mark.parametrize("useful", [True, False])
def test_source_gate_asks_a_costly_source_only_while_it_pays(useful, monkeypatch):
    """A source costing 5 ms per step beside a 10 ms forward (priced by a fixed cost model): guessing greedy's own
    continuation it pays and is asked every step; guessing noise it is skipped most steps (probed again), while
    the output stays greedy's either way. SourceGate's arithmetic on its own: a gain below 1 skips."""
    model = tiny_model("qwen2")
    ids = torch.tensor([PROMPTS[0]])
    want = hf_greedy(model, ids, torch.ones_like(ids), 48)
    text = want[0].tolist() if useful else torch.randint(5, 200, (want.shape[1] + 8,),
                                                          generator=torch.Generator().manual_seed(0)).tolist()
    made, clock = [], ScriptedClock()
    monkeypatch.setattr(loop, "source_clock", clock)

    def factory(bb, heads, calib):
        made.append(SlowScript(text, 0.005, clock))
        return made[-1]

    got, st = clp_fast.generate(model, ids, False, max_new_tokens=48, eos_token_id=[], pad_token_id=0,
                                prompt_lookup=0, drafts=[factory], return_stats=True,
                                cost_model=StepCost({1: 0.010, 8: 0.0105}, learn=False))
    assert_equal_ids(got, want)
    (src,) = st.sources
    assert src["source"] == "SlowScript" and src["propose_s"] == pytest.approx(0.005)
    if useful:
        assert src["skipped"] == 0 and src["gain"] > 1.0, src
        assert st.tau > 2.5, st.tau
    else:
        assert src["skipped"] > 2 * src["asked"] and src["gain"] < 1.0, src  # measured: 37 skipped, 11 asked

    gate = SourceGate(1)
    gate.paid(0, 0.005)
    assert gate.priced(0, 0.1) and not gate.priced(0, 0.5)  # 5 ms is 5 % of 100 ms, 1 % of 500 ms
    gate.observe(0, {"expected": 1.0}, 100.0, 0.010)  # 1 token in 15 ms (66.7/s) against 100/s without it
    assert gate.gain[0] == pytest.approx(1.0 / 0.015 / 100.0)
    assert [gate.asks(0) for _ in range(4 * 8)].count(True) == 1  # gain < 0.8: one probe in 32 steps
