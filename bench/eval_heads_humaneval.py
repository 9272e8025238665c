"""Held-out quality of MTP heads on all 164 HumanEval prompts (never used in training).

1. The backbone's greedy continuation of every prompt, batched through the engine in greedy mode.
2. Its final hidden states (one prefill per sequence) and every head's guess there, exactly as the
   decode step computes it (:func:`clp_fast.reference.fused_heads`): per-head top-1 and top-3,
   P(heads 1..j all right), the CLP's depth-1 precision/recall, and the heads-only chain tau
   (lossless decoding with prompt lookup off, simulated along the greedy continuation: each step
   accepts the longest run of right heads plus the backbone's token).
3. Real heads-only lossless decoding (``prompt_lookup=0``, B=1) on the first ``--decode`` prompts:
   its measured tau (checks the simulation) and how often it equals greedy.

Several head sets can be scored on the same continuations (``--heads a b``); ``default`` is the
shipped set. ``--drafter DIR ...`` scores EAGLE-style drafters the same way (drafter alone, prompt lookup off):
unrolled over the same hidden states with their own features (:func:`clp_fast.train.eagle.unrolled`, as the
decode step drafts), depth ``j`` from anchor ``t`` guessing token ``t + j + 1``; the real decoding check runs them
with ``heads=False`` and the chain depth of ``--drafter-depth``.

    python bench/eval_heads_humaneval.py --model qwen2.5-coder-0.5b-instruct --heads default /path/new
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import clp_fast
from clp_fast import reference
from clp_fast.eval.data import humaneval_prompts
from clp_fast.heads import MTPHeads
from clp_fast.models.hub import load_model
from clp_fast.models.native import NativeBackbone
from clp_fast.train.build import greedy, prefill
from clp_fast.train.eagle import unrolled
from clp_fast.train.evaluate import chain_tau
from clp_fast.train.policies import head_predictions, recall_at_precision


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def targets(seq: list[int], t: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What anchors ``t [T]`` guess at depths ``1..depth`` along ``seq``: tokens ``seq[t + 1 + j]`` ``[T, depth]``
    and whether they exist (``ok``)."""
    tj = t[:, None] + 1 + torch.arange(1, depth + 1)[None]
    return torch.tensor(seq)[tj.clamp(max=len(seq) - 1)], tj < len(seq)


@torch.inference_mode()
def score(bb, heads: MTPHeads, seqs: list[tuple[list[int], list[int]]], hidden: list[torch.Tensor]) -> dict:
    k = heads.k
    hits, oks, top3s, taus, probs, ys = [], [], [], [], [], []
    for (ids, cont), hid in zip(seqs, hidden):
        seq = ids + cont
        t = torch.arange(len(ids) - 1, len(seq) - 1)
        if not len(t):
            continue
        h = hid[t].to(bb.device)
        z = reference.head_hidden(h, heads.weight, heads.bias)[:, 1:]
        top, conf = head_predictions(z, bb.plain_lm_head, heads.draft_vocab)  # top[..., 0]: the decode argmax
        top = top.cpu()
        tgt, ok = targets(seq, t, k)
        hit = (top[..., 0] == tgt) & ok
        hits.append(hit)
        oks.append(ok)
        top3s.append((top == tgt[..., None]).any(-1) & ok)
        taus.append(chain_tau(hit))
        probs.append(torch.sigmoid(heads.clp.logits(h.float(), conf.float())).cpu())
        ys.append(hit.long().cumprod(-1).float())
    hit, ok, top3 = torch.cat(hits), torch.cat(oks), torch.cat(top3s)
    full = ok.all(-1)
    prob, y = torch.cat(probs), torch.cat(ys)
    known = ok.clone()
    return {"positions": int(hit.shape[0]),
            "head_top1": (hit.sum(0) / ok.sum(0).clamp(min=1)).tolist(),
            "head_top3": (top3.sum(0) / ok.sum(0).clamp(min=1)).tolist(),
            "chain": hit[full].long().cumprod(-1).float().mean(0).tolist(),
            "chain_tau_heads_only": sum(taus) / len(taus),
            "clp_depth1_recall_at_p95": recall_at_precision(prob, y, known, 0.95),
            "clp_depth1_recall_at_p90": recall_at_precision(prob, y, known, 0.90)}


@torch.inference_mode()
def score_drafter(bb, drafter, seqs: list[tuple[list[int], list[int]]], hidden: list[torch.Tensor],
                  depth: int) -> dict:
    """:func:`score`'s per-depth top-1, chain and simulated chain tau for an EAGLE-style drafter."""
    W = bb.plain_lm_head[: drafter.draft_vocab]
    hits, oks = [], []
    for (ids, cont), hid in zip(seqs, hidden):
        seq = ids + cont
        outs = unrolled(drafter, bb.inner.embed_tokens, hid[None].to(next(drafter.parameters()).dtype),
                        torch.tensor([seq]), depth)
        t = torch.arange(len(ids) - 1, len(seq) - 1)  # anchors: the backbone's token at t + 1 is a continuation's
        if not len(t):
            continue
        guess = torch.stack([(o[0, t].to(W.dtype) @ W.t()).argmax(-1).cpu() for o in outs], 1)  # [T, depth]
        tgt, ok = targets(seq, t, depth)
        hit = (guess == tgt) & ok
        hits.append(hit)
        oks.append(ok)
    hit, ok = torch.cat(hits), torch.cat(oks)
    return {"positions": int(hit.shape[0]), "top1": (hit.sum(0) / ok.sum(0).clamp(min=1)).tolist(),
            "chain": hit[ok.all(-1)].long().cumprod(-1).float().mean(0).tolist(),
            "chain_tau_drafter_only": sum(chain_tau(h) for h in hits) / len(hits)}


