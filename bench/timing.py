"""Running and timing the methods: single stream (interleaved per prompt) and left-padded batches."""

from __future__ import annotations

import random
import time

import torch
from machine import PeakRSS
from methods import BASELINE, ForwardCounter, Method, Prompt, compiled_graphs, make_methods

import clp_fast
from clp_fast.eval import metrics
from clp_fast.heads import MTPHeads


def _timed(method: Method, ids, mask, n, mem: PeakRSS | None = None) -> dict:
    rss0 = mem.start() if mem else None
    t0 = time.perf_counter()
    out, info = method.run(ids, mask, n)
    dt = time.perf_counter() - t0
    if mem:
        peak = mem.peak()
        info["peak_rss_mib"] = peak
        info["peak_rss_delta_mib"] = peak - rss0
    info["time_s"] = dt
    return {"out": out, **info}


def warm_up(methods: list[Method], prompt: Prompt, n: int, bar) -> dict[str, float]:
    """One short call of each method: bf16 oneDNN kernels are built per shape on first use (~10x slower), and a
    compiled method compiles here. Returns the seconds of each method's warm-up call, by label."""
    times = {}
    for m in methods if n > 0 else []:
        bar.set_postfix_str(f"warm-up {m.label}" + (" (compiling)" if m.compiles else ""))
        t0 = time.perf_counter()
        m.run(prompt.ids, torch.ones_like(prompt.ids), n)
        times[m.label] = time.perf_counter() - t0
    return times


def _timed_compiled(method: Method, ids, mask, n, mem: PeakRSS | None) -> dict:
    """``_timed``, except that a call of a compiled method that compiled a graph (a new shape, a failed guard)
    is run again: its time goes to ``recompile_s`` (reported), the second call's to ``time_s``."""
    if not method.compiles:
        return _timed(method, ids, mask, n, mem)
    g0 = compiled_graphs()
    r = _timed(method, ids, mask, n, mem)
    graphs = compiled_graphs() - g0
    if graphs:
        first = r["time_s"]
        r = _timed(method, ids, mask, n, mem)
        r.update(recompile_s=first, recompiled_graphs=graphs)
    return r


def run_single_stream(methods: list[Method], prompts: list[Prompt], n: int, eos: list[int], mem: PeakRSS,
                      bar) -> list[dict]:
    """Per prompt, every method in turn (order rotated per prompt). Returns one record per prompt."""
    records = []
    for pi, p in enumerate(prompts):
        P = p.ids.shape[1]
        rec = {"set": p.set, "id": p.id, "prompt_len": P, "order": [], "results": {}}
        order = methods[pi % len(methods):] + methods[: pi % len(methods)]
        for m in order:
            bar.set_postfix_str(f"{p.id} {m.label}")
            r = _timed_compiled(m, p.ids, torch.ones_like(p.ids), n, mem)
            out = r.pop("out")
            gen = metrics.generated_ids(out[0].tolist(), P, eos)
            r["ids"] = gen
            r["n_new"] = len(gen)
            rec["order"].append(m.label)
            rec["results"][m.label] = r
            bar.update(1)
        records.append(rec)
    return records



def left_pad_batch(tok, texts: list[str], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return clp_fast.left_pad([tok(t)["input_ids"] for t in texts], pad)


def run_batched(model, tok, heads: MTPHeads, k: int, batch_sizes: list[int], n: int, reps: int, seed: int,
                eos: list[int], pad: int, counter: ForwardCounter, bar, warmup_tokens: int = 4,
                speculation: str = "adaptive") -> dict:
    """clp_fast lossless vs transformers batched greedy on left-padded HumanEval batches, interleaved."""
    from clp_fast.eval.data import humaneval_prompts

    pool = humaneval_prompts()
    rng = random.Random(seed + 1)
    ms = make_methods(model, heads, [k], eos, pad, None, counter, speculation)
    hf_m = next(m for m in ms if m.name == BASELINE)
    ours_m = next(m for m in ms if m.name == "clp_fast lossless")
    rows, batches = [], []
    for B in batch_sizes:
        texts_w = [r["prompt"] for r in rng.sample(pool, B)]
        ids_w, mask_w = left_pad_batch(tok, texts_w, pad)
        for m in (hf_m, ours_m) if warmup_tokens > 0 else ():
            bar.set_postfix_str(f"warm-up B={B} {m.label}")
            m.run(ids_w, mask_w, min(warmup_tokens, n))
        agg = {hf_m.label: [0, 0.0], ours_m.label: [0, 0.0]}
        same = total = 0
        for rep in range(reps):
            texts = [r["prompt"] for r in rng.sample(pool, B)]
            ids, mask = left_pad_batch(tok, texts, pad)
            P = ids.shape[1]
            outs = {}
            for m in ((hf_m, ours_m) if rep % 2 == 0 else (ours_m, hf_m)):
                bar.set_postfix_str(f"B={B} {m.label}")
                r = _timed(m, ids, mask, n)
                gen = [metrics.generated_ids(row, P, eos) for row in r["out"].tolist()]
                outs[m.label] = gen
                toks = sum(len(g) for g in gen)
                agg[m.label][0] += toks
                agg[m.label][1] += r["time_s"]
                batches.append({"B": B, "rep": rep, "method": m.label, "time_s": r["time_s"], "new_tokens": toks,
                                "forward_passes": r["forward_passes"]})
                bar.update(1)
            same += sum(a == b for a, b in zip(outs[ours_m.label], outs[hf_m.label]))
            total += B
        hf_tps = agg[hf_m.label][0] / agg[hf_m.label][1]
        our_tps = agg[ours_m.label][0] / agg[ours_m.label][1]
        rows.append({"B": B, "k": k, "max_new_tokens": n, "batches": reps,
                     "hf_tokens_per_s": hf_tps, "clp_fast_tokens_per_s": our_tps, "ratio": our_tps / hf_tps,
                     "rows_identical": same / total})
    return {"rows": rows, "batches": batches}

