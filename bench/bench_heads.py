"""Question: what do k+1 head rows cost, next to one plain LM-head matvec of the same R?

Methods, all in this process on the same random weights (Qwen2.5-0.5B LM head by default, V 151,936 x H 896):
  matvec   one plain LM head, ``F.linear(hidden, W)`` + argmax: the baseline the ratio is taken against.
  fused    CUDA: ``clp_fast.kernels.fused_heads`` (Triton). CPU: the Triton path is only the interpreter there, so
           "fused" is ``clp_fast.reference.fused_heads``: one matmul for all R*(k+1) rows in the input dtype.
  upcast   the earlier reference: ``z.float() @ W.float().t()``, which copies all of W to fp32 every call.
  naive    k+1 separate ``F.linear(z_j, W)`` + argmax: W read k+1 times.
  .heads/.gemm/.stats  (CPU) the fused reference's steps alone: head MLPs, the one GEMM, argmax + softmax stats.
GB/s is the bytes of W divided by the time (W is read once per call by matvec and fused).
Target (CPU): fused at k+1 = 5 costs <= 1.25x one matvec, bf16 and fp32, R 1 and 5.

    python bench/bench_heads.py [--R 1 5] [--k 4] [--dtypes bf16 fp32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clp_fast import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def time_methods(methods: dict, device: torch.device, repeats: int) -> dict:
    """Median seconds of each method. On CPU the methods take turns within each round, so load from other
    processes on a shared machine falls on all of them alike and the ratios stay meaningful."""
    if device.type == "cuda":
        import triton.testing

        return {n: triton.testing.do_bench(fn, return_mode="median") / 1e3 for n, fn in methods.items()}
    times = {n: [] for n in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for n, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def upcast_variant(hidden, head_weight, head_bias, W):
    """The reference's LM-head step before it switched to F.linear: upcasts all of W per call."""
    z = reference.head_hidden(hidden, head_weight, head_bias)
    logits = z.reshape(-1, z.shape[-1]).float() @ W.float().t()
    return logits.argmax(-1)


def naive(hidden, head_weight, head_bias, W):
    z = reference.head_hidden(hidden, head_weight, head_bias)
    return [F.linear(z[:, j], W).argmax(-1) for j in range(z.shape[1])]


def matvec(hidden, W):
    return F.linear(hidden, W).argmax(-1)


def make_methods(hidden, hw, hb, W, fused_impl, *, upcast: bool, parts: bool) -> dict:
    """Zero-argument callables to time, all on the same inputs."""
    methods = {
        "matvec": lambda: matvec(hidden, W),
        "fused": lambda: fused_impl(hidden, hw, hb, W),
        "naive": lambda: naive(hidden, hw, hb, W),
    }
    if upcast:
        methods["upcast"] = lambda: upcast_variant(hidden, hw, hb, W)
    if parts:
        # Where the CPU fused time goes: the reference's three steps, timed on their own.
        z = reference.head_hidden(hidden, hw, hb).reshape(-1, hidden.shape[1])
        lg = F.linear(z, W).float()
        methods[".heads"] = lambda: reference.head_hidden(hidden, hw, hb)
        methods[".gemm"] = lambda: F.linear(z, W).float()
        methods[".stats"] = lambda: (lg.argmax(-1), torch.exp(lg.amax(-1) - torch.logsumexp(lg, -1)))
    return methods


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--H", type=int, default=896)
    ap.add_argument("--V", type=int, default=151_936)
    ap.add_argument("--R", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-upcast", action="store_true", help="skip the slow fp32-upcast variant")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        from clp_fast.kernels.fused_heads import fused_heads as fused_impl

        fused_name = "triton"
    else:
        fused_impl, fused_name = reference.fused_heads, "torch reference"
    torch.manual_seed(0)
    H, V, k = args.H, args.V, args.k
    meta = dict(device=device_name(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                commit=git_commit(), torch=torch.__version__, H=H, V=V, k=k, fused_impl=fused_name)  # fmt: skip
    rows = []
    print(f"# fused heads vs one LM-head matvec on {meta['device']}, H={H} V={V} k={k} (k+1={k + 1} rows per R)")
    print(f"# fused = {fused_name}; time = median of {args.repeats}; GB/s = bytes of W / time; x = time / matvec")
    print(f"{'dtype':>5} {'R':>3} | {'method':>7} {'ms':>9} {'GB/s':>7} {'x matvec':>9}")
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        W = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
        w_bytes = W.numel() * W.element_size()
        hw = (torch.randn(k, H, H, device=device) * 0.02).to(dtype)
        hb = torch.zeros(k, H, device=device, dtype=dtype)
        for R in args.R:
            hidden = torch.randn(R, H, device=device).to(dtype)
            methods = make_methods(hidden, hw, hb, W, fused_impl, upcast=not args.no_upcast, parts=device.type == "cpu")
            timed = time_methods(methods, device, args.repeats)
            base = timed["matvec"]
            for name, t in timed.items():
                row = dict(meta, dtype=dname, R=R, method=name, ms=t * 1e3, gbps=w_bytes / t / 1e9, x_matvec=t / base)
                rows.append(row)
                print(f"{dname:>5} {R:>3} | {name:>7} {row['ms']:9.2f} {row['gbps']:7.2f} {row['x_matvec']:9.2f}")
            fused_x = timed["fused"] / base
            verdict = "MEETS" if fused_x <= 1.25 else "MISSES"
            print(f"{dname:>5} {R:>3} | fused {verdict} the 1.25x target ({fused_x:.2f}x)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"bench_heads-{device.type}-{stamp}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"# wrote {len(rows)} rows to {os.path.relpath(path)}")
    return rows


if __name__ == "__main__":
    main()
