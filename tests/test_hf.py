"""The transformers drop-in: ``custom_generate=clp_fast.hf.generate`` and ``clp_fast.patch(model)``
against transformers' own ``generate`` (greedy in fp32, processors, stop strings, streamers, errors)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import clp_fast
from clp_fast import hf
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS, random_heads


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen2")
    return model, random_heads(model, k=3)


@pytest.fixture
def patched(tiny):
    model, heads = tiny
    clp_fast.patch(model, heads)
    yield model
    if clp_fast.is_patched(model):
        clp_fast.unpatch(model)


def batch(rows):
    return left_pad([PROMPTS[r] for r in rows])


class Recorder:
    """A streamer that records every put and counts end() calls."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        assert self.ends == 0, "put after end"
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ends += 1

    def new_tokens(self) -> list[int]:
        return [t for p in self.puts[1:] for t in p]


# ------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("rows", [[0], [0, 1, 2, 3]], ids=["B1", "B4-ragged"])
@pytest.mark.parametrize("mode", ["greedy", "lossless"])
def test_custom_generate_greedy_equals_transformers(tiny, rows, mode):
    model, heads = tiny
    ids, mask = batch(rows)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         custom_generate=hf.generate, heads=heads, mode=mode)
    assert_equal_ids(got, want)


def test_patched_greedy_equals_transformers_then_unpatch_restores(tiny):
    model, heads = tiny
    ids, mask = batch([0, 1, 2, 3])
    kw = dict(attention_mask=mask, max_length=ids.shape[1] + 14, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True)
    want = model.generate(ids, **kw)
    clp_fast.patch(model, heads)
    try:
        got = model.generate(ids, **kw)
    finally:
        clp_fast.unpatch(model)
    assert type(got).__name__ == "GenerateDecoderOnlyOutput"
    assert_equal_ids(got.sequences, want.sequences)
    assert "generate" not in model.__dict__ and not clp_fast.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        clp_fast.unpatch(model)


def eos_from_greedy(model, ids, mask, at=((0, 3), (2, 5))):
    """EOS ids taken from transformers' greedy output (row, step), so that rows really stop early."""
    base = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    P = ids.shape[1]
    return sorted({int(base[r, P + s]) for r, s in at})


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.5),
    dict(eos=True),
    dict(eos=True, min_new_tokens=8),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2, eos=True),
], ids=["repetition_penalty", "eos_list", "min_new_tokens", "several"])
@pytest.mark.parametrize("path", ["custom_generate", "patched"])
def test_processors_and_eos_equal_transformers(tiny, settings, path):
    model, heads = tiny
    ids, mask = batch([0, 1, 2, 3])
    kw = dict(settings)
    kw["eos_token_id"] = eos_from_greedy(model, ids, mask) if kw.pop("eos", False) else None
    kw.update(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    if path == "patched":
        clp_fast.patch(model, heads)
        try:
            got = model.generate(ids, **kw)
        finally:
            clp_fast.unpatch(model)
    else:
        got = model.generate(ids, custom_generate=hf.generate, heads=heads, **kw)
    assert_equal_ids(got, want)


def test_top_m_tree_heads_with_processors_equal_transformers(tiny):
    """Heads with a tree calibration draft top-3 trees (several children per node): greedy through the
    processors still equals transformers."""
    from tests.test_tree import CAL

    model, _ = tiny
    heads = random_heads(model, k=3)
    heads.extra_config["tree"] = CAL.to_dict()
    ids, mask = batch([0, 1, 2, 3])
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    want = model.generate(ids, **kw)
    got, stats = clp_fast.generate_processed(model, ids, heads, attention_mask=mask, max_new_tokens=16, pad_token_id=0,
                                             eos_token_id=[], logits_processor=[RepetitionPenaltyLogitsProcessor(
                                                 1.3, prompt_ignore_length=(mask == 0).sum(-1))], return_stats=True)
    assert_equal_ids(got, want)
    assert stats.drafted > 0


def test_max_length_and_budget_agree(tiny):
    model, heads = tiny
    ids, mask = batch([1])
    for kw in (dict(max_length=ids.shape[1] + 1), dict(max_new_tokens=1), dict(max_new_tokens=7)):
        want = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
        got = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, custom_generate=hf.generate,
                             heads=heads, repetition_penalty=1.2, **kw)
        assert_equal_ids(got, want)


