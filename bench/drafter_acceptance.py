#!/usr/bin/env python
"""Our engine's drafter acceptance, per depth, on the prompts a ``bench/vllm_peer.py`` run served: the check that
vLLM serving our EAGLE export drafts what our engine drafts.

Both sides draft a fixed chain of ``--depth`` guesses every step (vLLM's ``num_speculative_tokens``, our
``speculation="fixed"``, no prompt lookup, no heads), greedy, B = 1, each prompt's own token ids; the counts are
vLLM's ``num_accepted_tokens_per_pos`` and ours (steps that kept >= j guesses), and both outputs are compared with
the vLLM run's greedy output. vLLM drafts over the full vocabulary, ours over the drafter's draft vocabulary, so
the counts may differ by the guesses past it. Not a timing.

    .venv/bin/python bench/drafter_acceptance.py --prompts P.json --vllm bench/results/.../vllm-...-greedy.part.json \\
        --vllm-eagle bench/results/.../vllm-...-eagle.part.json --drafter clp_fast/assets/drafters/MODEL
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def acceptance(model, drafter, prompts: list[dict], depth: int,
               max_new_tokens: int) -> tuple[list[int], int, list[list]]:
    """``accept_hist`` summed over ``prompts`` (``[m]``: steps that kept m guesses), the guesses kept, and each
    prompt's new ids."""
    import clp_fast

    hist, kept, outs = [0] * (depth + 1), 0, []
    for p in prompts:
        ids = torch.tensor([p["ids"]])
        out, st = clp_fast.generate(model, ids, False, mode="lossless", drafts=[drafter], prompt_lookup=0,
                                    speculation="fixed", max_new_tokens=max_new_tokens, return_stats=True)
        outs.append(out[0, ids.shape[1]:].tolist())
        kept += st.accepted
        for m, c in enumerate(st.accept_hist[: depth + 1]):
            hist[m] += c
    return hist, kept, outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="the JSON run_bench.py --write-prompts wrote")
    p.add_argument("--vllm", required=True, help="the vllm_peer.py greedy part (its outputs are the reference)")
    p.add_argument("--vllm-eagle", help="the vllm_peer.py eagle part (its acceptance counters, printed beside ours)")
    p.add_argument("--drafter", required=True, help="the drafter folder that was exported")
    p.add_argument("--depth", type=int, default=3, help="guesses per step (vllm_peer.py's --spec-k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args()
    from methods import drafter_factory
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.prompts).read_text())
    ref = json.loads(Path(args.vllm).read_text())["per_prompt"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype).eval()
    drafter = drafter_factory(model, args.drafter, args.depth, 1, 0.0)
    hist, kept, outs = acceptance(model, drafter, spec["prompts"], args.depth, spec["max_new_tokens"])
    steps = sum(hist)
    res = {"model": spec["model"], "dtype": spec["dtype"], "drafter": args.drafter, "depth": args.depth,
           "steps": steps, "accepted_per_pos": [sum(hist[j:]) for j in range(1, args.depth + 1)],
           "mean_acceptance_length": 1 + kept / steps,
           "identical_to_vllm_greedy": sum(o[: len(r["ids"])] == r["ids"] for o, r in zip(outs, ref)),
           "prompts": len(outs)}
    if args.vllm_eagle:
        m = json.loads(Path(args.vllm_eagle).read_text())["spec_metrics"]
        res["vllm"] = {"drafts": m.get("num_drafts"), "accepted_per_pos": m.get("num_accepted_tokens_per_pos"),
                       "mean_acceptance_length": m.get("mean_acceptance_length")}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
