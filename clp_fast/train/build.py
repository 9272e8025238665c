"""Building the data: hidden states and soft targets of every planned sequence, cached shard by shard.

Per position: the final hidden state (bf16), the backbone's argmax and its top-k ids and
log-probabilities. Two sources, mixed: teacher-forced windows of real code (prefill only: several
times cheaper per position than generating) and the backbone's own greedy continuations, generated in
batches through :func:`clp_fast.generate` and then prefilled (self-distillation: on such text every
target is the exact greedy one). Each shard is written atomically; a resumed build checks the shards
it finds, rebuilds a corrupt one (naming it) and computes only what is missing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clp_fast.train.config import KINDS, TrainConfig, log
from clp_fast.train.shards import CorruptShardError, check_shard, remove_dead_temps, write_shard


def lm_topk(W: torch.Tensor, h: torch.Tensor, top_k: int, chunk: int = 512):
    """``h [N, H]`` → argmax ``[N]`` (exactly as :func:`reference.fused_heads`: logits rounded to W's dtype,
    lowest index on ties), top-k ids ``[N, top_k]`` and their log-probabilities ``[N, top_k]`` (fp32)."""
    am, ids, lps = [], [], []
    for i in range(0, h.shape[0], chunk):
        lg = F.linear(h[i : i + chunk].to(W.dtype), W).float()
        am.append(lg.argmax(dim=-1))
        v, ix = lg.topk(top_k, dim=-1)
        lps.append(v - torch.logsumexp(lg, dim=-1, keepdim=True))
        ids.append(ix)
    if not am:
        z = torch.zeros(0, top_k)
        return torch.zeros(0, dtype=torch.long), z.long(), z
    return torch.cat(am), torch.cat(ids), torch.cat(lps)


def prefill(bb, seqs: list[list[int]], L: int, top_k: int) -> dict[str, torch.Tensor]:
    """Hidden states ``[n, L, H]`` (bf16) and the backbone's argmax / top-k of right-padded ``seqs``."""
    n = len(seqs)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    T = int(lens.max())
    tokens = torch.zeros(n, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    # transformers' own forward (same math as NativeBackbone's prefill): 1.2-1.4x faster here in bf16.
    hidden = bb.inner(input_ids=tokens.to(bb.device), attention_mask=mask.to(bb.device)).last_hidden_state
    H = hidden.shape[-1]
    am, ids, lps = lm_topk(bb.plain_lm_head, hidden.reshape(n * T, H), top_k)
    out = {"hidden": torch.zeros(n, L, H, dtype=torch.bfloat16), "argmax": torch.zeros(n, L, dtype=torch.int32),
           "top_ids": torch.zeros(n, L, top_k, dtype=torch.int32),
           "top_logp": torch.full((n, L, top_k), -torch.inf, dtype=torch.float16)}
    out["hidden"][:, :T] = hidden.cpu().to(torch.bfloat16)
    out["argmax"][:, :T] = am.view(n, T).cpu().int()
    out["top_ids"][:, :T] = ids.view(n, T, top_k).cpu().int()
    out["top_logp"][:, :T] = lps.view(n, T, top_k).cpu().half()
    return out


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Batched greedy continuations (left-padded, our engine in greedy mode); EOS ends a row."""
    import clp_fast

    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    dev = model.get_output_embeddings().weight.device
    out, stats = clp_fast.generate(model, ids.to(dev), None, attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                                   mode="greedy", return_stats=True)
    return [out[i, P : P + n].tolist() for i, n in enumerate(stats.new_tokens)]


def shard_seqs(cfg: TrainConfig, L: int, H: int) -> int:
    """Sequences per shard: a quarter of ``max_ram_gb`` at most, and at most 128 so that an interruption
    loses little work."""
    per_seq = L * H * 2 + L * (12 + 6 * cfg.top_k)
    return max(1, min(128, int(cfg.max_ram_gb * 2**30 / 4 / per_seq)))


def seq_len(cfg: TrainConfig, kind: str, seqs: list[list[int]]) -> int:
    if kind in ("tf", "heldout_tf"):
        return cfg.window
    return max(len(p) for p in seqs) + cfg.gen_new_tokens if seqs else 1


def _build_shard(model, bb, kind: str, chunk: list[list[int]], L: int, cfg: TrainConfig, bar) -> dict:
    if kind in ("tf", "heldout_tf"):
        full, starts, gstarts = chunk, [cfg.skip_first] * len(chunk), [0] * len(chunk)
    else:
        full, starts, gstarts = [], [], []
        for b in range(0, len(chunk), cfg.gen_batch):
            part = chunk[b : b + cfg.gen_batch]
            for p, c in zip(part, greedy(model, part, cfg.gen_new_tokens)):
                full.append(p + c)
                starts.append(min(cfg.skip_first, len(p) - 1))
                gstarts.append(len(p) - 1)  # from here on, every target is the backbone's own greedy
    n = len(full)
    parts = []
    order = sorted(range(n), key=lambda i: -len(full[i]))  # longest first: each prefill batch pads little
    for b in range(0, n, cfg.prefill_batch):
        idx = order[b : b + cfg.prefill_batch]
        parts.append((idx, prefill(bb, [full[i] for i in idx], L, cfg.top_k)))
        bar.update(sum(len(full[i]) for i in idx))
    shard = {key: torch.cat([p[key] for _, p in parts])[torch.argsort(torch.tensor(sum((i for i, _ in parts), [])))]
             for key in parts[0][1]}
    toks = torch.zeros(n, L, dtype=torch.int32)
    for i, s in enumerate(full):
        toks[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
    shard.update(tokens=toks, length=torch.tensor([len(s) for s in full], dtype=torch.int32),
                 start=torch.tensor(starts, dtype=torch.int32), gen_start=torch.tensor(gstarts, dtype=torch.int32))
    return {key: v.contiguous() for key, v in shard.items()}


def build_data(model, bb, plan: dict, cfg: TrainConfig, cache: Path, progress: bool) -> dict:
    """Write every missing (or corrupt) shard of every kind; returns per-kind stats."""
    H = bb.plain_lm_head.shape[1]
    out = {}
    remove_dead_temps(cache)
    for kind in KINDS:
        seqs = plan.get(kind, [])
        d = cache / kind
        d.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(d)
        L = seq_len(cfg, kind, seqs)
        per = shard_seqs(cfg, L, H)
        n_shards = math.ceil(len(seqs) / per)
        for stale in sorted(d.glob("shard-*.safetensors"))[n_shards:]:  # left by a larger earlier plan
            if int(stale.name[6:11]) >= n_shards:
                stale.unlink()
        gen = kind in ("gen", "heldout")
        total = sum(len(s) + (cfg.gen_new_tokens if gen else 0) for s in seqs)
        t0, built = time.perf_counter(), 0
        bar = tqdm(total=total, desc=f"data:{kind}", unit="tok", unit_scale=True, disable=not progress,
                   dynamic_ncols=True, smoothing=0.05)
        for si in range(n_shards):
            path = d / f"shard-{si:05d}.safetensors"
            chunk = seqs[si * per : (si + 1) * per]
            if path.is_file():
                try:
                    check_shard(path, chunk, prompts_only=gen)
                    bar.update(sum(len(s) + (cfg.gen_new_tokens if gen else 0) for s in chunk))
                    continue
                except CorruptShardError as err:
                    log(f"{err} -- rebuilding it", True)
                    path.unlink()
            before = bar.n
            write_shard(_build_shard(model, bb, kind, chunk, L, cfg, bar), path)
            built += bar.n - before
        bar.close()
        secs = time.perf_counter() - t0
        out[kind] = {"sequences": len(seqs), "shards": n_shards, "seconds_this_run": secs,
                     "tokens_this_run": built}
    return out
