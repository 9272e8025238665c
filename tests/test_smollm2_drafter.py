"""The shipped SmolLM2 drafter on the real SmolLM2-135M-Instruct (fetched by ``make test``): ``drafts=["eagle"]``
finds it by its LM-head fingerprint and loads its int8 file; fp32 lossless output equals transformers' greedy as a
chain and as an EAGLE-2 tree, B = 1 and ragged B = 4, and its guesses are accepted where a random drafter's are
not (the control)."""

from __future__ import annotations

import pytest

import clp_fast
from clp_fast.assets import shipped_drafter_for
from clp_fast.drafts import eagle
from clp_fast.drafts.eagle_model import EagleDrafter
from tests.conftest import assert_equal_ids, left_pad

TEXTS = ["# Sort a list of integers in place\ndef bubble_sort(xs):",
         "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
         "def is_prime(n):\n    if n < 2:\n        return False\n",
         "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"]
N_NEW = 32


def _decode(model, ids, mask, pad):
    return clp_fast.generate(model, ids, False, attention_mask=mask, max_new_tokens=N_NEW, mode="lossless",
                             pad_token_id=pad, prompt_lookup=0, drafts=["eagle"],
                             return_stats=True, speculation="fixed")


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("batch", ["B=1", "ragged B=4"])
def test_shipped_drafter_lossless_equals_transformers_greedy_fp32(smollm2, shape, batch):
    model, tok = smollm2
    shipped = shipped_drafter_for(model)
    assert shipped is not None and shipped.backbone == "smollm2-135m-instruct"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [tok(t)["input_ids"] for t in (TEXTS[:1] if batch == "B=1" else TEXTS)]
    ids, mask = left_pad(rows, pad=pad)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=pad)
    try:
        if shape == "tree":
            eagle.use_drafter(model, shipped, top_m=3)
        else:
            eagle.use_drafter(model, None)  # drafts=["eagle"] takes the shipped drafter that fits
        got, st = _decode(model, ids, mask, pad)
        assert_equal_ids(got, want)
        accepted = st.accepted
        assert accepted >= N_NEW * len(rows) // 8, st.accept_hist  # an eighth of the tokens came from its guesses
        if shape == "chain":  # the control: a random drafter of the same shape, same prompts
            eagle.use_drafter(model, EagleDrafter.for_model(model, init="random", std=0.05))
            got_r, st_r = _decode(model, ids, mask, pad)
            assert_equal_ids(got_r, want)
            assert st_r.accepted < accepted // 2, (st_r.accept_hist, st.accept_hist)
    finally:
        eagle.use_drafter(model, None)
