"""Resources and roofline lower bounds of every kernel launch, for named GPUs, from ahead-of-time compiles.

Per kernel and config (``bench/gpu_compile.py``'s units: the launchers' own choices at Qwen2.5 shapes):
registers, spills, shared memory and the occupancy they allow on each GPU; per launch: the bytes it must move
(every input read once, every output written once) and the time that takes at the GPU's peak HBM bandwidth
(A100 2.0 TB/s, H100 3.35 TB/s, H200 4.8 TB/s). That time is a LOWER BOUND, not a measurement: nothing here
ran on a GPU. ``bench/gpu_check.sh`` on a lent GPU prints measured times against the same bound.

    python bench/gpu_compile_report.py                    # A100, H100, H200 (sm_80, sm_90): ~1 min on 2 cores
    python bench/gpu_compile_report.py --gpus A100,H100,H200,B200,RTX5090   # + sm_100, sm_120: ~2 min

Writes ``bench/results/gpu_compile-<time>-<commit>.json`` (every unit and launch) and ``.md`` (summary tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compiling needs real JIT functions

import gpu_compile as gc  # noqa: E402

# Rows of the roofline table: decode rows x heads, bf16, top-m 1, CLP on, fp32 heads (as shipped).
TABLE_ROWS, TABLE_KS = (1, 8, 64), (0, 2, 4)


def occupancy(unit: dict, gpu: gc.Gpu) -> dict:
    """Resident blocks per SM and the fraction of warp slots they fill, with the limiting resource."""
    warps = unit["options"]["num_warps"]
    regs_per_warp = math.ceil(unit["regs"] * 32 / 256) * 256  # allocated per warp, 256 registers at a time
    smem = unit["shared"] + unit["static_smem"]
    limits = {
        "registers": gc.REGS_PER_SM // regs_per_warp // warps,
        "shared memory": gpu.smem_per_sm // (smem + 1024) if smem else gc.MAX_BLOCKS_PER_SM,
        "threads": gpu.max_threads_per_sm // (32 * warps),
        "blocks": gc.MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    return dict(blocks=blocks, warps_pct=round(100 * blocks * warps * 32 / gpu.max_threads_per_sm),
                limited_by=min(limits, key=limits.get))  # fmt: skip


def lower_bound_us(nbytes: int, gpu: gc.Gpu) -> float | None:
    return None if gpu.peak_bytes_per_s is None else nbytes / gpu.peak_bytes_per_s * 1e6


def enrich(res: dict) -> dict:
    for u in res["units"]:
        if "error" not in u:
            u["occupancy"] = {g: occupancy(u, gc.GPUS[g]) for g in u["gpus"]}
    for row in res["launches"]:
        row["lower_bound_us"] = lower_bound_us(row["bytes"], gc.GPUS[row["gpu"]])
    return res


def _fmt_us(x):
    return "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def resource_table(res: dict) -> list[str]:
    """One line per kernel, arch, 16-bit or fp32, and meta-parameter set: ranges over its units."""
    groups = defaultdict(list)
    for u in res["units"]:
        dts = sorted({t for n, t in u["dtypes"].items() if n in ("z_ptr", "h_ptr", "ck_ptr")}) or ["-"]
        keep = {k: v for k, v in u["constexprs"].items() if k.startswith(("BLOCK", "TOP", "FP32", "HAS"))}
        groups[(u["kernel"], u["arch"], ",".join(dts), json.dumps(keep), json.dumps(u["options"]))].append(u)
    gpus = res["gpus"]
    out = ["| kernel | arch | dtype | meta | warps/stages | units | registers | spill (stack B) | shared KB | "
           + " | ".join(f"occupancy {g}" for g in gpus) + " |",
           "|" + "---|" * (9 + len(gpus))]  # fmt: skip
    for (kernel, arch, dts, keep, opts), us in sorted(groups.items()):
        ok = [u for u in us if "error" not in u]
        if len(ok) < len(us):
            err = f"| {kernel} | sm_{arch} | {dts} | {keep} | | {len(us)} | COMPILE ERROR | | |"
            out.append(err + " - |" * len(gpus))
            continue
        regs = sorted({u["regs"] for u in ok})
        occ = []
        for g in gpus:
            o = [u["occupancy"][g] for u in ok if g in u["occupancy"]]
            if not o:
                occ.append("-")
                continue
            worst = min(o, key=lambda x: x["warps_pct"])
            occ.append(f"{worst['warps_pct']}%" + (f" ({worst['limited_by']})" if worst["warps_pct"] < 100 else ""))
        o, smem = json.loads(opts), max(u["shared"] + u["static_smem"] for u in ok)
        out.append(f"| {kernel} | sm_{arch} | {dts} | {keep} | {o['num_warps']}/{o['num_stages']} | {len(ok)} | "
                   f"{regs[0]}-{regs[-1]} | {max(u['stack'] for u in ok)} | {smem / 1024:.0f} | {' | '.join(occ)} |")
    return out


def roofline_table(res: dict) -> list[str]:
    gpus = [g for g in res["gpus"] if gc.GPUS[g].peak_bytes_per_s]
    calls = defaultdict(lambda: defaultdict(dict))  # (shape, R, k) -> gpu -> launch -> (bytes, bound)
    for r in res["launches"]:
        if r["kernel"] == "fused_heads" and r["dtype"] == "bf16" and r["top_m"] == 1 and r["clp"] == (r["k"] > 0) \
                and r["heads"] in ("float32", "bfloat16") and (r["heads"] == "float32" or r["k"] == 0) \
                and r["R"] in TABLE_ROWS and r["k"] in TABLE_KS and r["gpu"] in gpus:  # fmt: skip
            calls[(r["shape"], r["R"], r["k"])][r["gpu"]][r["launch"]] = (r["bytes"], r["lower_bound_us"])
    out = ["| shape | R | k | MB moved (hidden + LM head + merge) | "
           + " | ".join(f"{g} µs (lower bound)" for g in gpus) + " |", "|" + "---|" * (4 + len(gpus))]
    for (shape, R, k), per in sorted(calls.items()):
        first = next(iter(per.values()))
        parts = " + ".join(f"{b / 1e6:.2f}" for b, _ in first.values())
        bounds = [_fmt_us(sum(x[1] for x in per[g].values())) if g in per else "-" for g in gpus]
        out.append(f"| {shape} | {R} | {k} | {parts} | " + " | ".join(bounds) + " |")
    out += ["", "| commit_kv_span_ shape | B | span | MB moved | " + " | ".join(f"{g} µs" for g in gpus) + " |",
            "|" + "---|" * (4 + len(gpus))]  # fmt: skip
    kv = defaultdict(dict)
    for r in res["launches"]:
        if r["kernel"] == "commit_kv_span_" and r["dtype"] == "bf16" and r["span"] in (5, 128) and r["gpu"] in gpus:
            kv[(r["shape"], r["B"], r["span"])][r["gpu"]] = (r["bytes"], r["lower_bound_us"])
    for (shape, B, n), per in sorted(kv.items()):
        b = next(iter(per.values()))[0]
        out.append(f"| {shape} | {B} | {n} | {b / 1e6:.2f} | " + " | ".join(_fmt_us(per[g][1]) for g in gpus) + " |")
    return out


def by_launch(rows: list[dict]) -> list[dict]:
    """One row per case and kernel launch, with each GPU's unit index, grid, bytes and lower bound (µs)."""
    out = {}
    for r in rows:
        key = tuple((k, v) for k, v in r.items() if k not in ("gpu", "grid", "unit", "bytes", "lower_bound_us"))
        bound = None if r["lower_bound_us"] is None else round(r["lower_bound_us"], 3)
        out.setdefault(key, dict(key, on={}))["on"][r["gpu"]] = [r["unit"], r["grid"], r["bytes"], bound]
    return list(out.values())


