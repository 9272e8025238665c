#!/usr/bin/env python
"""``make eval``: does clp mode keep the tasks greedy solves? Executed HumanEval pass@1, paired against greedy.

For N HumanEval problems (default 40, seeded subset; ``--full``: all 164) each method completes every
prompt: ``greedy`` (the engine's greedy; in fp32 identical to lossless), ``clp@t`` for each CLP
threshold of the sweep (unverified guesses, the paper's mode) and ``gate@t`` (the gate baseline).
Completions are generated in left-padded batches, in chunks of ``--chunk-tokens``, and stop at the end
of the function (HumanEval's stop strings: a line at column 0 starting ``def``/``class``/``if``/
``print``/``#``); each completion, the problem's tests and ``check(entry_point)`` then run in
:mod:`clp_fast.eval.sandbox` (separate process, time/CPU/memory limits, temp dir, empty env, no network).
The canonical solutions run through the same sandbox as a harness check (they must all pass).

Reported per method: pass@1 with a 95 % Wilson interval, the paired counts against greedy (greedy
passed and this failed, and the reverse) with McNemar's exact p, τ, exact match with greedy's
completion, seq-rep-4 and its ratio to greedy's (our reading of the paper's repetition ratio), and
tokens/s against transformers greedy measured single-stream in the same run on ``--speed-problems``
problems (interleaved, with the load average beside it). The shipped-threshold rule: the fastest
threshold (most tokens per forward over all N problems) whose paired loss against greedy is at most
one problem; provisional unless ``--full``. ``--write-threshold DIR`` records it in a heads folder.
``--lossless`` adds lossless mode as a control: identical to greedy in exact arithmetic, so in bf16 its
paired loss is what rounding alone flips (verifying a span in one forward changes near-tie argmaxes).

Completions are cached per (method, problem) in ``--cache`` (JSON lines): a killed run resumes.

    python bench/quality.py                                  # 40 problems, shipped Qwen heads
    python bench/quality.py --full --write-threshold clp_fast/assets/heads/qwen2.5-coder-0.5b-instruct
    python bench/quality.py --model qwen2.5-coder-1.5b-instruct --heads path/to/heads --thresholds 0.9,0.7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info, result_stem  # noqa: E402
from methods import ForwardCounter, load_heads, stop_ids  # noqa: E402
from quality_report import (  # noqa: E402
    choose_threshold,
    format_quality_table,
    plot_quality,
    summarize_quality,
    write_threshold,
)

import clp_fast  # noqa: E402
from clp_fast.eval import metrics  # noqa: E402
from clp_fast.eval.sandbox import Limits, run_python  # noqa: E402

SCHEMA = "clp_fast.quality/1"
ROOT = Path(__file__).resolve().parent.parent
# HumanEval's stop sequences (Chen et al. 2021, the Codex paper's evaluation): a new top-level statement
# ends the function. Searched in the completion only, never in the prompt.
STOP_STRINGS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
DEFAULT_THRESHOLDS = "shipped,0.9,0.8,0.7,0.6,0.5"


# ------------------------------------------------------------------------------------------- text
def truncate_completion(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    """``text`` cut before the first stop string (the end of the function); unchanged if none occurs."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def check_program(problem: dict, completion: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, and ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# ------------------------------------------------------------------------------------------ cache
class CompletionCache:
    """Completions by ``(method key, task_id)``, appended to a JSON-lines file as they are made.

    One line per completion, flushed at once: a killed run loses at most the batch in flight, and a
    torn last line is skipped when the file is read back.
    """

    def __init__(self, path: Path | None):
        self.path, self.rows = path, {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.rows[(rec["key"], rec["task_id"])] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by a kill

    def get(self, key: str, task_id: str) -> dict | None:
        return self.rows.get((key, task_id))

    def put(self, rec: dict) -> None:
        self.rows[(rec["key"], rec["task_id"])] = rec
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------- methods
def quality_methods(heads, thresholds: list[str], gate_thresholds: list[str], lossless: bool = False,
                    drafter=None, drafter_thresholds: list[str] = ()) -> list[dict]:
    """``[{"name", "mode", "policy", "threshold"}]``: greedy, clp at each threshold, gate at each threshold, with
    ``drafter`` (an :class:`~clp_fast.drafts.eagle.EagleDrafter` with a CLP) clp mode from its chain at each of
    ``drafter_thresholds`` (policy ``"drafter"``), and with ``lossless`` the lossless mode as a control:
    identical to greedy in exact arithmetic, so its paired loss against greedy is what the dtype's rounding alone
    flips (no threshold is chosen from it)."""
    saved = dict(heads.thresholds, drafter=drafter.clp_threshold if drafter is not None else None)

    def resolve(t: str, policy: str) -> float:
        value = (0.9 if saved.get(policy) is None else saved[policy]) if t == "shipped" else float(t)
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"quality: threshold {t!r} must be 'shipped' or in [0, 1]")
        return value

    out = [{"name": "greedy", "mode": "greedy", "policy": "clp", "threshold": None}]
    for policy, ts in (("clp", thresholds), ("gate", gate_thresholds if heads.gate is not None else []),
                       ("drafter", drafter_thresholds if drafter is not None else [])):
        for value in sorted({resolve(t, policy) for t in ts}, reverse=True):
            out.append({"name": f"{policy}@{value:.4g}", "mode": "clp", "policy": policy, "threshold": value,
                        "shipped": value == saved.get(policy)})
    if lossless:
        out.append({"name": "lossless", "mode": "lossless", "policy": None, "threshold": None})
    return out


