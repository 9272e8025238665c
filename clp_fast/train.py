"""Train MTP heads, the CLP and the gate baseline for a frozen backbone, on CPU, by self-distillation.

Pipeline (each stage resumable; see :func:`train_heads`):

1. **plan** -- token sequences cut from local source code (by default the running interpreter's
   standard library, plus ``corpus`` paths). Files are split into a training part and a held-out
   part (10 %, by file) so the held-out numbers never see a training window's file.
   HumanEval function names are passed to :func:`clp_fast.data.cut_prompts` as ``exclude``.
2. **data** -- final (post-norm) hidden states computed once and cached in safetensors shards:

   - ``tf``: teacher-forced windows of real code (prefill only; the main volume -- prefill is
     about 5x faster per token than generation on the 2-core CPU, FINDINGS.md). The target of
     head ``j`` at position ``t`` is the backbone's own argmax at ``t + j``; it is the true greedy
     target when the text agrees with the backbone's argmax at ``t .. t+j-1`` ("greedy-consistent",
     weight 1), and a same-context proxy otherwise (weight ``inconsistent_weight``).
   - ``gen``: the backbone's own greedy continuations (batched, through
     :func:`clp_fast.generate` in greedy mode), then prefilled -- on-distribution complement.
   - ``heldout``: greedy continuations of prompts from held-out files: per-head accuracy, and the
     training data of the CLP and gate (labels "heads 1..j all right").

3. **heads** -- ``z_j = h + SiLU(W_j h + b_j)`` (fixed by the decode kernels,
   :func:`clp_fast.reference.head_hidden`) regressed onto the backbone's hidden state at ``t + j``
   in *logit space*: ``mean_v (w_v . (z_j - h_{t+j}))^2 = d^T (W^T W / V) d`` costs one ``H x H``
   product per row instead of a ``V x H`` one, plus a cross-entropy on a sampled vocabulary
   subset (the batch's targets + random negatives) for the top-1 decision.
4. **clp / gate** -- fitted (BCE) on the held-out split with the exact decode-time features
   (:func:`clp_fast.reference.fused_heads` confidences of the bf16-rounded heads); the threshold is
   the smallest one whose per-depth precision reaches ``clp_precision`` on a validation part.
5. **output** -- ``MTPHeads.save_pretrained`` (bf16), ``training_card.json/.md``, ``clp_metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from clp_fast import reference
from clp_fast.heads import MTPHeads, lm_head_fingerprint

__all__ = ["TrainConfig", "train_heads", "evaluate_heads", "add_train_arguments", "run_train", "train_main"]

RUN_MARKER = "train_run.json"
CKPT_NAME = "checkpoint.pt"
PLAN_NAME = "plan.json"
KINDS = ("tf", "gen", "heldout")
# Options that shape the cached data; the others only shape training, so a resumed run may change them
# (the heads are then retrained from step 0 on the cached hidden states).
DATA_FIELDS = ("max_tokens", "window", "skip_first", "gen_prompts", "heldout_prompts", "gen_new_tokens",
               "prompt_chars", "prefill_batch", "gen_batch", "max_ram_gb", "seed", "dtype", "stdlib", "corpus")


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines the trained heads (a resumed run must match it exactly)."""

    k: int = 4
    max_tokens: int = 400_000  # teacher-forced tokens (the main data volume)
    window: int = 256  # tokens per teacher-forced window
    skip_first: int = 16  # positions at a window's start with too little context to train on
    gen_prompts: int = 96  # greedy continuations used as training data
    heldout_prompts: int = 96  # greedy continuations from held-out files (accuracy, CLP, gate)
    gen_new_tokens: int = 96
    prompt_chars: int = 600
    epochs: int = 2
    batch_size: int = 512
    lr: float = 3e-3  # 1e-3 -> held-out head-1 0.276, 3e-3 -> 0.289 (SmolLM2, CE only, 80K positions, 3 epochs)
    warmup_steps: int = 50
    ce_weight: float = 1.0
    # Logit-space regression onto h_{t+j} hurt here (SmolLM2, 80K positions, 3 epochs, held-out head-1 top-1:
    # 0.240 with reg 0.1 + CE over 512 negatives, 0.276 with CE alone over 2048): z_j - h = SiLU(.) >= -0.28
    # cannot follow h_{t+j} downwards, so the regression pulls against the top-1 objective. Kept as an option.
    reg_weight: float = 0.0
    ce_negatives: int = 2048
    inconsistent_weight: float = 0.5  # 0.0 -> head-1 0.214, 0.5 -> 0.240 (SmolLM2, same data): volume wins
    clp_precision: float = 0.99
    # Heads' output vocabulary: the LM head's first rows (reference.fused_heads); None = all of it. Targets
    # past it are unreachable and get weight 0.
    draft_vocab: int | None = None
    with_gate: bool = True
    prefill_batch: int = 16
    gen_batch: int = 16
    checkpoint_every: int = 200
    max_ram_gb: float = 4.0
    seed: int = 0
    dtype: str = "bf16"
    stdlib: bool = True
    corpus: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ utilities
def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[clp_fast.train] {msg}", file=sys.stderr, flush=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The low-level shard writer (a seam for tests that simulate a full disk)."""
    save_file(tensors, str(path))


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard atomically (temp file + rename); on a full disk, raise a clear ``OSError``.

    Shards written before stay intact, and ``resume=True`` recomputes only the missing ones.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _save_tensors(tensors, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing data shard {path}; the shards before it are "
                                        f"intact -- free some space and rerun with --resume (resume=True)") from err
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def _gen(*parts: int) -> torch.Generator:
    """A generator seeded from integers: every random draw is a pure function of (seed, where)."""
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------------ plan
def _cut(files, n, chars, seed, exclude) -> list[str]:
    """Up to ``n`` windows from ``files`` (fewer if the corpus is small; never an error here)."""
    from clp_fast.data import cut_prompts

    while n >= 1:
        try:
            return cut_prompts(files, n, chars, seed, exclude=exclude)
        except ValueError as err:
            if "distinct prompts" not in str(err):
                raise
            got = int(str(err).split()[1])
            if got == 0:
                return []
            n = got
    return []