# ----------------------------------------------------------------------------------------- streaming
def test_streamers_receive_exactly_the_generated_tokens(tiny, patched):
    model, heads = tiny
    ids, mask = batch([0])
    eos = eos_from_greedy(model, ids, mask, at=((0, 9),))
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=eos)
    clp_fast.unpatch(model)
    ref = Recorder()
    want = model.generate(ids, streamer=ref, **kw)  # transformers' own streaming
    P = ids.shape[1]
    runs = {}
    runs["clp_fast.generate"] = lambda s: clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=16,
                                                            eos_token_id=eos, pad_token_id=0, streamer=s)
    runs["custom_generate"] = lambda s: model.generate(ids, streamer=s, custom_generate=hf.generate, heads=heads, **kw)
    runs["custom_generate+processors"] = lambda s: model.generate(ids, streamer=s, custom_generate=hf.generate,
                                                                  heads=heads, repetition_penalty=1.0001, **kw)

    def patched_run(s):
        clp_fast.patch(model, heads)
        return model.generate(ids, streamer=s, **kw)

    runs["patched"] = patched_run
    for name, run in runs.items():
        rec = Recorder()
        got = run(rec)
        assert_equal_ids(got, want)
        assert rec.ends == 1, name
        assert rec.puts[0] == ids[0].tolist(), f"{name}: the prompt must be put first"
        assert rec.new_tokens() == ref.new_tokens() == want[0, P:].tolist(), name


def test_streamer_with_a_batch_raises(tiny, patched):
    model, heads = tiny
    ids, mask = batch([0, 1])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, streamer=Recorder())
    with pytest.raises(ValueError, match="batch size 1"):
        clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=4, streamer=Recorder())


# -------------------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize("kwargs, name", [
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    (dict(prefix_allowed_tokens_fn=lambda b, ids: [1, 2]), "PrefixConstrainedLogitsProcessor"),
    (dict(do_sample=True, mode="clp"), "mode='clp'"),
    (dict(repetition_penalty=1.2, mode="clp"), "mode='clp'"),
    (dict(assistant=True), "assistant_model"),
])
@pytest.mark.parametrize("path", ["custom_generate", "patched"])
def test_unsupported_settings_raise_named_errors(tiny, kwargs, name, path):
    model, heads = tiny
    ids, mask = batch([0])
    kwargs = dict(kwargs)
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = model
    kwargs.setdefault("mode", "lossless")
    if path == "patched":
        clp_fast.patch(model, heads)
        try:
            with pytest.raises(ValueError, match=name):
                model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **kwargs)
        finally:
            clp_fast.unpatch(model)
    else:
        with pytest.raises(ValueError, match=name):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, custom_generate=hf.generate,
                           heads=heads, **kwargs)


def test_patch_refuses_bad_arguments(tiny, patched):
    model, heads = tiny
    with pytest.raises(ValueError, match="mode='fast'"):
        clp_fast.patch(model, heads, mode="fast")
    with pytest.raises(TypeError, match="heads must be MTPHeads"):
        clp_fast.patch(model, heads="heads")
    with pytest.raises(ValueError, match="custom_generate"):
        model.generate(batch([0])[0], max_new_tokens=2, custom_generate=hf.generate)


# -------------------------------------------------------------------------------- SmolLM2 (real model)
TEXTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "1, 2, 3, 4,"]


def smol_batch(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.slow
@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS], ids=["B1", "B4-ragged"])
def test_smollm2_patched_and_custom_generate_equal_transformers_greedy(smollm2, texts):
    model, tok = smollm2
    ids, mask = smol_batch(tok, texts)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    want = model.generate(ids, **kw).sequences
    got = model.generate(ids, custom_generate=hf.generate, **kw).sequences  # the shipped heads
    assert_equal_ids(got, want)
    clp_fast.patch(model)
    try:
        got = model.generate(ids, **kw).sequences
    finally:
        clp_fast.unpatch(model)
    assert_equal_ids(got, want)


