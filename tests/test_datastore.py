"""Retrieval drafts (clp_fast.drafts.datastore / corpus): the suffix array and its queries against brute force,
lossless decoding with the datastore on against transformers, acceptance where a planted corpus holds the
continuation, the output store across calls, atomic and self-healing builds, and no HumanEval in the corpus."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_equal_ids, left_pad, spawn_driver, tiny_model

import clp_fast
from clp_fast.drafts import REGISTRY, corpus
from clp_fast.drafts import datastore as ds
from clp_fast.heads import MTPHeads

PROMPTS = [[5, 17, 300, 2, 999, 41, 8], [12, 13], [700], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
VOCAB = "planted-ids"  # the planted corpora are token ids written as text: "5 17 300 ..."


def encode(texts: list[str]) -> list[list[int]]:
    return [[int(w) for w in t.split()] for t in texts]


def plant(folder: Path, rows: list[list[int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        (folder / f"f{i}.py").write_text(" ".join(map(str, r)))
    return folder


def open_planted(tmp_path: Path, rows: list[list[int]], **kw) -> ds.Datastore:
    return ds.open_or_build(encode=encode, vocab=VOCAB, roots=[plant(tmp_path / "corpus", rows)],
                            home=tmp_path / "home", progress=False, **kw)


# ----------------------------------------------------------------------------------------------- the index
@pytest.mark.parametrize("n,vocab", [(1, 3), (37, 2), (500, 5), (3001, 40)])
def test_suffix_array_orders_suffixes_by_their_first_tokens(n, vocab):
    rng = np.random.default_rng(n)
    stream = rng.integers(-1, vocab, size=n).astype(np.int32)
    sa = ds.suffix_array(stream, depth=ds.SORT_DEPTH)
    assert sorted(sa.tolist()) == list(range(n))
    key = [tuple(stream[p:p + ds.SORT_DEPTH].tolist()) + (-2,) for p in sa.tolist()]  # -2: past the end
    want = sorted(key)
    bad = next((i for i, (a, b) in enumerate(zip(key, want)) if a != b), None)
    assert bad is None, f"suffix {sa[bad]} out of order at rank {bad}"


def brute_match(rows: list[list[int]], ctx: list[int]) -> tuple[int, list[list[int]]]:
    """Longest suffix of ctx (<= MAX_MATCH) inside one planted file, and the continuations of its occurrences."""
    for L in range(min(ds.MAX_MATCH, len(ctx)), 0, -1):
        pat = ctx[-L:]
        occ = [r[i + L:] for r in rows for i in range(len(r) - L + 1) if r[i:i + L] == pat]
        if occ:
            return L, occ
    return 0, []


def test_match_and_continuations_equal_brute_force(tmp_path):
    rng = random.Random(0)
    motif = [rng.randrange(20) for _ in range(30)]
    rows = [[rng.randrange(20) for _ in range(rng.randrange(5, 60))] + motif[: rng.randrange(30)] for _ in range(12)]
    store = open_planted(tmp_path, rows)
    for _ in range(200):
        ctx = [rng.randrange(20) for _ in range(rng.randrange(1, 8))] + motif[: rng.randrange(0, 12)]
        lo, hi, L = store.match(ctx)
        want_L, occ = brute_match(rows, ctx)
        assert (L, hi - lo) == (want_L, len(occ)), ctx
        if L and len(occ) <= ds.SAMPLE:
            got = sorted(tuple(t for t in c if t != corpus.SEP) for c in store.continuations(lo, hi, 4).tolist())
            assert got == sorted(tuple(c[:4]) for c in occ), ctx


def test_top_branches_most_frequent_first():
    S = corpus.SEP
    rows = [[7, 8, 9], [7, 8, 9], [7, 8, 1], [4, 5, S], [7, 2, S], [4, S, S]]
    got = ds.top_branches(rows, 2)
    assert [t for t, _ in got] == [[7, 8, 9], [4, 5]]
    assert got[0][1] == pytest.approx([4 / 7, 3 / 5, 2 / 4])  # k / (n + 1) of the rows through the parent


# ------------------------------------------------------------------------------------------ in the decoder
def noise_heads(model):
    heads = MTPHeads.for_model(model, 2)
    with torch.no_grad():
        heads.weight.normal_(std=1.0)  # far from the identity: the heads' guesses are noise
    return heads


def decode(model, ids, mask, drafts, n=20):
    return clp_fast.generate(model, ids, noise_heads(model), attention_mask=mask, max_new_tokens=n, mode="lossless",
                             eos_token_id=[], pad_token_id=0, prompt_lookup=0, return_stats=True,
                             speculation="fixed", drafts=drafts)


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["B1", "ragged-B4"])
def test_planted_continuations_are_accepted_and_output_is_greedy(tmp_path, rows):
    """The corpus holds each row's greedy continuation: its guesses are accepted (the heads' noise and no prompt
    lookup accept nothing) and the output is transformers' greedy output, token for token (fp32)."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(rows)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(len(rows))]
    store = open_planted(tmp_path, seqs)
    got, st = decode(model, ids, mask, [lambda bb, h, c: ds.DatastoreSource(store, None, 6)])
    assert_equal_ids(got, want)
    base, st0 = decode(model, ids, mask, [])
    assert_equal_ids(base, want)
    assert sum(st0.accept_hist[1:]) == 0, st0.accept_hist
    assert sum(st.accept_hist[1:]) > 0, st.accept_hist
    assert sum(st.row_forwards) < sum(st0.row_forwards), (st.row_forwards, st0.row_forwards)


