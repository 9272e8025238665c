"""The draft-source interface (clp_fast.drafts): a new source is one class plus its registration, and the loop
merges it with the heads and prompt lookup without changing what lossless decoding says."""

from __future__ import annotations

import pytest

import clp_fast
from clp_fast import drafts
from clp_fast.drafts.base import Accepted, Branch, DraftSource
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS, hf_greedy, random_heads


class ContinuationSource(DraftSource):
    """Guesses each row's true greedy continuation (known in advance), spoiled at every ``spoil``-th step; records
    what the loop showed it."""

    kinds = ("oracle",)
    max_depth = 5

    def __init__(self, sequences: list[list[int]], spoil: int):
        self.sequences, self.spoil, self.steps = sequences, spoil, 0
        self.seen: list[list[int]] = []  # per row: the prompt, then every committed token, as advance() saw them
        self.pending: list[int] = []

    def advance(self, acc: Accepted) -> None:
        if not self.seen:
            self.seen = [[] for _ in acc.new_tokens]
        for row, new in zip(self.seen, acc.new_tokens):
            row += new
        self.pending = acc.pending.tolist()

    def propose(self, live: list[bool]) -> list[list[Branch]]:
        self.steps += 1
        out = []
        for b, ok in enumerate(live):
            ctx = self.seen[b] + [self.pending[b]]
            seq = self.sequences[b]
            guess = seq[len(ctx): len(ctx) + self.max_depth] if ok and seq[: len(ctx)] == ctx else []
            if guess and self.steps % self.spoil == 0:
                guess[0] = (guess[0] + 1) % 1000
            out.append([Branch(guess, [0.9] * len(guess), "oracle")] if guess else [])
        return out


@pytest.fixture
def oracle(monkeypatch):
    """The tiny Qwen2 model, PROMPTS left-padded, transformers' greedy output (24 tokens) and a registered
    ``"oracle"`` source that guesses it: ``(model, ids, mask, want, made)`` (``made``: the sources created)."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 24)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 24].tolist() for b in range(len(PROMPTS))]
    made = []

    def factory(bb, heads, calib):
        made.append(ContinuationSource(seqs, spoil=3))
        return made[-1]

    monkeypatch.setitem(drafts.REGISTRY, "oracle", factory)
    return model, ids, mask, want, made


@pytest.mark.parametrize("speculation", ["fixed", "adaptive"])
def test_a_registered_source_is_verified_with_the_others_and_output_stays_greedy(oracle, speculation):
    """fp32, ragged B = 4: the oracle's guesses (deeper than the k = 2 heads reach, a third of them spoiled) join
    the heads' and the lookup's in one tree; output equals transformers' greedy; guesses deeper than the heads
    and the lookup width reach are accepted, so the oracle's branch won steps; the source saw the prompt and then
    exactly the committed tokens."""
    model, ids, mask, want, made = oracle
    got, st = clp_fast.generate(model, ids, random_heads(model, 2), attention_mask=mask, max_new_tokens=24,
                                mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=2, drafts=["oracle"],
                                speculation=speculation, return_stats=True)
    assert_equal_ids(got, want)
    assert len(st.accept_hist) == 5 + 1  # the deepest source sets the width
    assert sum(st.accept_hist[3:]) > 0, st.accept_hist  # depth > max(k, lookup width): only the oracle reaches it
    (src,) = made
    P = ids.shape[1]
    for b, row in enumerate(src.seen):
        real = mask[b].bool()
        assert row == want[b, :P][real].tolist() + want[b, P:P + len(row) - int(real.sum())].tolist()


def test_factories_and_bad_sources_are_named(oracle):
    model, ids, mask, want, _ = oracle
    heads = random_heads(model, 2)
    kw = dict(attention_mask=mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    seqs = [want[b].tolist() for b in range(len(PROMPTS))]
    got = clp_fast.generate(model, ids, heads, mode="lossless", drafts=[lambda bb, h, c: ContinuationSource(seqs, 2)],
                            **kw)
    assert_equal_ids(got, want[:, : ids.shape[1] + 4])
    with pytest.raises(ValueError, match="'nowhere' is not registered"):
        clp_fast.generate(model, ids, heads, mode="lossless", drafts=["nowhere"], **kw)
    with pytest.raises(TypeError, match="returned int, not a DraftSource"):
        clp_fast.generate(model, ids, heads, mode="lossless", drafts=[lambda bb, h, c: 3], **kw)
    with pytest.raises(ValueError, match="need mode='lossless'"):
        clp_fast.generate(model, ids, heads, mode="greedy", drafts=["oracle"], **kw)
    with pytest.raises(ValueError, match="pass heads=False"):  # clp mode keeps one source's chain unverified
        clp_fast.generate(model, ids, heads, mode="clp", drafts=["oracle"], **kw)
    with pytest.raises(ValueError, match="ContinuationSource cannot decide which of its guesses"):
        clp_fast.generate(model, ids, False, mode="clp", prompt_lookup=0,
                          drafts=[lambda bb, h, c: ContinuationSource(seqs, 2)], **kw)


def test_processed_decoding_takes_the_same_sources(oracle):
    """generate_processed (greedy acceptance through an empty processor list) verifies the oracle's guesses too:
    transformers' greedy output, fewer forwards than tokens."""
    model, ids, mask, want, _ = oracle
    got, st = clp_fast.generate_processed(model, ids, random_heads(model, 2), attention_mask=mask, max_new_tokens=24,
                                          mode="lossless", eos_token_id=[], pad_token_id=0, drafts=["oracle"],
                                          prompt_lookup=0, max_step_tokens=None, return_stats=True)
    assert_equal_ids(got, want)
    assert sum(st.accept_hist[3:]) > 0 and st.forward_passes < 24, st.accept_hist  # deeper than k = 2: the oracle