@pytest.mark.slow
def test_smollm2_stop_strings_and_processors_equal_transformers(smollm2):
    from transformers import StopStringCriteria

    model, tok = smollm2
    ids, mask = smol_batch(tok, TEXTS[:2])
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.2, min_new_tokens=4)
    free = model.generate(ids, **kw)
    P = ids.shape[1]
    words = [tok.decode(t).strip() for t in free[0, P + 4:].tolist()]
    stop = next(w for w in words if len(w) >= 2 and w.isalnum())  # a word the first row does generate
    want = model.generate(ids, stop_strings=stop, tokenizer=tok, **kw)
    assert want.shape[1] < free.shape[1] or (want == tok.pad_token_id).any(), "the stop string must fire"
    got = model.generate(ids, custom_generate=hf.generate,
                         stopping_criteria=[StopStringCriteria(tokenizer=tok, stop_strings=[stop])], **kw)
    assert_equal_ids(got, want)
    clp_fast.patch(model)
    try:
        got = model.generate(ids, stop_strings=stop, tokenizer=tok, **kw)
    finally:
        clp_fast.unpatch(model)
    assert_equal_ids(got, want)


@pytest.mark.slow
def test_smollm2_streams_accepted_tokens_per_step(smollm2):
    model, tok = smollm2
    ids, mask = smol_batch(tok, TEXTS[:1])
    ref, rec = Recorder(), Recorder()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, streamer=ref)
    clp_fast.patch(model, speculation="fixed")  # acceptance (asserted below) must not depend on the cost model
    try:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, streamer=rec)
    finally:
        clp_fast.unpatch(model)
    assert_equal_ids(got, want)
    assert rec.ends == 1 and rec.puts[0] == ids[0].tolist()
    assert rec.new_tokens() == ref.new_tokens() == want[0, ids.shape[1]:].tolist()
    assert len(rec.puts) - 1 < len(rec.new_tokens()), "lossless steps put several accepted tokens at once"


@pytest.mark.slow
def test_smollm2_text_iterator_streamer_never_blocks(smollm2):
    from transformers import TextIteratorStreamer

    model, tok = smollm2
    ids, mask = smol_batch(tok, TEXTS[:1])
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=120)
    clp_fast.patch(model)
    result = {}
    try:
        thread = threading.Thread(target=lambda: result.update(out=model.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.7, top_p=0.95,
            streamer=streamer)))
        torch.manual_seed(0)
        thread.start()
        text = "".join(streamer)  # raises queue.Empty after the timeout instead of blocking forever
        thread.join()
    finally:
        clp_fast.unpatch(model)
    assert text == tok.decode(result["out"][0, ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("flags, name", [
    (["--temperature", "0.7"], "--temperature: only with --do-sample"),
    (["--do-sample", "--temperature", "0"], "--temperature 0.0"),
    (["--do-sample", "--top-p", "1.5"], "--top-p 1.5"),
    (["--do-sample", "--top-k", "0"], "--top-k 0"),
    (["--do-sample", "--seed", "-1"], "--seed -1"),
    (["--do-sample", "--mode", "clp"], "--do-sample needs --mode lossless"),
    (["--stream", "--json"], "--stream"),
    (["--stream", "--batch-size", "2"], "--stream"),
])
def test_cli_sampling_flags_checked_before_any_model(flags, name, capsys):
    from clp_fast.cli import main

    # an unknown model name: the flag error must come first, before the model is even resolved
    rc = main(["generate", "--model", "no-such-model-anywhere", "--prompt", "x", *flags])
    assert rc == 2 and name in capsys.readouterr().err


@pytest.mark.slow
def test_cli_streams_a_seeded_sample_reproducibly(smollm2, capsys):
    import json

    from clp_fast.cli import main

    args = ["generate", "--model", "smollm2-135m-instruct", "--prompt", "Name three colours.", "--chat", "--dtype",
            "fp32", "--do-sample", "--temperature", "0.7", "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "12"]
    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["results"][0]["text"]
    assert text.strip() and text in streamed
