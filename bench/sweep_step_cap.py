"""Question: how many guesses per row should a lossless forward verify as the batch grows?

For one batch size, times transformers' batched greedy ``generate`` and clp_fast lossless at each
``max_step_tokens`` cap, on the same left-padded HumanEval batches, all methods taking turns within
each batch (machine drift falls on all alike). A cap of ``c`` gives each of the B rows
``max(1, c // B - 1)`` guesses; ``0`` is uncapped. Prints tokens/s and the ratio to transformers.

    python bench/sweep_step_cap.py --batch-size 4 --caps 0,8,12,16,32 [--k 2] [--new-tokens 64] [--batches 2]

This is how the default ``clp_fast.decode.MAX_STEP_TOKENS`` was chosen (figures in its comment).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import BASELINE, ForwardCounter, make_methods, stop_ids  # noqa: E402

import clp_fast  # noqa: E402
from clp_fast.eval import metrics  # noqa: E402


def _caps(text: str) -> list[int]:
    caps = [int(c) for c in text.split(",") if c.strip()]
    if not caps or any(c < 0 for c in caps):
        raise argparse.ArgumentTypeError(f"--caps {text!r} must be a comma-separated list of ints >= 0")
    return caps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--caps", type=_caps, required=True, help="comma-separated max_step_tokens values (0 = none)")
    p.add_argument("--k", type=int, default=2, help="heads used (the first k of the shipped ones)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.batches < 1 or args.new_tokens < 1:
        p.error(f"--batch-size {args.batch_size}, --batches {args.batches}, --new-tokens {args.new_tokens} "
                "must all be >= 1")

    from clp_fast.assets import default_heads_for
    from clp_fast.eval.data import humaneval_prompts
    from clp_fast.models.hub import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="bf16")
    heads = default_heads_for(model).truncated(args.k)
    eos, pad = stop_ids(model, tok), tok.pad_token_id
    hf = next(m for m in make_methods(model, heads, [], eos, pad, None, ForwardCounter(model)) if m.name == BASELINE)
    methods = {"hf": lambda ids, mask: hf.run(ids, mask, args.new_tokens)[0]}  # the bench's own baseline
    for c in args.caps:
        methods[f"cap={c}"] = lambda ids, mask, c=c: clp_fast.generate(
            model, ids, heads, attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=eos,
            pad_token_id=pad, max_step_tokens=c)
    pool, rng = humaneval_prompts(), random.Random(args.seed)

    def batch():
        return clp_fast.left_pad([tok(r["prompt"])["input_ids"] for r in rng.sample(pool, args.batch_size)], pad)

    ids, mask = batch()
    for fn in methods.values():  # warm-up
        fn(ids, mask)
    toks = {m: 0 for m in methods}
    secs = {m: 0.0 for m in methods}
    for i in range(args.batches):
        ids, mask = batch()
        names = list(methods) if i % 2 == 0 else list(reversed(methods))
        for name in names:
            t0 = time.perf_counter()
            out = methods[name](ids, mask)
            secs[name] += time.perf_counter() - t0
            toks[name] += sum(len(metrics.generated_ids(r, ids.shape[1], eos)) for r in out.tolist())
    hf_tps = toks["hf"] / secs["hf"]
    print(f"{args.model}, B={args.batch_size}, k={args.k}, {args.batches} batches x {args.new_tokens} tokens, "
          f"{args.threads} threads")
    for name in methods:
        tps = toks[name] / secs[name]
        print(f"{name:>8}: {tps:6.1f} tok/s  {tps / hf_tps:.2f}x transformers batched greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