def write(res: dict, out_dir: Path) -> tuple[Path, Path]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "clp_fast/kernels", "bench/gpu_compile.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                commit=(commit.stdout.strip() or "none") + ("-dirty" if dirty else ""), triton=res["triton"],
                note="times are lower bounds at peak HBM bandwidth (bytes / peak), not measurements; "
                     "compiled ahead of time, never run on a GPU")  # fmt: skip
    stem = f"gpu_compile-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{meta['commit']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(dict(meta, **dict(res, launches=by_launch(res["launches"]))), default=str))
    n_err = sum("error" in u for u in res["units"])
    n_spill = sum(bool(u.get("stack") or u.get("local")) for u in res["units"])
    archs = sorted({u["arch"] for u in res["units"]})
    md = [f"# Ahead-of-time compile report ({meta['date']}, {meta['commit']}, Triton {meta['triton']})", "",
          f"{len(res['units'])} distinct compiled units (sm_{', sm_'.join(map(str, archs))}) from "
          f"{len(res['launches'])} planned launches on {', '.join(res['gpus'])}: {n_err} compile errors, "
          f"{n_spill} with spills. Compiled on a CPU in {res['wall_s']:.0f} s; **nothing here ran on a GPU**.", "",
          "## Registers, spills, shared memory, occupancy", "",
          *resource_table(res), "",
          "## Bytes moved and time at peak bandwidth: a LOWER BOUND, not a measurement", "",
          "Each input read once and each output written once; bf16, top-m 1, CLP on with fp32 heads (k = 0: the "
          "backbone-only call). Peak HBM: " + ", ".join(f"{g} {gc.GPUS[g].peak_bytes_per_s / 1e12:g} TB/s"
                                                        for g in res["gpus"] if gc.GPUS[g].peak_bytes_per_s) + ".", "",
          *roofline_table(res), ""]  # fmt: skip
    mpath.write_text("\n".join(md))
    return jpath, mpath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="A100,H100,H200", help=f"comma-separated, of {', '.join(gc.GPUS)}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    res = enrich(gc.run(a.gpus.split(","), jobs=a.jobs))
    jpath, mpath = write(res, a.out)
    print(mpath.read_text())
    print(f"# wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