def test_misleading_corpus_keeps_greedy_output(tmp_path):
    """Planted continuations wrong every third token: rejections at every depth, output still greedy."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    seqs = [want[b][mask[b].bool().tolist() + [True] * 20].tolist() for b in range(len(PROMPTS))]
    bent = [[(t + 1) % 1000 if i % 3 == 0 else t for i, t in enumerate(s)] for s in seqs]
    store = open_planted(tmp_path, seqs[:2] + bent)
    got, _ = decode(model, ids, mask, [lambda bb, h, c: ds.DatastoreSource(store, ds.OutputStore(), 8)])
    assert_equal_ids(got, want)


def test_output_store_serves_a_repeated_prompt():
    """SuffixDecoding's case: the second call of the same prompt gets its guesses from the first call's output."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS[:1])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    outputs = ds.OutputStore()
    src = [lambda bb, h, c: ds.DatastoreSource(None, outputs, 6)]
    first, st1 = decode(model, ids, mask, src, n=24)
    second, st2 = decode(model, ids, mask, src, n=24)
    assert_equal_ids(first, want)
    assert_equal_ids(second, want)
    assert sum(st2.accept_hist[1:]) > sum(st1.accept_hist[1:]), (st1.accept_hist, st2.accept_hist)


def test_output_store_is_bounded_and_evicts_its_index():
    store = ds.OutputStore(max_tokens=50)
    seqs = [[i % 7 for i in range(40)] for _ in range(5)]
    for s in seqs:
        store.update(store.add(s, 0))
    assert len(store.seqs) <= 2 and store.kept <= 50 + 41, store.kept
    live = {sid for sid in store.seqs}
    assert all(sid in live for ent in store.index.values() for sid, _ in ent)
    toks, share = store.propose([0, 1, 2], 4)
    assert toks == [3, 4, 5, 6] and share == 1.0


def test_registered_datastore_needs_a_tokenizer():
    assert {"datastore", "outputs"} <= set(REGISTRY)
    model = tiny_model("qwen2")  # no tokenizer files anywhere
    with pytest.raises(ValueError, match="no tokenizer beside the model"):
        decode(model, torch.tensor([[1, 2, 3]]), None, ["datastore"], n=2)


# ------------------------------------------------------------------------------------------------ the files
def test_killed_build_is_never_taken_for_a_store(tmp_path, monkeypatch):
    """SIGKILL after the suffix array, before the manifest: a later open finds no store, removes the leftover and
    builds a complete one."""
    monkeypatch.setenv("CLP_FAST_HOME", str(tmp_path / "home"))  # the driver's home: no HumanEval copy in either
    rows = [[1, 2, 3, 4], [2, 3, 4, 5]]
    plant(tmp_path / "corpus", rows)
    proc = spawn_driver(__file__, [str(tmp_path / "corpus")], tmp_path / "home", CLP_FAST_KILL_AT="datastore.sa")
    proc.communicate(timeout=120)
    assert proc.returncode == -9, proc.returncode
    root = tmp_path / "home" / "datastore"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []  # no complete-looking folder
    assert any(".tmp-" in p.name for p in root.iterdir())
    store = ds.open_or_build(encode=encode, vocab=VOCAB, roots=[tmp_path / "corpus"], home=tmp_path / "home",
                             progress=False)
    assert store.match([2, 3, 4])[2] == 3
    assert not any(".tmp-" in p.name for p in root.iterdir())