@pytest.mark.parametrize("call", ["generate", "generate_processed"])
def test_without_heads_the_sources_alone_draft(oracle, call):
    """``heads=False``: no MTP heads; lossless decoding from prompt lookup and the oracle alone still equals
    transformers' greedy (fp32, ragged B = 4), its deep guesses accepted; ``mode='clp'`` without heads is named."""
    model, ids, mask, want, made = oracle
    fn = getattr(clp_fast, call)
    got, st = fn(model, ids, False, attention_mask=mask, max_new_tokens=24, mode="lossless", eos_token_id=[],
                 pad_token_id=0, prompt_lookup=2, drafts=["oracle"], max_step_tokens=None, return_stats=True,
                 speculation="fixed")  # adaptive speculation learns from measured time: not for a count assertion
    assert_equal_ids(got, want)
    assert sum(st.accept_hist[3:]) > 0 and st.forward_passes < 24, st.accept_hist
    if call == "generate":
        with pytest.raises(ValueError, match="heads=False: mode='clp' needs MTP heads"):
            fn(model, ids, False, attention_mask=mask, max_new_tokens=4, mode="clp", eos_token_id=[], pad_token_id=0)


def test_drafts_without_heads_get_prompt_lookup_by_default(oracle):
    """Lossless mode, heads=False and drafts: prompt lookup (LOOKUP_WIDTH) joins them unless prompt_lookup says
    otherwise; clp mode keeps its one unverified source."""
    model, ids, mask, want, _ = oracle
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], pad_token_id=0, drafts=["oracle"],
              return_stats=True)
    got, st = clp_fast.generate(model, ids, False, mode="lossless", **kw)
    assert_equal_ids(got, want[:, : ids.shape[1] + 8])
    assert [s["source"] for s in st.sources] == ["PromptLookup", "ContinuationSource"]
    _, st = clp_fast.generate(model, ids, False, mode="lossless", prompt_lookup=0, **kw)
    assert [s["source"] for s in st.sources] == ["ContinuationSource"]
