"""``clp-fast train``: its arguments and how they map onto :func:`clp_fast.train.train_heads`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from clp_fast.train.config import HEAD_DESIGNS, PROMPT_STYLES, TrainConfig

# argparse dest -> TrainConfig field, for the options that map one to one
_FIELDS = ("k", "max_tokens", "heldout_tokens", "gen_prompts", "heldout_prompts", "gen_new_tokens", "window",
           "epochs", "batch_size", "lr", "warmup_steps", "inconsistent_weight", "ce_negatives", "ce_weight",
           "kl_weight", "kl_topk", "reg_weight", "top_k", "head_design", "clp_precision", "draft_vocab", "dtype",
           "checkpoint_every", "max_ram_gb", "seed", "gen_batch", "prefill_batch", "prompt_style")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``clp-fast train`` options to ``parser`` (used by ``clp_fast.cli``)."""
    d = TrainConfig()
    a = parser.add_argument
    a("--model", required=True, help="known model name or local transformers folder")
    a("--out", required=True, help="output folder for the heads, CLP, gate and training card")
    a("--k", type=int, default=d.k, help="number of MTP heads (default %(default)s)")
    a("--corpus", nargs="*", default=[], help="extra source files/folders, added to the Python stdlib")
    a("--no-stdlib", action="store_true", help="do not use the running interpreter's stdlib as corpus")
    a("--max-tokens", type=int, default=d.max_tokens, help="teacher-forced tokens (default %(default)s)")
    a("--heldout-tokens", type=int, default=d.heldout_tokens,
      help="teacher-forced tokens from held-out files: CLP rows and ablation evaluation (default %(default)s)")
    a("--gen-prompts", type=int, default=d.gen_prompts, help="greedy continuations for training")
    a("--heldout-prompts", type=int, default=d.heldout_prompts, help="greedy continuations for CLP/accuracy")
    a("--gen-new-tokens", type=int, default=d.gen_new_tokens)
    a("--prompt-style", choices=PROMPT_STYLES, default=d.prompt_style,
      help="continuations' prompts: code windows, or HumanEval-shaped def + docstring (default %(default)s)")
    a("--gen-batch", type=int, default=d.gen_batch, help="batch of the greedy generation (default %(default)s)")
    a("--prefill-batch", type=int, default=d.prefill_batch, help="sequences per prefill (default %(default)s)")
    a("--window", type=int, default=d.window, help="tokens per teacher-forced window (default %(default)s)")
    a("--top-k", type=int, default=d.top_k, help="soft-target ids cached per position (default %(default)s)")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=d.lr)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--inconsistent-weight", type=float, default=d.inconsistent_weight,
      help="weight of teacher-forced targets whose prefix is not greedy-consistent (default %(default)s)")
    a("--ce-weight", type=float, default=d.ce_weight, help="weight of the cross-entropy on argmax labels")
    a("--kl-weight", type=float, default=d.kl_weight, help="weight of the top-k distillation KL")
    a("--kl-topk", type=int, default=d.kl_topk, help="soft-target ids used by the KL (<= --top-k)")
    a("--ce-negatives", type=int, default=d.ce_negatives, help="random negatives of the sampled softmax")
    a("--reg-weight", type=float, default=d.reg_weight, help="weight of the logit-space regression loss")
    a("--head-design", default=d.head_design, choices=HEAD_DESIGNS, help="only medusa1 can be shipped")
    a("--clp-precision", type=float, default=d.clp_precision, help="target precision of the CLP threshold")
    a("--draft-vocab", type=int, default=d.draft_vocab,
      help="heads' output vocabulary: the LM head's first N rows (default: all; 32768 for Qwen2.5)")
    a("--no-gate", action="store_true", help="do not train the gate baseline")
    a("--dtype", default=d.dtype, choices=["bf16", "fp32"], help="backbone dtype while building data")
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--max-ram-gb", type=float, default=d.max_ram_gb, help="bound on the cached data held in RAM")
    a("--seed", type=int, default=d.seed)
    a("--cache-dir", default=None, help="where hidden-state shards and checkpoints go")
    a("--resume", action="store_true", help="continue an interrupted run in --out")
    a("--grow-data", action="store_true", help="with --resume: accept changed data options, keep matching shards")
    a("--data-only", action="store_true", help="stop after building the data cache")
    a("--ablation", default=None, help="JSON written by bench/ablate_heads.py, shown in the training card")
    a("--overwrite", action="store_true", help="replace --out (and its cache)")
    a("--budget", default=None, help="wall-time budget note recorded in the training card")
    a("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    a("--drafter", default="heads", choices=["heads", "eagle"],
      help="what to train: the MTP heads + CLP (default) or the EAGLE-style drafter (clp_fast.train.eagle)")
    from clp_fast.train.eagle import add_eagle_arguments

    add_eagle_arguments(parser)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``clp-fast train`` from parsed arguments; returns the exit status."""
    from clp_fast.train.api import train_heads

    if getattr(args, "drafter", "heads") == "eagle":
        from clp_fast.train.eagle import run_train_eagle

        return run_train_eagle(args)

    ablation = None
    if args.ablation:
        ablation = Path(args.ablation)
        if not ablation.is_file():
            raise ValueError(f"--ablation {args.ablation!r} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    from clp_fast.models.hub import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    opts = {name: getattr(args, name) for name in _FIELDS}
    res = train_heads(model, args.out, tokenizer=tokenizer, corpus=args.corpus, resume=args.resume,
                      overwrite=args.overwrite, cache_dir=args.cache_dir, budget=args.budget, backbone=args.model,
                      stdlib=not args.no_stdlib, with_gate=not args.no_gate, data_only=args.data_only,
                      grow_data=args.grow_data, ablation=ablation,
                      command="clp-fast train " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["train"] else
                                                             sys.argv[1:]), **opts)
    if args.data_only:
        print(json.dumps(res, indent=1))
    return 0


def train_main(args: argparse.Namespace) -> int:
    """Alias of :func:`run_train` (the CLI may call either)."""
    return run_train(args)


if __name__ == "__main__":
    sys.exit(run_train(add_train_arguments(argparse.ArgumentParser(prog="clp-fast train")).parse_args()))