def test_failed_build_leaves_no_store(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(corpus, "suffix_array", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        open_planted(tmp_path, [[1, 2, 3]])
    assert not [p for p in (tmp_path / "home" / "datastore").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["flip-sa-bytes", "truncate-tokens", "garbage-manifest", "no-manifest"])
def test_corrupt_store_is_named_and_rebuilt(tmp_path, damage, caplog):
    rows = [[i % 11 for i in range(300)], [5, 6, 7, 8, 9]]
    store = open_planted(tmp_path, rows)
    folder = store.folder
    del store
    if damage == "flip-sa-bytes":
        raw = bytearray((folder / "sa.npy").read_bytes())
        raw[-40:] = bytes(b ^ 0xFF for b in raw[-40:])
        (folder / "sa.npy").write_bytes(bytes(raw))
    elif damage == "truncate-tokens":
        raw = (folder / "tokens.npy").read_bytes()
        (folder / "tokens.npy").write_bytes(raw[:-8])
    elif damage == "garbage-manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "manifest.json").unlink()
    with pytest.raises(ds.DatastoreError, match=str(folder)):
        ds.Datastore.open(folder)
    with caplog.at_level(logging.WARNING, logger="clp_fast.datastore"):
        again = ds.open_or_build(encode=encode, vocab=VOCAB, roots=[tmp_path / "corpus"], home=tmp_path / "home",
                                 progress=False)
    assert str(folder) in caplog.text and "rebuilding" in caplog.text
    assert again.folder == folder and again.match([5, 6, 7])[2] == 3
    ds.Datastore.open(folder)  # intact now


def test_store_is_keyed_by_vocabulary_and_corpus(tmp_path):
    a = open_planted(tmp_path, [[1, 2, 3]])
    b = ds.open_or_build(encode=encode, vocab="another-vocab", roots=[tmp_path / "corpus"], home=tmp_path / "home",
                         progress=False)
    (tmp_path / "corpus" / "f9.py").write_text("4 5 6")
    c = ds.open_or_build(encode=encode, vocab=VOCAB, roots=[tmp_path / "corpus"], home=tmp_path / "home",
                         progress=False)
    assert len({a.folder, b.folder, c.folder}) == 3
    assert c.match([4, 5])[2] == 2 and a.match([4, 5])[2] == 0


# ----------------------------------------------------------------------------------------------- HumanEval
def test_a_file_holding_a_humaneval_prompt_is_left_out(tmp_path):
    from clp_fast.eval.data import humaneval_prompts

    prompt = humaneval_prompts(1)[0]["prompt"]
    plant(tmp_path, [[1, 2]])
    (tmp_path / "copied.py").write_text("x = 1\n" + prompt + "    return []\n")
    (tmp_path / "human_eval_data.py").write_text("y = 2\n")
    files, left = corpus.corpus_files([tmp_path])
    assert [f.name for f in files] == ["f0.py"], files
    assert left["humaneval_checked"] and len(left["humaneval"]) == 2


@pytest.mark.slow
def test_default_corpus_holds_no_humaneval_prompt():
    """Every kept file of the real corpus (stdlib + this environment's packages), grepped for every line of
    40+ characters of every HumanEval prompt (a stricter line set than the filter's own)."""
    from clp_fast.eval.data import humaneval_prompts

    files, left = corpus.corpus_files()
    assert left["humaneval_checked"] and len(files) > 1000
    lines = {ln.strip() for p in humaneval_prompts() for ln in p["prompt"].splitlines()
             if len(ln.strip()) >= 40 and not ln.strip().startswith(("from ", "import "))}
    hits = [(str(f), ln.strip()) for f in files for ln in f.read_text(encoding="utf-8").splitlines()
            if ln.strip() in lines]
    assert not hits, hits[:5]


def test_cli_builds_a_store(tmp_path, monkeypatch, capsys, smollm2):
    from conftest import smollm2_path

    from clp_fast.cli import main

    model_path = smollm2_path()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def add(a, b):\n    return a + b\n")
    monkeypatch.setenv("CLP_FAST_HOME", str(tmp_path / "home"))
    assert main(["datastore", "build", "--model", str(model_path), "--corpus", str(tmp_path / "src"),
                 "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 1 and out["tokens"] > 5 and Path(out["folder"]).is_dir()
    tok = smollm2[1]
    store = ds.Datastore.open(out["folder"])
    ctx = tok("def add(a, b):\n    return", add_special_tokens=False)["input_ids"]
    (toks, _), *_ = store.propose(ctx, 3)
    assert tok.decode(toks).startswith(" a + b"), tok.decode(toks)


if __name__ == "__main__":  # the killed-build driver: build the planted store under $CLP_FAST_HOME
    ds.open_or_build(encode=encode, vocab=VOCAB, roots=[Path(sys.argv[1])], progress=False)