def _make_plan(files: list[Path], tokenizer, cfg: TrainConfig, exclude: list[str], progress: bool) -> dict:
    """Deterministic token sequences for every data kind (``{"tf": [...], "gen": [...], "heldout": [...]}``)."""
    rng = random.Random(cfg.seed)
    shuffled = sorted(files)
    rng.shuffle(shuffled)
    if len(shuffled) >= 10:
        n_held = max(1, len(shuffled) // 10)
        held_files, train_files = sorted(shuffled[:n_held]), sorted(shuffled[n_held:])
    else:  # a tiny corpus: held-out prompts come from the same files (other windows, other seed)
        held_files, train_files = sorted(files), sorted(files)
    n_windows = math.ceil(cfg.max_tokens / cfg.window)
    _log(f"cutting {n_windows} windows of {cfg.window} tokens from {len(train_files)} files", progress)
    # ~4.5 characters per token for Python code with these BPE vocabularies; short windows are dropped.
    texts = _cut(train_files, int(n_windows * 1.25) + 4, int(cfg.window * 4.5), cfg.seed, exclude)
    tf = []
    for text in texts:
        ids = _encode(tokenizer, text)[: cfg.window]
        if len(ids) >= max(cfg.window // 2, cfg.skip_first + cfg.k + 2):
            tf.append(ids)
        if len(tf) == n_windows:
            break
    max_prompt = max(8, cfg.window - cfg.gen_new_tokens)

    def prompts(fs, n, seed):
        out = []
        for text in _cut(fs, n, cfg.prompt_chars, seed, exclude) if n else []:
            ids = _encode(tokenizer, text)[-max_prompt:]
            if ids:
                out.append(ids)
        return out

    return {"tf": tf, "gen": prompts(train_files, cfg.gen_prompts, cfg.seed + 1),
            "heldout": prompts(held_files, cfg.heldout_prompts, cfg.seed + 2),
            "files": {"train": len(train_files), "heldout": len(held_files)}}


# ------------------------------------------------------------------------------------------ data
def _lm_argmax(W: torch.Tensor, h: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``h [N, H]`` → ``[N]`` argmax of the LM-head logits, exactly as :func:`reference.fused_heads`."""
    out = []
    for i in range(0, h.shape[0], chunk):
        out.append(F.linear(h[i : i + chunk], W).float().argmax(dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _prefill(bb, seqs: list[list[int]], L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[n, L, H]`` and the backbone's argmax ``[n, L]`` of right-padded ``seqs``."""
    n = len(seqs)
    tokens = torch.zeros(n, L, dtype=torch.long)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    T = int(lens.max())
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    # transformers' own forward (same math as NativeBackbone's prefill): 1.2-1.4x faster here in bf16
    # (SmolLM2, 16 x 128 tokens: 591 vs 420 tok/s on the shared 2-core CPU).
    hidden = bb.inner(input_ids=tokens[:, :T].to(bb.device), attention_mask=mask.to(bb.device)).last_hidden_state
    hid = torch.zeros(n, L, hidden.shape[-1], dtype=hidden.dtype)
    hid[:, :T] = hidden.cpu()
    am = torch.zeros(n, L, dtype=torch.long)
    am[:, :T] = _lm_argmax(bb.lm_head_weight, hidden.reshape(n * T, -1)).view(n, T).cpu()
    return hid, am


def _greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
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


def _shard_seqs(cfg: TrainConfig, L: int, H: int, itemsize: int) -> int:
    """Sequences per shard: a quarter of ``max_ram_gb`` at most (one shard is resident while training), and
    at most 128 so that an interruption loses little prefill work."""
    per_seq = L * H * itemsize + L * 12
    return max(1, min(128, int(cfg.max_ram_gb * 2**30 / 4 / per_seq)))


def _build_data(model, bb, plan: dict, cfg: TrainConfig, cache: Path, progress: bool) -> dict:
    """Write every missing shard of every kind; returns per-kind stats."""
    H = bb.lm_head_weight.shape[1]
    itemsize = bb.lm_head_weight.element_size()
    out = {}
    for kind in KINDS:
        seqs = plan[kind]
        d = cache / kind
        d.mkdir(parents=True, exist_ok=True)
        L = cfg.window if kind == "tf" else max(len(p) for p in seqs) + cfg.gen_new_tokens if seqs else 1
        per = _shard_seqs(cfg, L, H, itemsize)
        n_shards = math.ceil(len(seqs) / per)
        t0, tokens_done = time.perf_counter(), 0
        bar = tqdm(total=len(seqs), desc=f"data:{kind}", unit="seq", disable=not progress, dynamic_ncols=True)
        for si in range(n_shards):
            path = d / f"shard-{si:05d}.safetensors"
            chunk = seqs[si * per : (si + 1) * per]
            if path.is_file():
                bar.update(len(chunk))
                continue
            full, starts, gstarts = [], [], []
            if kind == "tf":
                full, starts, gstarts = chunk, [cfg.skip_first] * len(chunk), [0] * len(chunk)
            else:
                for b in range(0, len(chunk), cfg.gen_batch):
                    part = chunk[b : b + cfg.gen_batch]
                    conts = _greedy(model, part, cfg.gen_new_tokens)
                    for p, c in zip(part, conts):
                        full.append(p + c)
                        starts.append(min(cfg.skip_first, len(p) - 1))
                        gstarts.append(len(p) - 1)  # from here on, every target is the backbone's own greedy
            hid_parts = []
            # longest first so that each prefill batch pads little
            order = sorted(range(len(full)), key=lambda i: -len(full[i]))
            for b in range(0, len(order), cfg.prefill_batch):
                idx = order[b : b + cfg.prefill_batch]
                h, a = _prefill(bb, [full[i] for i in idx], L)
                hid_parts.append((idx, h, a))
                tokens_done += sum(len(full[i]) for i in idx)
                bar.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - t0):.0f}")
            hid = torch.zeros(len(full), L, H, dtype=bb.dtype)
            am = torch.zeros(len(full), L, dtype=torch.int32)
            for idx, h, a in hid_parts:
                hid[idx], am[idx] = h, a.int()
            toks = torch.zeros(len(full), L, dtype=torch.int32)
            for i, s in enumerate(full):
                toks[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
            _write_shard({"hidden": hid.contiguous(), "argmax": am, "tokens": toks,
                          "length": torch.tensor([len(s) for s in full], dtype=torch.int32),
                          "start": torch.tensor(starts, dtype=torch.int32),
                          "gen_start": torch.tensor(gstarts, dtype=torch.int32)}, path)
            bar.update(len(chunk))
        bar.close()
        out[kind] = {"sequences": len(seqs), "shards": n_shards, "seconds_this_run": time.perf_counter() - t0}
    return out


def _shards(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).glob("shard-*.safetensors"))


def _load_meta(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in ("argmax", "tokens", "length", "start", "gen_start")}


def _targets(meta: dict, k: int, w_bad: float, from_gen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Training positions of one shard: flat indices ``[P]`` into ``[n * L]`` and weights ``[P, k]``.

    ``run[t]`` = how many consecutive text tokens after ``t`` equal the backbone's argmax; head ``j``'s
    target at ``t`` is the true greedy token iff ``run[t] >= j``.
    """
    tokens, am, length = meta["tokens"].long(), meta["argmax"].long(), meta["length"].long()
    n, L = tokens.shape
    start = meta["gen_start" if from_gen else "start"].long()
    agree = torch.zeros(n, L, dtype=torch.bool)
    agree[:, :-1] = tokens[:, 1:] == am[:, :-1]
    t = torch.arange(L)
    agree &= t[None] < (length[:, None] - 1)
    run = torch.zeros(n, L, k, dtype=torch.bool)  # run[:, t, j-1]: agree[t .. t+j-1] all hold
    cur = agree.clone()
    for j in range(k):
        run[:, :, j] = cur
        nxt = torch.zeros_like(cur)
        nxt[:, : L - j - 1] = agree[:, j + 1 :]
        cur = cur & nxt
    has_target = (t[None, :, None] + torch.arange(1, k + 1)[None, None]) < length[:, None, None]  # [n, L, k]
    weight = torch.where(run, 1.0, w_bad) * has_target
    use = (t[None] >= start[:, None]) & (t[None] < length[:, None] - 1) & (weight.sum(-1) > 0)
    flat = use.flatten().nonzero().flatten()
    return flat, weight.view(n * L, k)[flat]


# ---------------------------------------------------------------------------------------- heads
def _head_z(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h [B, H]`` fp32 → ``[B, k, H]`` head outputs (the training-time twin of reference.head_hidden)."""
    return h[:, None] + F.silu(torch.einsum("bh,kgh->bkg", h, W) + b)


def _schedule(shard_sizes: list[int], cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """Every step's (epoch, shard, batch-in-shard): a pure function of the seed, so a resumed run
    sees exactly the batches of an uninterrupted one."""
    steps = []
    for e in range(cfg.epochs):
        order = torch.randperm(len(shard_sizes), generator=_gen(cfg.seed, e)).tolist()
        for s in order:
            steps += [(e, s, b) for b in range(math.ceil(shard_sizes[s] / cfg.batch_size))]
    return steps


def _after_step(step: int) -> None:
    """Called after every optimiser step (a seam for tests that simulate an interruption)."""


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _train_loop(heads: MTPHeads, W: torch.Tensor, cfg: TrainConfig, cache: Path, fingerprint: str,
                progress: bool) -> dict:
    """Optimise ``heads.weight`` / ``heads.bias`` over the cached ``tf`` + ``gen`` shards (mutates ``heads``)."""
    shard_paths = _shards(cache, "tf") + _shards(cache, "gen")
    positions = []
    for p in shard_paths:
        flat, w = _targets(_load_meta(p), cfg.k, cfg.inconsistent_weight, from_gen=False)
        positions.append((flat, w))
    sizes = [len(f) for f, _ in positions]
    if sum(sizes) < cfg.batch_size:
        raise ValueError(f"the corpus gives {sum(sizes)} training positions, fewer than one batch of "
                         f"{cfg.batch_size}; pass more text with corpus=/--corpus or a smaller batch_size")
    steps = _schedule(sizes, cfg)
    V, Vd = W.shape[0], heads.draft_vocab
    Wf = W.float()
    gram = Wf.t() @ Wf / V  # [H, H]: mean over the vocab of squared logit errors = d^T gram d
    params = [heads.weight, heads.bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    ckpt = cache / CKPT_NAME
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt} holds heads for another backbone (LM-head fingerprint {state['fingerprint']}, "
                             f"this model has {fingerprint}); use --overwrite to start again")
        with torch.no_grad():
            heads.weight.copy_(state["weight"])
            heads.bias.copy_(state["bias"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
    cur_shard, data = -1, None
    perm_cache: dict[tuple[int, int], torch.Tensor] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(steps), initial=step, desc="heads", unit="step", disable=not progress, dynamic_ncols=True)
    ema = None
    while step < len(steps):
        e, s, b = steps[step]
        if s != cur_shard:
            data = load_file(str(shard_paths[s]))
            cur_shard = s
            perm_cache.clear()
        if (e, s) not in perm_cache:
            perm_cache[(e, s)] = torch.randperm(sizes[s], generator=_gen(cfg.seed, e, s))
        sel = perm_cache[(e, s)][b * cfg.batch_size : (b + 1) * cfg.batch_size]
        flat, wts = positions[s][0][sel], positions[s][1][sel]  # [B], [B, k]
        n, L, H = data["hidden"].shape
        hid = data["hidden"].view(n * L, H)
        tgt_idx = (flat[:, None] + torch.arange(1, cfg.k + 1)[None]).clamp(max=n * L - 1)  # [B, k]
        h_in = hid[flat].float()
        h_tgt = hid[tgt_idx].float()  # [B, k, H]
        ids_tgt = data["argmax"].view(-1)[tgt_idx].long()  # [B, k]
        wts = torch.where(ids_tgt < Vd, wts, 0.0)  # a target past the draft vocabulary is unreachable
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, len(steps), cfg)
        z = _head_z(h_in, heads.weight, heads.bias)  # [B, k, H]
        d = z - h_tgt
        wsum = wts.sum().clamp(min=1e-6)
        loss_reg = ((d @ gram) * d).sum(-1).mul(wts).sum() / wsum
        gen = _gen(cfg.seed, "neg", step)
        cand = torch.unique(torch.cat([ids_tgt[wts > 0], torch.randint(Vd, (cfg.ce_negatives,), generator=gen)]))
        logits = z @ Wf[cand].t()  # [B, k, C]
        pos = torch.searchsorted(cand, ids_tgt.clamp(max=V - 1))
        pos = pos.clamp(max=len(cand) - 1)
        ce = F.cross_entropy(logits.reshape(-1, len(cand)), pos.flatten(), reduction="none").view_as(wts)
        loss_ce = (ce * wts).sum() / wsum
        loss = cfg.reg_weight * loss_reg + cfg.ce_weight * loss_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step == 1 or step % 25 == 0 or step == len(steps):
            history.append([step, lv, float(loss_reg.detach()), float(loss_ce.detach())])
            bar.set_postfix(loss=f"{ema:.3f}", reg=f"{history[-1][2]:.3f}", ce=f"{history[-1][3]:.3f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < len(steps):
            _atomic_torch_save({"weight": heads.weight.detach().clone(), "bias": heads.bias.detach().clone(),
                                "opt": opt.state_dict(), "step": step, "history": history,
                                "fingerprint": fingerprint}, ckpt)
        _after_step(step)
    bar.close()
    return {"steps": len(steps), "positions_per_epoch": sum(sizes), "loss_history": history,
            "seconds_this_run": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ clp, gate
@torch.no_grad()
def _heldout_features(heads: MTPHeads, W: torch.Tensor, cache: Path, k: int, progress: bool) -> dict:
    """Decode-time features and labels on the held-out greedy continuations.

    Returns hidden ``[N, H]`` (backbone dtype), conf ``[N, k]``, correct ``[N, k]`` bool, valid
    ``[N, k]`` bool (head j has a target), group ``[N]`` (sequence id, for splitting).
    """
    hs, confs, corr, valid, groups = [], [], [], [], []
    gid = 0
    paths = _shards(cache, "heldout")
    for p in tqdm(paths, desc="held-out features", disable=not progress, dynamic_ncols=True):
        data = load_file(str(p))
        tokens, length, gstart = data["tokens"].long(), data["length"].long(), data["gen_start"].long()
        for i in range(tokens.shape[0]):
            t = torch.arange(int(gstart[i]), int(length[i]) - 1)
            if len(t) == 0:
                continue
            h = data["hidden"][i, t]
            ids, conf, _ = reference.fused_heads(h, heads.weight, heads.bias, W, draft_vocab=heads.draft_vocab)
            tj = t[:, None] + 1 + torch.arange(1, k + 1)[None]  # [T, k] index of head j's target token
            ok = tj < length[i]
            tgt = tokens[i].gather(0, tj.clamp(max=tokens.shape[1] - 1).flatten()).view_as(tj)
            hs.append(h)
            confs.append(conf[:, 1:])
            corr.append((ids[:, 1:] == tgt) & ok)
            valid.append(ok)
            groups.append(torch.full((len(t),), gid))
            gid += 1
    if not hs:
        raise ValueError("no held-out positions: the held-out prompts produced no continuation")
    return {"hidden": torch.cat(hs), "conf": torch.cat(confs), "correct": torch.cat(corr),
            "valid": torch.cat(valid), "group": torch.cat(groups)}


def _fit_bce(module, feats_fn, y: torch.Tensor, seed: int, epochs: int = 40, lr: float = 3e-3,
             wd: float = 1e-4) -> None:
    """Full-data Adam on a BCE over all k logits (small data: a few thousand rows)."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    N = y.shape[0]
    bs = 1024
    for e in range(epochs):
        perm = torch.randperm(N, generator=_gen(seed, "bce", e))
        for i in range(0, N, bs):
            idx = perm[i : i + bs]
            loss = F.binary_cross_entropy_with_logits(feats_fn(idx), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _accept_len(prob: torch.Tensor, thr: float) -> torch.Tensor:
    return (prob >= thr).long().cumprod(dim=-1).sum(dim=-1)


def _pr_table(prob: torch.Tensor, y: torch.Tensor, thr: float) -> list[dict]:
    """Per-depth precision (accepted ≥ j → heads 1..j right) and recall (right → accepted) at ``thr``."""
    acc = _accept_len(prob, thr)
    rows = []
    for j in range(1, y.shape[1] + 1):
        took = acc >= j
        right = y[:, j - 1] > 0.5
        rows.append({"depth": j, "accepted": int(took.sum()), "positives": int(right.sum()),
                     "precision": float((took & right).sum() / took.sum()) if took.any() else None,
                     "recall": float((took & right).sum() / right.sum()) if right.any() else None})
    return rows


def _pick_threshold(prob: torch.Tensor, y: torch.Tensor, target: float, min_support: int = 20) -> float:
    """The smallest threshold at which every depth's precision reaches ``target`` (a depth that accepts
    nothing passes; so does one with fewer than ``min_support`` acceptances and at most one error, since
    a handful of rows cannot show 0.99 either way)."""
    grid = sorted(set([i / 100 for i in range(50, 100)] + [1 - 10 ** (-x / 4) for x in range(8, 25)]))
    for thr in grid:
        rows = _pr_table(prob, y, thr)
        if all(r["accepted"] == 0 or r["precision"] >= target
               or (r["accepted"] < min_support and r["accepted"] * (1 - r["precision"]) <= 1.0 + 1e-6)
               for r in rows):
            return float(thr)
    return 1.0


def _train_policies(heads: MTPHeads, feats: dict, cfg: TrainConfig, progress: bool) -> dict:
    """Fit the CLP (and gate) on 70 % of the held-out sequences, pick thresholds on the other 30 %."""
    k = cfg.k
    keep = feats["valid"].all(-1)  # positions whose k labels all exist
    h, conf = feats["hidden"][keep].float(), feats["conf"][keep].float()
    y = feats["correct"][keep].long().cumprod(-1).float()  # [N, k]: heads 1..j all right
    groups = feats["group"][keep]
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    val_groups = torch.randperm(n_groups, generator=_gen(cfg.seed, "split"))[: max(1, n_groups * 3 // 10)]
    is_val = torch.isin(groups, val_groups)
    if n_groups < 2:
        is_val = torch.ones_like(groups, dtype=torch.bool)
    tr = ~is_val if (~is_val).any() else is_val
    # Standardise for the fit, then fold mean/std into the linear layer (the CLP sees raw features).
    X = torch.cat([h, conf], dim=-1)
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp(min=1e-3)
    lin = torch.nn.Linear(X.shape[1], k)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    Xs = (X - mu) / sd
    Xtr, ytr = Xs[tr], y[tr]
    _log(f"CLP: {int(tr.sum())} fit rows, {int(is_val.sum())} validation rows", progress)
    with torch.enable_grad():
        _fit_bce(lin, lambda idx: lin(Xtr[idx]), ytr, cfg.seed)
    with torch.no_grad():
        heads.clp.linear.weight.copy_(lin.weight / sd)
        heads.clp.linear.bias.copy_(lin.bias - (lin.weight / sd) @ mu)
        p_clp = torch.sigmoid(heads.clp.logits(h[is_val], conf[is_val]))
    thr = _pick_threshold(p_clp, y[is_val], cfg.clp_precision)
    out = {"rows_fit": int(tr.sum()), "rows_val": int(is_val.sum()),
           "base_rates": y[is_val].mean(0).tolist(),
           "clp": {"threshold": thr, "target_precision": cfg.clp_precision,
                   "per_depth": _pr_table(p_clp, y[is_val], thr), "at_0.5": _pr_table(p_clp, y[is_val], 0.5)}}
    heads.thresholds["clp"] = thr
    # Lossless: the accepted count is the longest verified prefix of the drafted guesses, so drafting more
    # never accepts fewer; verifying k+1 tokens costs about what 1 does on this CPU (FINDINGS) -> draft all.
    heads.thresholds["lossless"] = 0.0
    if heads.gate is not None:
        hs_tr = (h[tr] - mu[:-k]) / sd[:-k]
        gate = heads.gate
        with torch.enable_grad():
            _fit_bce(gate, lambda idx: gate.logits(hs_tr[idx]), ytr, cfg.seed + 1, epochs=20, lr=1e-3)
        with torch.no_grad():  # fold the input standardisation into the first layer
            lin0 = gate.net[0]
            lin0.bias.copy_(lin0.bias - (lin0.weight / sd[:-k]) @ mu[:-k])
            lin0.weight.copy_(lin0.weight / sd[:-k])
            p_gate = torch.sigmoid(gate.logits(h[is_val]))
        gthr = _pick_threshold(p_gate, y[is_val], cfg.clp_precision)
        heads.thresholds["gate"] = gthr
        out["gate"] = {"threshold": gthr, "target_precision": cfg.clp_precision,
                       "per_depth": _pr_table(p_gate, y[is_val], gthr)}
    return out


def _head_accuracy(feats: dict) -> list[float]:
    c, v = feats["correct"], feats["valid"]
    return [float(c[:, j][v[:, j]].float().mean()) if v[:, j].any() else 0.0 for j in range(c.shape[1])]


def _chain(feats: dict) -> list[float]:
    keep = feats["valid"].all(-1)
    return feats["correct"][keep].long().cumprod(-1).float().mean(0).tolist()


# -------------------------------------------------------------------------------------- outputs
def _card_md(card: dict) -> str:
    d, r, c = card["data"], card["results"], card["config"]
    budget = f", budget {card['budget']}" if card.get("budget") else ""
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"# MTP heads for {card['backbone']}", "",
             f"k = {card['config']['k']}, trained by `clp_fast.train` on {card['date']} "
             f"({card['wall_time_s'] / 60:.1f} min wall, 2-core CPU{budget}).",
             "", "## Data", "",
             f"- corpus: {d['corpus']} ({d['files']['train']} training files, {d['files']['heldout']} held-out files); "
             "HumanEval function names excluded.",
             f"- teacher-forced windows: {d['tf_sequences']} × ≤{card['config']['window']} tokens "
             f"({d['tf_tokens']} tokens); greedy-consistent target fraction per head: "
             + " / ".join(f"{x:.2f}" for x in d["consistent_fraction"]),
             f"- greedy continuations (training): {d['gen_sequences']} prompts × {c['gen_new_tokens']} tokens",
             f"- held-out greedy continuations: {d['heldout_sequences']} prompts ({r['heldout_positions']} positions)",
             f"- training positions per epoch: {card['training']['positions_per_epoch']}; "
             f"steps: {card['training']['steps']} (batch {c['batch_size']}, {c['epochs']} epochs)",
             "", "## Held-out results", "",
             "| head | top-1 | P(heads 1..j all right) |", "|---|---|---|"]
    for j, (a, c) in enumerate(zip(r["head_top1"], r["chain"]), 1):
        lines.append(f"| {j} | {a:.3f} | {c:.3f} |")
    clp = r["policies"]["clp"]
    lines += ["", f"CLP threshold {clp['threshold']:.4f} (target precision {clp['target_precision']}):", "",
              "| depth | accepted | precision | recall |", "|---|---|---|---|"]
    for row in clp["per_depth"]:
        pr = "-" if row["precision"] is None else f"{row['precision']:.3f}"
        rc = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        lines.append(f"| {row['depth']} | {row['accepted']} | {pr} | {rc} |")
    if "gate" in r["policies"]:
        g = r["policies"]["gate"]
        lines += ["", f"Gate baseline threshold {g['threshold']:.4f}: precision/recall per depth "
                  + ", ".join(f"{fmt(x['precision'])}/{fmt(x['recall'])}" for x in g["per_depth"])]
    lines += ["", "## Stage wall times (s)", ""] + [f"- {k}: {v:.0f}" for k, v in card["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def _default_cache(out_dir: Path) -> Path:
    from clp_fast.hub import clp_home

    tag = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:10]
    return clp_home() / "train_cache" / f"{out_dir.name}-{tag}"


def _exclude_list(progress: bool) -> list[str]:
    from clp_fast.data import humaneval_signatures

    try:
        return humaneval_signatures(download=False)
    except (FileNotFoundError, ValueError):
        pass
    try:
        return humaneval_signatures()
    except Exception as err:  # noqa: BLE001 -- offline machine: the stdlib holds no HumanEval code anyway
        _log(f"HumanEval names unavailable ({err}); cutting prompts without the exclusion list", progress)
        return []


# ------------------------------------------------------------------------------------------ API
def train_heads(
    model,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    k: int = 4,
    corpus: list[str | os.PathLike] | None = None,
    max_tokens: int = TrainConfig.max_tokens,
    epochs: int = TrainConfig.epochs,
    resume: bool = False,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    exclude: list[str] | None = None,
    keep_cache: bool = True,
    save_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    budget: str | None = None,
    backbone: str | None = None,
    **config,
) -> MTPHeads:
    """Train k MTP heads + CLP (+ gate) for a frozen causal LM and write them to ``out_dir``.

    Args:
        model: a loaded transformers causal LM (Qwen2 / Llama), or a name / folder for
            :func:`clp_fast.hub.load_model`.
        out_dir: output folder (``heads.safetensors``, ``config.json``, ``training_card.json/.md``,
            ``clp_metrics.json``). Must not exist unless ``resume`` or ``overwrite``.
        tokenizer: anything with ``encode(text, add_special_tokens=False) -> list[int]`` (None → the
            model's own, found by :func:`clp_fast.hub.load_model`).
        k: number of heads.
        corpus: extra files / folders of source code, added to the stdlib (``stdlib=False`` drops it).
        max_tokens: teacher-forced tokens (the main data volume).
        epochs: passes over the cached data.
        resume: continue an interrupted run (finished shards and the latest checkpoint are reused;
            the configuration and backbone must match).
        overwrite: delete ``out_dir`` and the run's cache first.
        cache_dir: where hidden-state shards and checkpoints go (default
            ``<clp_home()>/train_cache/<out name>-<hash>``).
        exclude: strings that keep a window out of the data (default: HumanEval function names).
        keep_cache: keep the shards after success (they make a re-run of later stages cheap).
        save_dtype: dtype of the saved heads (bf16 for shipped assets).
        budget: a note on the wall-time budget, recorded in the training card.
        backbone: the backbone's name recorded in the heads' config (None → the model's ``name_or_path``).
        **config: any other :class:`TrainConfig` field (``batch_size``, ``lr``, ``seed`` ...).

    Returns:
        The trained :class:`MTPHeads` (fp32, as saved then loaded, so identical to the files).

    Raises:
        FileExistsError: ``out_dir`` exists and neither ``resume`` nor ``overwrite`` is set.
        ValueError: empty / unreadable corpus (names the path), too little data for one batch,
            a resumed run for another backbone or configuration.
        OSError: disk full while writing a shard (earlier shards stay; resume works).
    """
    t_start = time.perf_counter()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = set(config) - fields
    if bad:
        raise TypeError(f"unknown training option(s) {sorted(bad)}; known: {sorted(fields)}")
    cfg = TrainConfig(k=k, max_tokens=max_tokens, epochs=epochs,
                      corpus=tuple(str(c) for c in (corpus or [])), **config)
    for name in ("k", "max_tokens", "epochs", "batch_size", "window", "checkpoint_every", "prefill_batch", "gen_batch"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if not 0.0 < cfg.clp_precision < 1.0:
        raise ValueError(f"clp_precision={cfg.clp_precision!r} must be in (0, 1)")
    if cfg.max_ram_gb <= 0:
        raise ValueError(f"max_ram_gb={cfg.max_ram_gb!r} must be positive")

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    marker = out_dir / RUN_MARKER
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"output folder {out_dir} already exists; pass --resume (resume=True) to continue an "
                              f"interrupted run or --overwrite (overwrite=True) to replace it")
    if cache_dir is None and resume and marker.is_file():
        cache_dir = json.loads(marker.read_text()).get("cache_dir")
    cache = Path(cache_dir) if cache_dir else _default_cache(out_dir)
    if overwrite:
        shutil.rmtree(out_dir, ignore_errors=True)
    if not resume:  # a fresh run never reuses a stale cache (only our own files are removed)
        for name in ("run.json", PLAN_NAME, CKPT_NAME):
            (cache / name).unlink(missing_ok=True)
        for kind in KINDS:
            shutil.rmtree(cache / kind, ignore_errors=True)

    # corpus errors first: they need no model
    from clp_fast.data import iter_corpus_files

    files = iter_corpus_files(list(cfg.corpus), stdlib=cfg.stdlib)
    for f in files:
        if f.stat().st_size == 0 and len(files) == 1:
            raise ValueError(f"corpus file {str(f)!r} is empty")

    from clp_fast.hub import load_model

    if not hasattr(model, "get_output_embeddings"):
        model, tok = load_model(model, dtype=cfg.dtype)
        tokenizer = tokenizer or tok
    elif tokenizer is None:
        _, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError("no tokenizer found for this model; pass tokenizer=...")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from clp_fast.model import NativeBackbone

    bb = NativeBackbone(model)
    W = bb.lm_head_weight.detach()
    fingerprint = lm_head_fingerprint(W)
    name = backbone or str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    cfg_dict = {**dataclasses.asdict(cfg), "corpus": list(cfg.corpus)}
    run_id = {"config": cfg_dict, "fingerprint": fingerprint, "vocab": W.shape[0], "hidden": W.shape[1]}

    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_path = cache / "run.json"
    if run_path.is_file():
        prev = json.loads(run_path.read_text())
        if prev["fingerprint"] != fingerprint or prev["vocab"] != W.shape[0] or prev["hidden"] != W.shape[1]:
            raise ValueError(f"cannot resume: the interrupted run in {cache} trained heads for another backbone "
                             f"(LM-head fingerprint {prev['fingerprint']}, [{prev['vocab']}, {prev['hidden']}]); this "
                             f"model has {fingerprint}, [{W.shape[0]}, {W.shape[1]}]; use --overwrite")
        diff = sorted(key for key in set(prev["config"]) | set(cfg_dict)
                      if prev["config"].get(key) != cfg_dict.get(key))
        if set(diff) & set(DATA_FIELDS):
            raise ValueError(f"cannot resume: the data options differ from the interrupted run's in "
                             f"{sorted(set(diff) & set(DATA_FIELDS))}; use --overwrite")
        if diff:
            _log(f"training options changed ({diff}): reusing the cached data, training the heads from step 0",
                 progress)
            (cache / CKPT_NAME).unlink(missing_ok=True)
    _atomic_write_text(run_path, json.dumps(run_id, indent=1))
    _atomic_write_text(marker, json.dumps({"cache_dir": str(cache)}))

    torch.manual_seed(cfg.seed)
    stage = {}
    t = time.perf_counter()
    plan_path = cache / PLAN_NAME
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        plan = _make_plan(files, tokenizer, cfg, exclude if exclude is not None else _exclude_list(progress), progress)
        _atomic_write_text(plan_path, json.dumps(plan))
    n_pos = sum(max(0, len(s) - 1 - cfg.skip_first) for s in plan["tf"])
    n_pos += sum(len(s) for s in plan["gen"]) + (cfg.gen_new_tokens * len(plan["gen"]))
    if not plan["tf"] and not plan["gen"] or n_pos < cfg.batch_size:
        src = ", ".join(cfg.corpus) + (" + stdlib" if cfg.stdlib else "") if cfg.corpus else "the stdlib"
        raise ValueError(f"corpus {src} is too small: {len(plan['tf'])} windows, ~{n_pos} positions, fewer than "
                         f"one batch of {cfg.batch_size}")
    if not plan["heldout"]:
        raise ValueError("the corpus gives no held-out prompts; pass more text with corpus=/--corpus")
    stage["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.inference_mode():
        data_stats = _build_data(model, bb, plan, cfg, cache, progress)
    stage["data (this run)"] = time.perf_counter() - t

    heads = MTPHeads.for_model(model, cfg.k, backbone=name, with_gate=cfg.with_gate, draft_vocab=cfg.draft_vocab)
    heads.train()
    t = time.perf_counter()
    train_stats = _train_loop(heads, W, cfg, cache, fingerprint, progress)
    stage["heads (this run)"] = time.perf_counter() - t

    # Round the heads to the shipped dtype before fitting the CLP, so its features are the decode-time ones.
    t = time.perf_counter()
    with torch.no_grad():
        heads.weight.copy_(heads.weight.to(save_dtype).float())
        heads.bias.copy_(heads.bias.to(save_dtype).float())
    feats = _heldout_features(heads, W, cache, cfg.k, progress)
    policies = _train_policies(heads, feats, cfg, progress)
    stage["clp+gate"] = time.perf_counter() - t

    consistent = [0.0] * cfg.k
    for p in _shards(cache, "tf"):
        _, w = _targets(_load_meta(p), cfg.k, 0.0, from_gen=False)
        consistent = [c + float(w[:, j].sum()) for j, c in enumerate(consistent)]
    tf_positions = sum(len(_targets(_load_meta(p), cfg.k, 1.0, False)[0]) for p in _shards(cache, "tf"))
    card = {
        "backbone": name, "lm_head_fingerprint": fingerprint, "date": time.strftime("%Y-%m-%d"),
        "budget": budget, "wall_time_s": time.perf_counter() - t_start,
        "config": cfg_dict,
        "data": {"corpus": (["stdlib"] if cfg.stdlib else []) + list(cfg.corpus), "files": plan["files"],
                 "tf_sequences": len(plan["tf"]), "tf_tokens": sum(len(s) for s in plan["tf"]),
                 "tf_positions": tf_positions,
                 "consistent_fraction": [c / max(1, tf_positions) for c in consistent],
                 "gen_sequences": len(plan["gen"]), "heldout_sequences": len(plan["heldout"]),
                 "shards": data_stats},
        "training": {k_: v for k_, v in train_stats.items()},
        "results": {"heldout_positions": int(feats["hidden"].shape[0]), "head_top1": _head_accuracy(feats),
                    "chain": _chain(feats), "policies": policies},
        "stage_seconds": stage,
        "thresholds": heads.thresholds,
    }
    heads.extra_config = {"trained_by": "clp_fast.train", "head_top1_heldout": card["results"]["head_top1"]}
    heads.save_pretrained(out_dir, dtype=save_dtype)
    _atomic_write_text(out_dir / "training_card.json", json.dumps(card, indent=1) + "\n")
    _atomic_write_text(out_dir / "training_card.md", _card_md(card))
    _atomic_write_text(out_dir / "clp_metrics.json", json.dumps(policies, indent=1) + "\n")
    marker.unlink(missing_ok=True)
    (cache / CKPT_NAME).unlink(missing_ok=True)
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    _log(f"wrote {out_dir} in {card['wall_time_s'] / 60:.1f} min; held-out head top-1 "
         + " / ".join(f"{a:.3f}" for a in card["results"]["head_top1"]), progress)
    return MTPHeads.from_pretrained(out_dir, model=model)


# ------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate_heads(model, heads: MTPHeads, prompts, *, tokenizer=None, max_new_tokens: int = 128,
                   clp_threshold: float | None = None, clp_sweep: tuple[float, ...] = (),
                   progress: bool = False) -> dict:
    """HumanEval-style evaluation, batch 1: per-head top-1 on the backbone's own greedy continuation,
    lossless τ and clp τ, and the fraction of sequences equal to greedy.

    Args:
        model: the loaded backbone.
        heads: trained heads for it.
        prompts: strings (needs ``tokenizer``), ``{"prompt": str}`` dicts, or lists of token ids.
        max_new_tokens: tokens generated per prompt.
        clp_threshold: the threshold of ``mode="clp"`` (None → the heads' saved one).
        clp_sweep: further clp thresholds to measure (τ and equality with greedy for each).

    Returns:
        ``{"n", "head_top1" [k], "chain" [k] (P(heads 1..j all right)), "lossless_tau",
        "lossless_equal_greedy", "clp_tau", "clp_equal_greedy", "clp_threshold", "clp_sweep" [{threshold,
        tau, equal_greedy, tok_s}], "greedy_tok_s", "lossless_tok_s", "clp_tok_s", "per_prompt"}``.
    """
    import clp_fast
    from clp_fast.model import NativeBackbone

    bb = NativeBackbone(model)
    dev = bb.device
    k = heads.k
    thr0 = clp_threshold if clp_threshold is not None else heads.thresholds.get("clp", 0.9)
    thresholds = [thr0] + [t for t in clp_sweep if t != thr0]
    rows = []
    correct, count, chain_hits, chain_n = torch.zeros(k), torch.zeros(k), torch.zeros(k), 0
    wall = {"greedy": 0.0, "lossless": 0.0, **{f"clp@{t}": 0.0 for t in thresholds}}
    ntok = dict.fromkeys(wall, 0)
    for pr in tqdm(prompts, desc="evaluate", disable=not progress, dynamic_ncols=True):
        if isinstance(pr, dict):
            pr = pr["prompt"]
        ids = _encode(tokenizer, pr) if isinstance(pr, str) else list(pr)
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        res = {}
        for key in wall:
            mode, thr = (key.split("@")[0], float(key.split("@")[1])) if "@" in key else (key, None)
            out, st = clp_fast.generate(model, x, heads if mode != "greedy" else None, max_new_tokens=max_new_tokens,
                                        mode=mode, return_stats=True, clp_threshold=thr)
            res[key] = (out[0, len(ids) : len(ids) + st.new_tokens[0]].tolist(), st)
            wall[key] += st.wall_time_s
            ntok[key] += st.new_tokens[0]
        greedy = res["greedy"][0]
        seq = ids + greedy
        hid, _ = _prefill(bb, [seq], len(seq))
        t = torch.arange(len(ids) - 1, len(seq) - 1)
        hids, _, _ = reference.fused_heads(hid[0, t].to(dev), heads.weight, heads.bias, bb.lm_head_weight,
                                           draft_vocab=heads.draft_vocab)
        tj = t[:, None] + 1 + torch.arange(1, k + 1)[None]  # index of head j's target token
        ok = tj < len(seq)
        tgt = torch.tensor(seq)[tj.clamp(max=len(seq) - 1)]
        hit = (hids[:, 1:].cpu() == tgt) & ok
        correct += hit.sum(0).float()
        count += ok.sum(0).float()
        full = ok.all(-1)
        chain_hits += hit[full].long().cumprod(-1).sum(0).float()
        chain_n += int(full.sum())
        rows.append({"prompt_tokens": len(ids), "new_tokens": len(greedy),
                     **{f"{key}_tau": res[key][1].tau for key in wall if key != "greedy"},
                     **{f"{key}_equal": res[key][0] == greedy for key in wall if key != "greedy"}})
    n = max(1, len(rows))
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    sweep = [{"threshold": t, "tau": mean(f"clp@{t}_tau"), "equal_greedy": mean(f"clp@{t}_equal"),
              "tok_s": ntok[f"clp@{t}"] / wall[f"clp@{t}"] if wall[f"clp@{t}"] else 0.0} for t in thresholds]
    return {
        "n": len(rows),
        "head_top1": (correct / count.clamp(min=1)).tolist(),
        "chain": (chain_hits / max(1, chain_n)).tolist(),
        "lossless_tau": mean("lossless_tau"),
        "lossless_equal_greedy": mean("lossless_equal"),
        "clp_threshold": thr0,
        "clp_tau": sweep[0]["tau"],
        "clp_equal_greedy": sweep[0]["equal_greedy"],
        "clp_sweep": sweep,
        "greedy_tok_s": ntok["greedy"] / wall["greedy"] if wall["greedy"] else 0.0,
        "lossless_tok_s": ntok["lossless"] / wall["lossless"] if wall["lossless"] else 0.0,
        "clp_tok_s": sweep[0]["tok_s"],
        "per_prompt": rows,
    }


# ------------------------------------------------------------------------------------------- CLI
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
    a("--gen-prompts", type=int, default=d.gen_prompts, help="greedy continuations for training")
    a("--heldout-prompts", type=int, default=d.heldout_prompts, help="greedy continuations for CLP/accuracy")
    a("--gen-new-tokens", type=int, default=d.gen_new_tokens)
    a("--window", type=int, default=d.window, help="tokens per teacher-forced window (default %(default)s)")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=d.lr)
    a("--inconsistent-weight", type=float, default=d.inconsistent_weight,
      help="weight of teacher-forced targets whose prefix is not greedy-consistent (default %(default)s)")
    a("--ce-negatives", type=int, default=d.ce_negatives, help="random negatives of the sampled cross-entropy")
    a("--reg-weight", type=float, default=d.reg_weight, help="weight of the logit-space regression loss")
    a("--clp-precision", type=float, default=d.clp_precision, help="target precision of the CLP threshold")
    a("--draft-vocab", type=int, default=d.draft_vocab,
      help="heads' output vocabulary: the LM head's first N rows (default: all; 32768 for Qwen2.5)")
    a("--no-gate", action="store_true", help="do not train the gate baseline")
    a("--dtype", default=d.dtype, choices=["bf16", "fp32"], help="backbone dtype (default %(default)s)")
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--max-ram-gb", type=float, default=d.max_ram_gb, help="bound on the cached data held in RAM")
    a("--seed", type=int, default=d.seed)
    a("--cache-dir", default=None, help="where hidden-state shards and checkpoints go")
    a("--resume", action="store_true", help="continue an interrupted run in --out")
    a("--overwrite", action="store_true", help="replace --out (and its cache)")
    a("--budget", default=None, help="wall-time budget note recorded in the training card")
    a("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``clp-fast train`` from parsed arguments; returns the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from clp_fast.hub import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    train_heads(model, args.out, tokenizer=tokenizer, k=args.k, corpus=args.corpus, max_tokens=args.max_tokens,
                epochs=args.epochs, resume=args.resume, overwrite=args.overwrite, cache_dir=args.cache_dir,
                budget=args.budget, backbone=args.model, stdlib=not args.no_stdlib, gen_prompts=args.gen_prompts,
                heldout_prompts=args.heldout_prompts, gen_new_tokens=args.gen_new_tokens, batch_size=args.batch_size,
                window=args.window, ce_negatives=args.ce_negatives, reg_weight=args.reg_weight,
                lr=args.lr, inconsistent_weight=args.inconsistent_weight, clp_precision=args.clp_precision,
                with_gate=not args.no_gate, draft_vocab=args.draft_vocab, dtype=args.dtype,
                checkpoint_every=args.checkpoint_every,
                max_ram_gb=args.max_ram_gb, seed=args.seed)
    return 0


def train_main(args: argparse.Namespace) -> int:
    """Alias of :func:`run_train` (the CLI may call either)."""
    return run_train(args)


if __name__ == "__main__":
    sys.exit(run_train(add_train_arguments(argparse.ArgumentParser(prog="clp-fast train")).parse_args()))
