"""Calibrate and cost the retrieval drafts (clp_fast.drafts.datastore) on a real backbone.

    python bench/calibrate_datastore.py --model qwen2.5-coder-0.5b-instruct [--prompts 32] [--new-tokens 64]

1. Opens (or builds: minutes) the datastore of the model's tokenizer and reports its size and build figures.
2. Held-out greedy continuations: ``--prompts`` windows cut from this repository's own ``clp_fast/`` sources (not in
   the corpus: clp_fast is installed editable, so its files are not under site-packages; never HumanEval), decoded
   greedily. Replays every position: the datastore's branches for the context up to the pending token, and per
   depth and support bin how often a guess whose parent was right is right -> the acceptance table (printed as
   the constant for ``DATASTORE_CALIBRATION``).
3. Cost: ``DatastoreSource.propose`` per step at B = 1 and B = 16 (rows taken from the replay) against a greedy
   forward of the same batch measured here, in ms and in % of the forward.
4. ``--tau N``: lossless k=2 with the shipped heads, with and without the retrieval drafts, on the bench's first
   N HumanEval prompts (seeded subset, as ``run_bench.py``) and 2 prose prompts, 128 tokens, bf16, interleaved:
   tau, tok/s, outputs identical, accepted guesses per kind.
5. ``--compare-index N``: a numpy suffix array vs hashed n-gram tables (n = 2..8, sorted uint64 hashes +
   positions) over the first N tokens of the store: build seconds, bytes, and lookup microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-6)


def heldout(tok, model, n: int, new: int, batch: int = 8) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt ids, greedy ids) pairs from windows of clp_fast's own sources."""
    import clp_fast
    from clp_fast.eval.data import cut_prompts, humaneval_signatures

    files = sorted((ROOT / "clp_fast").rglob("*.py"))
    texts = cut_prompts(files, n, chars=600, seed=1, exclude=humaneval_signatures(download=False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for i in range(0, n, batch):
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[i:i + batch]]
        ids, mask = clp_fast.left_pad(rows, pad)
        gen = clp_fast.generate(model, ids, attention_mask=mask, max_new_tokens=new, mode="greedy", eos_token_id=[],
                                pad_token_id=pad)
        out += [(r, gen[b, ids.shape[1]:].tolist()) for b, r in enumerate(rows)]
    return out


def calibrate(store, pairs, width: int) -> dict:
    """Per depth and support bin: guesses tried (parent right) and right; the rate table."""
    from bisect import bisect_right

    tried = np.zeros((width, len(EDGES) - 1))
    hit = np.zeros_like(tried)
    depth1_any = steps = 0
    for prompt, gen in pairs:
        for t in range(len(gen) - 1):
            ctx = prompt + gen[:t + 1]  # gen[t] is the pending token
            truth = gen[t + 1:t + 1 + width]
            branches = store.propose(ctx, width)
            steps += 1
            depth1_any += any(b[0][0] == truth[0] for b in branches)
            for toks, sup in branches:
                for d, (g, s) in enumerate(zip(toks, sup)):
                    if d >= len(truth):
                        break
                    j = min(bisect_right(EDGES, s) - 1, len(EDGES) - 2)
                    tried[d, j] += 1
                    if g != truth[d]:
                        break
                    hit[d, j] += 1
    rates = (hit + 0.5) / (tried + 1.0)  # Laplace-smoothed, as the heads' table
    return {"edges": list(EDGES), "rates": rates.round(3).tolist(), "tried": tried.astype(int).tolist(),
            "hit": hit.astype(int).tolist(), "steps": steps, "depth1_hit_share": depth1_any / max(steps, 1)}


def cost(model, store, pairs, width: int, reps: int = 20) -> dict:
    """ms per propose over B rows and ms per greedy forward of B rows (same machine, same run)."""
    import clp_fast
    from clp_fast.drafts.base import Accepted
    from clp_fast.drafts.datastore import DatastoreSource, OutputStore

    out = {}
    for B in (1, 16):
        spent = 0.0
        for r in range(reps):  # each rep its own rows: contexts cut at different points of the held-out outputs
            rows = [p + g[:4 + (3 * r + b) % (len(g) - 4)] for b, (p, g) in enumerate((pairs * 16)[r:r + B])]
            src = DatastoreSource(store, OutputStore(), width)
            src.advance(Accepted(torch.tensor([x[-1] for x in rows]), None, torch.zeros(B, 1),
                                 [x[:-1] for x in rows], [True] * B))
            t0 = time.perf_counter()
            src.propose([True] * B)
            spent += time.perf_counter() - t0
        prop_ms = spent / reps * 1e3
        ids = torch.tensor([r[-64:] for r in rows])
        walls = []
        for n in (1, 17):  # a decode step's time: (17 tokens - 1 token, the prefill) / 16 steps
            _, st = clp_fast.generate(model, ids, max_new_tokens=n, mode="greedy", eos_token_id=[], return_stats=True)
            walls.append(st.wall_time_s)
        fwd_ms = (walls[1] - walls[0]) / 16 * 1e3
        out[B] = {"propose_ms": round(prop_ms, 3), "forward_ms": round(fwd_ms, 1),
                  "pct": round(100 * prop_ms / fwd_ms, 2)}
    return out


def tau(model, tok, store, n_humaneval: int, new: int, speculation: str) -> dict:
    """Lossless k=2 with and without the datastore on the bench prompts, side by side (module docstring)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from methods import load_prompts, stop_ids

    import clp_fast
    from clp_fast.assets import default_heads_for
    from clp_fast.drafts.datastore import datastore_factory

    heads = default_heads_for(model).truncated(2)
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    factory = datastore_factory(store=store)
    prompts = load_prompts(tok, n_humaneval, 2, 0)
    runs = {"without": [], "with": []}

    def one(p, drafts):
        out, st = clp_fast.generate(model, p.ids, heads, max_new_tokens=new, mode="lossless", eos_token_id=eos,
                                    pad_token_id=pad, return_stats=True, drafts=drafts, speculation=speculation)
        return out[0, p.ids.shape[1]:].tolist(), st

    warm = type(prompts[0])("warm-up", "warm", "", tok("def fibonacci(n):", return_tensors="pt").input_ids)
    one(warm, [factory])  # warm-up on a prompt of neither set (the output store keeps what it wrote)
    one(warm, None)
    for i, p in enumerate(prompts):
        order = [("without", None), ("with", [factory])]
        for name, drafts in order[::-1] if i % 2 else order:
            ids, st = one(p, drafts)
            rec = {"set": p.set, "id": p.id, "ids": ids, "tau": st.tau, "tok_s": sum(st.new_tokens) / st.wall_time_s}
            if drafts:
                src = factory.sources[-1]
                rec["by_kind"] = {k: [src.accepted[k], src.steps[k]] for k in src.kinds}
            runs[name].append(rec)
    out = {}
    for s in ("humaneval", "prose"):
        w = [r for r in runs["with"] if r["set"] == s]
        wo = [r for r in runs["without"] if r["set"] == s]
        out[s] = {"tau_without": round(float(np.mean([r["tau"] for r in wo])), 3),
                  "tau_with": round(float(np.mean([r["tau"] for r in w])), 3),
                  "tok_s_without": round(float(np.mean([r["tok_s"] for r in wo])), 2),
                  "tok_s_with": round(float(np.mean([r["tok_s"] for r in w])), 2),
                  "identical": sum(a["ids"] == b["ids"] for a, b in zip(w, wo)), "prompts": len(w),
                  "by_kind": {k: [sum(r["by_kind"][k][j] for r in w) for j in (0, 1)]
                              for k in ("datastore", "outputs")}}
    return out


def compare_index(store, n: int) -> dict:
    """Suffix array vs hashed n-gram tables over the first ``n`` tokens of the store (forward order)."""
    from clp_fast.drafts import datastore as ds

    stream = np.ascontiguousarray(store.rev[::-1][:n])
    t0 = time.perf_counter()
    sa = ds.suffix_array(stream[::-1].copy())
    sa_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables = {}
    P = np.uint64(1_000_003)
    hg = stream.astype(np.uint64)  # hg[i]: hash of the g-gram starting at i
    for g in range(2, 9):
        hg = hg[:-1] * P + stream[g - 1:].astype(np.uint64)
        order = np.argsort(hg[:-1])
        tables[g] = (hg[:-1][order], (order + g).astype(np.int32))  # key -> position right after the g-gram
    ng_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    probes = [stream[i - 12:i].tolist() for i in rng.integers(12, n - 12, 200)]
    # the SA lookup: the store's own query, on the full store (a larger index than the tables' subset)
    t0 = time.perf_counter()
    for p in probes:
        store.match(p)
    sa_us = (time.perf_counter() - t0) / len(probes) * 1e6
    t0 = time.perf_counter()
    for p in probes:
        for g in range(8, 1, -1):
            key = np.uint64(p[-g])
            for t in p[-g + 1:]:
                key = key * P + np.uint64(t)
            keys, _ = tables[g]
            i = np.searchsorted(keys, key)
            if i < len(keys) and keys[i] == key:
                break
    ng_us = (time.perf_counter() - t0) / len(probes) * 1e6
    ng_bytes = int(sum(k.nbytes + v.nbytes for k, v in tables.values()) + 4 * n)  # + the token stream
    return {"tokens": n, "sa_len": len(sa),
            "suffix_array": {"build_s": round(sa_s, 2), "bytes": 8 * n, "match_us": round(sa_us, 1),
                             "max_match": ds.MAX_MATCH},
            "ngram_tables": {"build_s": round(ng_s, 2), "bytes": ng_bytes, "match_us": round(ng_us, 1), "max_match": 8}}


def save(path: Path | None, res: dict) -> None:
    if path:
        path.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--compare-index", type=int, default=0, help="tokens for the SA vs n-gram table comparison")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--tau", type=int, default=0, help="HumanEval prompts for the with/without tau comparison")
    ap.add_argument("--speculation", default="adaptive", choices=["adaptive", "fixed"])
    ap.add_argument("--out", type=Path, help="write the JSON here too (after each part)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-cost", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from clp_fast.drafts.datastore import open_or_build
    from clp_fast.models.hub import load_model

    model, tok = load_model(args.model, dtype="bf16")
    t0 = time.perf_counter()
    store = open_or_build(tok)
    res = {"load_avg": os.getloadavg(), "store": {k: v for k, v in store.manifest.items() if k != "files_list"},
           "open_s": round(time.perf_counter() - t0, 1),
           "bytes_on_disk": sum(f.stat().st_size for f in store.folder.iterdir())}
    res["store"]["left_out"] = {k: (len(v) if isinstance(v, list) else v) for k, v in res["store"]["left_out"].items()}
    if args.compare_index:
        res["compare_index"] = compare_index(store, args.compare_index)
    if not args.no_calibrate:
        pairs = heldout(tok, model, args.prompts, args.new_tokens)
        res["calibration"] = calibrate(store, pairs, args.width)
        save(args.out, res)
        if not args.no_cost:
            res["cost"] = cost(model, store, pairs, args.width)
            save(args.out, res)
    if args.tau:
        res["tau"] = tau(model, tok, store, args.tau, 128, args.speculation)
    res["load_avg_end"] = os.getloadavg()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"peak RSS {__import__('resource').getrusage(0).ru_maxrss // 1024} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
