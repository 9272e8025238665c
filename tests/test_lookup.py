"""Prompt-lookup drafts: the n-gram search, and lossless decoding that uses it."""

from __future__ import annotations

import pytest
import torch

import clp_fast
from clp_fast.drafts.lookup import lookup_continuation
from clp_fast.heads import MTPHeads
from tests.conftest import assert_equal_ids, left_pad, tiny_model


@pytest.mark.parametrize(
    "context,max_tokens,max_ngram,want",
    [
        ([5, 6, 7, 9, 5, 6], 2, 2, [7, 9]),  # suffix [5, 6] seen at 0, followed by 7, 9
        ([5, 6, 7, 9, 5, 6], 9, 2, [7, 9, 5, 6]),  # cut at the end of the context
        ([1, 2, 3], 3, 3, []),  # nothing repeats
        ([1, 2, 1], 3, 3, [2, 1]),  # only the 1-gram [1] matches
        ([8, 1, 2, 9, 1, 2, 7, 3, 1, 2], 1, 2, [7]),  # the latest earlier occurrence wins
        ([3, 1, 2, 4, 0, 1, 2], 2, 3, [4, 0]),  # 3-gram [0,1,2] unseen, falls back to [1,2]
        ([4, 4, 4, 4], 5, 3, [4]),
        ([], 3, 3, []),
        ([7], 3, 3, []),
        ([1, 2, 1], 0, 3, []),
    ],
)
def test_lookup_continuation(context, max_tokens, max_ngram, want):
    assert lookup_continuation(context, max_tokens, max_ngram) == want


def test_lossless_with_lookup_equals_greedy_tiny():
    """Row 2's greedy continuation repeats a token four times; heads that always guess wrong accept nothing
    there, so every guess accepted with prompt lookup on came from the lookup branch. Output == greedy."""
    model = tiny_model("qwen2")
    rows = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], [1, 2, 3, 1, 2]]
    ids, mask = left_pad(rows)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    heads = MTPHeads.for_model(model, 2)
    with torch.no_grad():
        heads.weight.normal_(std=1.0)  # far from the identity: the heads' guesses are noise
    kw = dict(attention_mask=mask, max_new_tokens=24, mode="lossless", eos_token_id=[], pad_token_id=0,
              return_stats=True, speculation="fixed")  # acceptance must not depend on this machine's cost model
    got, st = clp_fast.generate(model, ids, heads, prompt_lookup=6, **kw)
    assert_equal_ids(got, want)
    no_lookup, st0 = clp_fast.generate(model, ids, heads, prompt_lookup=0, **kw)
    assert_equal_ids(no_lookup, want)
    assert sum(st0.accept_hist[1:]) == 0, st0.accept_hist  # the heads alone never guess right here ...
    assert sum(st.accept_hist[1:]) > 0, st.accept_hist  # ... so these acceptances are the lookup's
    assert st.row_forwards[2] < st0.row_forwards[2], (st.row_forwards, st0.row_forwards)


def test_lookup_speeds_up_a_repetitive_continuation(smollm2):
    model, tok = smollm2
    text = "red green blue yellow red green blue yellow red green blue yellow red green"
    ids = torch.tensor([tok(text)["input_ids"]])
    want = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    heads = MTPHeads.for_model(model, 2)
    got, st = clp_fast.generate(model, ids, heads, max_new_tokens=24, mode="lossless", prompt_lookup=8,
                                return_stats=True, speculation="fixed")
    assert_equal_ids(got, want)
    assert st.tau > 1.5, st.to_dict()


@pytest.mark.parametrize("mode,n,match", [("clp", 4, "needs mode='lossless'"), ("lossless", -1, "prompt_lookup=-1"),
                                          ("lossless", 33, "prompt_lookup=33")])
def test_lookup_arguments_are_checked(mode, n, match):
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match=match):
        clp_fast.generate(model, torch.ones(1, 3, dtype=torch.long), MTPHeads.for_model(model, 2), max_new_tokens=3,
                          mode=mode, prompt_lookup=n)
