"""The drafter in ``mode="clp"`` (the paper's mode): its CLP decides how much of its chain is kept unverified.

The spec is a reference decoder written here from the definitions alone, with no cache: recompute the backbone
over the committed tokens, take its next token, draft the chain by unrolling the drafter over the teacher-forced
pairs (:func:`clp_fast.train.eagle.unrolled`, the training-time view), keep the prefix the CLP takes
(:func:`clp_fast.reference.clp_accept_lengths`), repeat. The engine (static cache, the drafter's own K/V cache,
catch-up over committed pairs, a ragged batch) must give the same ids in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

import clp_fast
from clp_fast import reference
from clp_fast.drafts.eagle import EagleDrafter, EagleSource
from clp_fast.heads import MTPHeads
from clp_fast.train.eagle import unrolled
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS
from tests.test_eagle import random_drafter
from tests.test_eagle_train import _train

DEPTH = 3


def with_clp(model, bias, scale: float = 0.0, threshold: float = 0.5, seed: int = 0) -> EagleDrafter:
    """A random drafter whose CLP has logits ``bias + scale * (random projection of [h, conf])``."""
    d = random_drafter(model)
    clp = d.attach_clp(DEPTH, threshold)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clp.linear.weight.copy_(torch.randn(clp.linear.weight.shape, generator=g) * scale)
        clp.linear.bias.copy_(torch.tensor(bias, dtype=torch.float))
    return d


def reference_clp_decode(model, d: EagleDrafter, prompt: list[int], n_new: int) -> list[int]:
    """clp mode from the definitions, one row, recomputing everything each step."""
    W, embed = model.get_output_embeddings().weight, model.get_input_embeddings()
    seq, out = list(prompt), []
    while True:
        with torch.no_grad():
            h = model.model(torch.tensor([seq])).last_hidden_state[0]  # [L, H]
        pending = int(model.lm_head(h[-1]).argmax())
        out.append(pending)
        if len(out) >= n_new:
            return out[:n_new]
        a, chain, probs = len(seq) - 1, [], []
        for j in range(1, DEPTH + 1):  # anchor a reads (h_a, pending); depth j reads the chain's guess j - 1
            toks = torch.tensor([seq + [pending] + chain])
            hid = torch.cat([h, h.new_zeros(j, h.shape[1])])[None]
            with torch.no_grad():
                f = unrolled(d, embed, hid, toks, j)[j - 1][0, a]
                logits = (W[: d.draft_vocab] @ f).float()
            chain.append(int(logits.argmax()))
            probs.append(float(torch.softmax(logits, -1).max()))
        n = int(reference.clp_accept_lengths(h[-1][None], torch.tensor([probs]), d.clp.linear.weight,
                                             d.clp.linear.bias, d.clp_threshold)[0])
        out += chain[:n]
        seq += [pending] + chain[:n]


def clp_decode(model, ids, mask, d, n, **kw):
    return clp_fast.generate(model, ids, False, attention_mask=mask, max_new_tokens=n, mode="clp", eos_token_id=[],
                             pad_token_id=0, drafts=[EagleSource.factory(d, depth=DEPTH)], return_stats=True, **kw)


@pytest.mark.parametrize("batch", ["B=1", "ragged B=3"])
def test_clp_mode_with_the_drafter_equals_the_reference_decoder(batch):
    """fp32: a CLP whose decisions vary from step to step (a random projection of the step's features); the
    engine's ids equal the reference decoder's per row, and the accept lengths it took cover 0 and >= 2."""
    model = tiny_model("qwen2")
    d = with_clp(model, [1.0, 0.0, -0.5], scale=0.6)
    rows = PROMPTS[:1] if batch == "B=1" else PROMPTS[:3]
    ids, mask = left_pad(rows)
    got, st = clp_decode(model, ids, mask, d, 20)
    P = ids.shape[1]
    for b, prompt in enumerate(rows):
        want = reference_clp_decode(model, d, prompt, 20)
        assert got[b, P:].tolist() == want, (b, got[b, P:].tolist(), want)
    assert st.mode == "clp" and st.accept_hist[0] > 0 and sum(st.accept_hist[2:]) > 0, st.accept_hist


def test_the_threshold_bounds_what_is_taken():
    """A CLP that takes nothing (bias -10) decodes greedy (one forward per token); one that takes all (bias +10)
    keeps every depth-3 chain (the random drafter's guesses, unverified: no longer greedy); the caller's
    ``clp_threshold`` overrides the saved one."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS[:1])
    greedy = clp_fast.generate(model, ids, None, attention_mask=mask, max_new_tokens=16, mode="greedy",
                               eos_token_id=[], pad_token_id=0)
    none, st0 = clp_decode(model, ids, mask, with_clp(model, [-10.0] * DEPTH), 16)
    assert_equal_ids(none, greedy)
    assert st0.forward_passes == 16 and sum(st0.accept_hist[1:]) == 0, st0.accept_hist
    every, st1 = clp_decode(model, ids, mask, with_clp(model, [10.0] * DEPTH), 16)
    # 4 tokens per step (pending + 3): prefill, 3 steps, and the last 4 tokens known without a forward
    assert st1.forward_passes == 4 and st1.accept_hist == [0, 0, 0, 4], st1.accept_hist
    assert not torch.equal(every, greedy)
    _, st2 = clp_decode(model, ids, mask, with_clp(model, [10.0] * DEPTH), 16, clp_threshold=1.0)
    assert st2.forward_passes == 16, st2.accept_hist


def test_bad_clp_calls_are_named():
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS[:1])
    kw = dict(attention_mask=mask, max_new_tokens=4, mode="clp", eos_token_id=[], pad_token_id=0)
    with pytest.raises(ValueError, match="this drafter has none"):
        clp_fast.generate(model, ids, False, drafts=[EagleSource.factory(random_drafter(model))], **kw)
    d = with_clp(model, [0.0] * DEPTH)
    with pytest.raises(ValueError, match="pass heads=False, prompt_lookup=0 and one drafts"):
        clp_fast.generate(model, ids, MTPHeads.for_model(model, 1), drafts=[EagleSource.factory(d)], **kw)
    with pytest.raises(ValueError, match="2 draft source"):
        clp_fast.generate(model, ids, False, drafts=[EagleSource.factory(d), EagleSource.factory(d)], **kw)
    with pytest.raises(ValueError, match="takes one chain; top_m=2"):
        clp_fast.generate(model, ids, False, drafts=[EagleSource.factory(d, top_m=2)], **kw)
    with pytest.raises(ValueError, match="heads=False: mode='clp' needs MTP heads or a drafts"):
        clp_fast.generate(model, ids, False, **kw)
    with pytest.raises(ValueError, match="threshold=1.5"):
        d.attach_clp(DEPTH, 1.5)


def test_training_fits_and_saves_the_drafters_clp(tmp_path):
    """The training run attaches a CLP fitted on the held-out positions; its threshold and validation table are
    in the card; save / load keeps it in fp32 (the drafter saved in bf16), and it decodes in clp mode."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    got = _train(model, tmp_path, "run", save_dtype=torch.bfloat16)
    card = json.loads((tmp_path / "run" / "training_card.json").read_text())
    clp = card["clp"]
    assert clp["rows_fit"] > 0 and clp["rows_val"] > 0
    assert [r["depth"] for r in clp["clp"]["per_depth"]] == [1, 2, 3]
    assert got.clp is not None and got.clp.k == DEPTH and got.clp_threshold == clp["clp"]["threshold"]
    assert got.clp.linear.weight.dtype == torch.float32 and got.fc.weight.dtype == torch.float32
    assert bool(got.clp.linear.weight.abs().sum() > 0)  # fitted, not the zero init
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["clp"] == {"depth": DEPTH, "threshold": clp["clp"]["threshold"]}
    bf = EagleDrafter.from_pretrained(tmp_path / "run", model=model, dtype=torch.bfloat16)
    assert bf.clp.linear.weight.dtype == torch.float32 and bf.fc.weight.dtype == torch.bfloat16
    assert torch.equal(bf.clp.linear.weight, got.clp.linear.weight)
    ids, mask = left_pad(PROMPTS[:1])
    out, st = clp_decode(model, ids, mask, got, 8)
    assert out.shape[1] == ids.shape[1] + 8 and st.mode == "clp"