def method_key(method: dict, run_id: str, drafter_id: str = "") -> str:
    """A completion's cache key: the run's, the method's and, for the drafter's rows, its weights' (CLP included)."""
    return f"{run_id}/{method['name']}" + (f"/{drafter_id}" if method["policy"] == "drafter" else "")


def decode(model, heads, drafter, method: dict, ids, n: int, eos, pad, mask=None):
    """One ``clp_fast.generate`` call of ``method``: greedy, clp / gate with the heads, the drafter's clp mode."""
    if method["policy"] == "drafter":
        from clp_fast.drafts.eagle import EagleSource

        h, extra = False, {"drafts": [EagleSource.factory(drafter)], "policy": "clp"}
    else:
        h, extra = (None if method["mode"] == "greedy" else heads), {"policy": method["policy"] or "clp"}
    return clp_fast.generate(model, ids, h, attention_mask=mask, max_new_tokens=n, mode=method["mode"],
                             clp_threshold=method["threshold"], eos_token_id=eos, pad_token_id=pad,
                             return_stats=True, **extra)


def _run_id(args, heads) -> str:
    """What a cached completion depends on: model, dtype, token budget, batching, and the heads' *weights*.

    The weights are hashed rather than the config, whose metadata (calibration tables, notes) may grow
    without changing a single completion.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(heads.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest = hashlib.sha256(json.dumps({"model": args.model, "heads": h.hexdigest(), "k": heads.k,
                                        "draft_vocab": heads.draft_vocab, "dtype": args.dtype,
                                        "max_new_tokens": args.max_new_tokens, "chunk": args.chunk_tokens,
                                        "batch": args.batch_size, "stops": STOP_STRINGS},
                                       sort_keys=True).encode()).hexdigest()[:12]
    return digest


# ------------------------------------------------------------------------------------- generation
def _generate_batch(model, tok, heads, method: dict, prompts: list[list[int]], args, eos, pad,
                    drafter=None) -> list[dict]:
    """Complete each prompt (ids) until a stop string, EOS or the budget, in chunks; one dict per prompt."""
    gens = [[] for _ in prompts]
    forwards = [0] * len(prompts)
    active = list(range(len(prompts)))
    t0 = time.perf_counter()
    while active:
        n = min(args.chunk_tokens, args.max_new_tokens - len(gens[active[0]]))
        ids, mask = clp_fast.left_pad([prompts[j] + gens[j] for j in active], pad)
        out, st = decode(model, heads, drafter, method, ids, n, eos, pad, mask)
        still = []
        for r, j in enumerate(active):
            new = metrics.generated_ids(out[r].tolist(), ids.shape[1], eos, n_new=st.new_tokens[r])
            gens[j] += new
            forwards[j] += st.row_forwards[r]
            text = tok.decode(gens[j], skip_special_tokens=True)
            done = (len(new) < n or (new and new[-1] in eos) or len(gens[j]) >= args.max_new_tokens
                    or truncate_completion(text) != text)
            if not done:
                still.append(j)
        active = still
    seconds = time.perf_counter() - t0
    recs = []
    for j in range(len(prompts)):
        text = tok.decode(gens[j], skip_special_tokens=True)
        recs.append({"ids": gens[j], "raw": text, "completion": truncate_completion(text), "new_tokens": len(gens[j]),
                     "row_forwards": forwards[j], "batch_seconds": seconds, "batch_size": len(prompts)})
    return recs


def generate_all(model, tok, heads, methods: list[dict], problems: list[dict], args, eos, pad, cache, run_id,
                 log, drafter=None, drafter_id: str = "") -> dict[str, dict[str, dict]]:
    """``{method name: {task_id: completion record}}``, from the cache where it has them."""
    order = sorted(problems, key=lambda p: len(p["ids"]))  # similar lengths batch together: less padding
    out = {}
    for mi, m in enumerate(methods):
        key = method_key(m, run_id, drafter_id)
        todo = [p for p in order if cache.get(key, p["task_id"]) is None]
        log(f"[{mi + 1}/{len(methods)}] {m['name']}: {len(problems) - len(todo)} cached, {len(todo)} to generate")
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b: b + args.batch_size]
            recs = _generate_batch(model, tok, heads, m, [p["ids"] for p in batch], args, eos, pad, drafter)
            for p, rec in zip(batch, recs):
                cache.put({"key": key, "task_id": p["task_id"], "method": m["name"], **rec})
            done = b + len(batch)
            log(f"  {m['name']}: {done}/{len(todo)} generated (load avg {loadavg()[0]:.1f})")
        out[m["name"]] = {p["task_id"]: cache.get(key, p["task_id"]) for p in problems}
    return out


# -------------------------------------------------------------------------------------- execution
def execute_all(problems: list[dict], completions: dict[str, dict[str, dict]], limits: Limits,
                workers: int) -> dict[str, dict[str, dict]]:
    """Run every completion (and the canonical solutions, as ``"canonical"``) through the sandbox."""
    jobs = [("canonical", p, p["canonical_solution"]) for p in problems]
    jobs += [(name, p, recs[p["task_id"]]["completion"]) for name, recs in completions.items() for p in problems]

    def one(job):
        name, p, completion = job
        r = run_python(check_program(p, completion), limits)
        return name, p["task_id"], {"status": r.status, "passed": r.passed, "seconds": round(r.seconds, 3),
                                    "stderr_tail": r.stderr[-300:]}

    results: dict[str, dict[str, dict]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, task_id, res in pool.map(one, jobs):
            results.setdefault(name, {})[task_id] = res
    return results


# ------------------------------------------------------------------------------------------ speed
def measure_speed(model, heads, methods: list[dict], problems: list[dict], args, eos, pad, log, drafter=None) -> dict:
    """Single-stream tokens/s of every method and transformers greedy on the same prompts, interleaved."""
    from transformers import GenerationConfig

    counter = ForwardCounter(model)

    def hf(ids, n):
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        before = counter.n
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return out, counter.n - before

    def ours(m):
        def run(ids, n):
            out, st = decode(model, heads, drafter, m, ids, n, eos, pad)
            return out, st.forward_passes
        return run

    runners = [("hf-greedy", hf)] + [(m["name"], ours(m)) for m in methods]
    if problems:
        for _, run in runners:  # warm-up: bf16 kernels are built per shape on first use
            run(torch.tensor([problems[0]["ids"]]), min(4, args.speed_tokens))
    per = {name: [] for name, _ in runners}
    load0 = loadavg()
    for pi, p in enumerate(problems):
        ids = torch.tensor([p["ids"]])
        for name, run in runners[pi % len(runners):] + runners[: pi % len(runners)]:
            t0 = time.perf_counter()
            out, fw = run(ids, args.speed_tokens)
            dt = time.perf_counter() - t0
            n_new = len(metrics.generated_ids(out[0].tolist(), ids.shape[1], eos))
            per[name].append({"task_id": p["task_id"], "new_tokens": n_new, "seconds": dt, "forwards": fw})
        log(f"  speed: {pi + 1}/{len(problems)} problems (load avg {loadavg()[0]:.1f})")
    rows = {}
    for name, recs in per.items():
        if not recs:
            continue
        tps = [r["new_tokens"] / r["seconds"] for r in recs]
        base = [r["new_tokens"] / r["seconds"] for r in per["hf-greedy"]]
        rows[name] = {"tokens_per_s": sum(r["new_tokens"] for r in recs) / sum(r["seconds"] for r in recs),
                      "speedup_median": metrics.median_ratio(tps, base),
                      "tau": sum(r["new_tokens"] for r in recs) / max(sum(r["forwards"] for r in recs), 1),
                      "per_problem": recs}
    return {"problems": [p["task_id"] for p in problems], "max_new_tokens": args.speed_tokens,
            "loadavg_start": load0, "loadavg_end": loadavg(), "rows": rows}


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or transformers folder")
    p.add_argument("--heads", help="folder of MTP heads (default: the shipped heads for --model)")
    p.add_argument("--n", type=int, default=40, help="HumanEval problems (seeded subset; default 40)")
    p.add_argument("--full", action="store_true", help="all 164 problems (the threshold rule's real test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem subset")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help=f"CLP thresholds (default {DEFAULT_THRESHOLDS})")
    p.add_argument("--gate-thresholds", default="shipped", help="gate thresholds ('' for none; default shipped)")
    p.add_argument("--drafter", metavar="DIR", help="an EAGLE-style drafter with a CLP: adds its clp-mode rows")
    p.add_argument("--drafter-thresholds", default="shipped",
                   help="the drafter CLP's thresholds (default: the one training saved)")
    p.add_argument("--lossless", action="store_true",
                   help="also run lossless mode, a control: its paired loss is what rounding alone flips")
    p.add_argument("--max-new-tokens", type=int, default=384, help="budget per completion (default 384)")
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per generate call between stop checks")
    p.add_argument("--batch-size", type=int, default=8, help="completions per batch (default 8)")
    p.add_argument("--speed-problems", type=int, default=4, help="problems of the single-stream speed run (0: none)")
    p.add_argument("--speed-tokens", type=int, default=128, help="tokens per speed-run call (default 128)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--timeout", type=float, default=10.0, help="sandbox wall-clock seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="sandbox address-space limit per program")
    p.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once")
    p.add_argument("--cache", help="JSON-lines completion cache (default: $CLP_FAST_HOME/quality-cache/<run>.jsonl)")
    p.add_argument("--write-threshold", metavar="HEADS_DIR", help="record the chosen CLP threshold in HEADS_DIR")
    p.add_argument("--allow-provisional", action="store_true", help="--write-threshold without --full")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def load_drafter(folder: str | None, model):
    """``(drafter, its weights' sha256 prefix)`` from ``--drafter`` (``(None, "")`` without one); it needs a CLP."""
    if not folder:
        return None, ""
    from clp_fast.drafts.eagle import EagleDrafter

    W = model.get_output_embeddings().weight
    d = EagleDrafter.from_pretrained(folder, model=model, dtype=W.dtype)
    if d.clp is None:
        raise SystemExit(f"quality: the drafter in {folder} has no CLP (train it with clp-fast train --drafter eagle)")
    return d, json.loads((Path(folder) / "config.json").read_text())["weights_sha256"][:12]


def _check_args(args) -> None:
    for name in ("n", "max_new_tokens", "chunk_tokens", "batch_size", "speed_tokens", "workers", "memory_mb"):
        if getattr(args, name) < 1:
            raise SystemExit(f"quality: --{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.speed_problems < 0:
        raise SystemExit(f"quality: --speed-problems {args.speed_problems} must be >= 0")
    if args.write_threshold and not (args.full or args.allow_provisional):
        raise SystemExit("quality: --write-threshold needs --full (164 problems), or --allow-provisional")
    if args.write_threshold and not (Path(args.write_threshold) / "config.json").is_file():
        raise SystemExit(f"quality: --write-threshold {args.write_threshold}: no config.json there")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, stem, info = time.perf_counter(), result_stem(), machine_info()
    limits = Limits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout)), memory_mb=args.memory_mb)

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from clp_fast.eval.data import humaneval_problems
    from clp_fast.models.hub import clp_home, load_model

    problems = humaneval_problems() if args.full else humaneval_problems(args.n, args.seed)
    model, tok = load_model(args.model, dtype=args.dtype)
    if tok is None:
        raise SystemExit(f"quality: no tokenizer with the model {args.model}")
    heads = load_heads(args, model)
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    for p in problems:
        p["ids"] = tok(p["prompt"])["input_ids"]
    drafter, drafter_id = load_drafter(args.drafter, model)
    methods = quality_methods(heads, [t for t in args.thresholds.split(",") if t.strip()],
                              [t for t in args.gate_thresholds.split(",") if t.strip()], args.lossless, drafter,
                              [t for t in args.drafter_thresholds.split(",") if t.strip()])
    run_id = _run_id(args, heads)
    cache_path = Path(args.cache) if args.cache else clp_home() / "quality-cache" / (
        f"{Path(args.model).name}-{args.dtype}-{run_id}.jsonl")
    log(f"{args.model} {args.dtype}, {len(problems)} problems, methods {[m['name'] for m in methods]}, "
        f"cache {cache_path}")
    cache = CompletionCache(cache_path)
    completions = generate_all(model, tok, heads, methods, problems, args, eos, pad, cache, run_id, log, drafter,
                               drafter_id)
    log("executing completions in the sandbox")
    executed = execute_all(problems, completions, limits, args.workers)
    speed = (measure_speed(model, heads, methods, problems[: args.speed_problems], args, eos, pad, log, drafter)
             if args.speed_problems else None)
    rows = summarize_quality(methods, problems, completions, executed, speed, tok)
    choice = choose_threshold(rows, len(problems), full=len(problems) == 164)
    info["loadavg_end"] = loadavg()
    elapsed = time.perf_counter() - t_start
    header = (f"clp_fast quality — {args.model}, {args.dtype}, {len(problems)} HumanEval problems "
              f"({'all' if len(problems) == 164 else f'seed {args.seed}'}), ≤ {args.max_new_tokens} tokens, heads "
              f"k={heads.k} ({args.heads or 'shipped'}); commit {info['commit']}; load avg "
              f"{info['loadavg_start'][0]:.1f} → {info['loadavg_end'][0]:.1f}")
    text = format_quality_table(rows, choice, executed, speed, header)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"schema": SCHEMA, "machine": info, "elapsed_s": elapsed, "stem": stem,
              "settings": {**{k: v for k, v in vars(args).items()}, "eos_token_ids": eos, "pad_token_id": pad,
                           "stop_strings": STOP_STRINGS, "limits": vars(limits), "run_id": run_id,
                           "cache": str(cache_path), "heads_config": heads.config_dict(),
                           "problems": [p["task_id"] for p in problems]},
              "methods": methods, "rows": rows, "choice": choice, "speed": speed, "executed": executed,
              "completions": {name: {tid: {k: r[k] for k in ("completion", "new_tokens", "row_forwards", "ids")}
                                     for tid, r in recs.items()} for name, recs in completions.items()}}
    json_path = out_dir / f"{stem}-quality.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(json_path)
    (out_dir / f"{stem}-quality.md").write_text(text + "\n")
    if not args.no_plot:
        plot_quality(rows, choice, out_dir / f"{stem}-quality.png", header)
    if args.write_threshold:
        write_threshold(Path(args.write_threshold), choice, rows, header, json_path.name)
        log(f"recorded the CLP threshold in {args.write_threshold}")
    log(f"wrote {json_path} (+ .md{'' if args.no_plot else ', .png'}) in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