def decode_drafter(model, drafter, seqs, depth: int, max_new_tokens: int) -> dict:
    """Real drafter-alone lossless decoding (B = 1, no heads, no lookup, fixed speculation) of ``seqs``' prompts."""
    from clp_fast.drafts.eagle import EagleSource

    dec = []
    for p, c in seqs:
        out, st = clp_fast.generate(model, torch.tensor([p]), False, max_new_tokens=max_new_tokens, mode="lossless",
                                    prompt_lookup=0, drafts=[EagleSource.factory(drafter, depth)],
                                    speculation="fixed", return_stats=True)
        dec.append({"tau": st.tau, "equal_greedy": out[0, len(p) : len(p) + st.new_tokens[0]].tolist() == c})
    return {"n": len(dec), "tau": sum(d["tau"] for d in dec) / max(1, len(dec)),
            "equal_greedy": sum(d["equal_greedy"] for d in dec) / max(1, len(dec))}


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--heads", nargs="+", default=["default"], help="head folders ('default' = shipped)")
    ap.add_argument("--n", type=int, default=164, help="HumanEval prompts (default all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="batch of the greedy generation")
    ap.add_argument("--decode", type=int, default=16, help="prompts decoded for real (heads only, B=1)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--drafter", nargs="*", default=[], metavar="DIR", help="EAGLE-style drafters to score too")
    ap.add_argument("--drafter-depth", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model, dtype=args.dtype)
    bb = NativeBackbone(model)
    sets = {}
    for name in args.heads:
        if name == "default":
            from clp_fast.assets import default_heads_for

            sets[name] = default_heads_for(model)
        else:
            if not (Path(name) / "config.json").is_file():
                raise SystemExit(f"--heads {name!r}: no config.json there")
            sets[name] = MTPHeads.from_pretrained(name, model=model)
        if sets[name] is None:
            raise SystemExit(f"no shipped heads for {args.model}")
    prompts = [tok(p["prompt"])["input_ids"] for p in humaneval_prompts(args.n)]
    t0 = time.perf_counter()
    conts = []
    for b in range(0, len(prompts), args.batch):
        conts += greedy(model, prompts[b : b + args.batch], args.max_new_tokens)
        print(f"greedy {len(conts)}/{len(prompts)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    seqs = list(zip(prompts, conts))
    hidden = [prefill(bb, [p + c], len(p) + len(c), 1)["hidden"][0].to(bb.dtype) for p, c in seqs]
    res = {"what": "HumanEval held-out head quality", "model": args.model, "dtype": args.dtype, "n": len(seqs),
           "max_new_tokens": args.max_new_tokens, "commit": _commit(), "machine": platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()[0],
           "command": "python bench/eval_heads_humaneval.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "heads": {}}
    for name, heads in sets.items():
        r = score(bb, heads, seqs, hidden)
        dec = []
        for (p, c) in seqs[: args.decode]:
            out, st = clp_fast.generate(model, torch.tensor([p]), heads, max_new_tokens=args.max_new_tokens,
                                        mode="lossless", prompt_lookup=0, return_stats=True)
            dec.append({"tau": st.tau, "equal_greedy": out[0, len(p) : len(p) + st.new_tokens[0]].tolist() == c})
        if dec:
            r["decoded"] = {"n": len(dec), "tau": sum(d["tau"] for d in dec) / len(dec),
                            "equal_greedy": sum(d["equal_greedy"] for d in dec) / len(dec),
                            "simulated_tau_same_prompts": score(bb, heads, seqs[: args.decode],
                                                                hidden[: args.decode])["chain_tau_heads_only"]}
        res["heads"][name] = r
        print(name, json.dumps({key: v for key, v in r.items()}, indent=None), flush=True)
    for folder in args.drafter:
        from clp_fast.drafts.eagle_model import EagleDrafter

        with torch.inference_mode(False):  # normal tensors: the packed-weight cache keys on their versions
            d = EagleDrafter.from_pretrained(folder, model=model, dtype=bb.dtype)
        r = score_drafter(bb, d, seqs, hidden, args.drafter_depth)
        if args.decode:
            r["decoded"] = {**decode_drafter(model, d, seqs[: args.decode], args.drafter_depth, args.max_new_tokens),
                            "simulated_tau_same_prompts": score_drafter(bb, d, seqs[: args.decode],
                                                                        hidden[: args.decode],
                                                                        args.drafter_depth)["chain_tau_drafter_only"]}
        res.setdefault("drafters", {})[folder] = r
        print(folder, json.dumps(r), flush=True)
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"{time.strftime('%Y%m%d-%H%M%S')}-heads-humaneval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
