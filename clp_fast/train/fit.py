"""Fitting the heads on the cached shards: head designs, the step schedule, checkpoints.

Head ``j`` at position ``t`` is trained toward the backbone's next-token distribution at ``t + j``
(its argmax is the greedy token ``j`` places after the backbone's own next token). Designs:

- ``medusa1`` -- ``z_j = h + SiLU(W_j h + b_j)``: the design the decode kernels run
  (:func:`clp_fast.reference.head_hidden`);
- ``medusa1+token`` -- also reads the embedding ``e`` of the backbone's pending token (its argmax at
  ``t``, which the same step's backbone row decides): ``z_j = h + SiLU(W_j h + U_j e + b_j)``;
- ``medusa2`` -- two residual blocks per head.

The last two are measured by the ablation (``bench/ablate_heads.py``); only ``medusa1`` is shipped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from clp_fast.faults import kill_point
from clp_fast.heads import MTPHeads
from clp_fast.train import losses
from clp_fast.train.config import CKPT_NAME, TRAIN_KINDS, TrainConfig, atomic_torch_save, seeded
from clp_fast.train.shards import load_meta, load_shard, shard_paths, targets


class TrainableHeads(nn.Module):
    """The parameters being fitted: ``heads.weight`` / ``heads.bias`` plus a design's extra ones (zero-init,
    so every design starts as "each head repeats h")."""

    def __init__(self, heads: MTPHeads, design: str, embed: torch.Tensor | None = None):
        super().__init__()
        k, H = heads.k, heads.hidden_size
        self.heads, self.design = heads, design
        if design == "medusa1+token":
            if embed is None:
                raise ValueError("head_design='medusa1+token' needs the backbone's input embeddings")
            self.embed = embed  # [V, H], frozen (not a parameter)
            self.tok_weight = nn.Parameter(torch.zeros(k, H, H))
        elif design == "medusa2":
            self.weight2 = nn.Parameter(torch.zeros(k, H, H))
            self.bias2 = nn.Parameter(torch.zeros(k, H))

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None = None) -> torch.Tensor:
        """``h [B, H]`` fp32 (and the pending token ids ``[B]``) → head outputs ``[B, k, H]``."""
        pre = torch.einsum("bh,kgh->bkg", h, self.heads.weight) + self.heads.bias
        if self.design == "medusa1+token":
            e = self.embed[pending].float()
            pre = pre + torch.einsum("bh,kgh->bkg", e, self.tok_weight)
        z = h[:, None] + F.silu(pre)
        if self.design == "medusa2":
            z = z + F.silu(torch.einsum("bkh,kgh->bkg", z, self.weight2) + self.bias2)
        return z


def schedule(shard_sizes: list[int], cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """Every step's (epoch, shard, batch-in-shard): a pure function of the seed, so a resumed run
    sees exactly the batches of an uninterrupted one."""
    steps = []
    for e in range(cfg.epochs):
        order = torch.randperm(len(shard_sizes), generator=seeded(cfg.seed, e)).tolist()
        for s in order:
            steps += [(e, s, b) for b in range(math.ceil(shard_sizes[s] / cfg.batch_size))]
    return steps


def after_step(step: int) -> None:
    """Called after every optimiser step (a seam for tests that simulate an interruption)."""


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def training_positions(cache: Path, cfg: TrainConfig, max_positions: int | None = None):
    """``(paths, [(flat, weights)])`` of the training shards, cut to the first ``max_positions``."""
    paths, positions, total = [], [], 0
    for p in [q for kind in TRAIN_KINDS for q in shard_paths(cache, kind)]:
        flat, w = targets(load_meta(p), cfg.k, cfg.inconsistent_weight, from_gen=False)
        if max_positions is not None:
            flat, w = flat[: max_positions - total], w[: max_positions - total]
        if len(flat):
            paths.append(p)
            positions.append((flat, w))
            total += len(flat)
    return paths, positions


def step_loss(net: TrainableHeads, data: dict, flat: torch.Tensor, wts: torch.Tensor, Wf: torch.Tensor,
              gram: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """The weighted loss of one batch of positions ``flat`` of one shard; also ``[reg, ce, kl]`` values."""
    n, L, H = data["hidden"].shape
    k, Vd = net.heads.k, net.heads.draft_vocab
    hid = data["hidden"].view(n * L, H)
    tgt = (flat[:, None] + torch.arange(1, k + 1)[None]).clamp(max=n * L - 1)  # [B, k]
    ids = data["argmax"].view(-1)[tgt].long()
    wts = torch.where(ids < Vd, wts, 0.0)  # a target past the draft vocabulary is unreachable
    pending = data["argmax"].view(-1)[flat].long()
    z = net(hid[flat].float(), pending)  # [B, k, H]
    wsum = wts.sum().clamp(min=1e-6)
    zero = z.new_zeros(())
    reg = (losses.logit_mse(z - hid[tgt].float(), gram) * wts).sum() / wsum if cfg.reg_weight else zero
    ce = kl = zero
    if cfg.ce_weight or cfg.kl_weight:
        soft_ids = soft_lp = None
        if cfg.kl_weight:
            m = cfg.kl_topk
            soft_ids = data["top_ids"].view(n * L, -1)[tgt][..., :m].long()
            soft_lp = data["top_logp"].view(n * L, -1)[tgt][..., :m].float()
        cand = losses.candidates(ids[wts > 0], soft_ids, Vd, cfg.ce_negatives, gen)
        logits = z @ Wf[cand].t()  # [B, k, C]
        if cfg.ce_weight:
            ce = (losses.sampled_ce(logits, cand, ids.clamp(max=Vd - 1)) * wts).sum() / wsum
        if cfg.kl_weight:
            kl = (losses.topk_kl(logits, cand, soft_ids, soft_lp, Vd) * wts).sum() / wsum
    loss = cfg.reg_weight * reg + cfg.ce_weight * ce + cfg.kl_weight * kl
    return loss, [float(reg.detach()), float(ce.detach()), float(kl.detach())]


def fit_heads(net: TrainableHeads, W: torch.Tensor, cfg: TrainConfig, cache: Path, fingerprint: str,
              progress: bool, max_positions: int | None = None, checkpoint: bool = True) -> dict:
    """Optimise ``net``'s parameters over the cached training shards (mutates ``net``)."""
    paths, positions = training_positions(cache, cfg, max_positions)
    sizes = [len(f) for f, _ in positions]
    if sum(sizes) < cfg.batch_size:
        raise ValueError(f"the corpus gives {sum(sizes)} training positions, fewer than one batch of "
                         f"{cfg.batch_size}; pass more text with corpus=/--corpus or a smaller batch_size")
    steps = schedule(sizes, cfg)
    Wf = W.float()
    gram = Wf.t() @ Wf / W.shape[0] if cfg.reg_weight else None  # [H, H]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    ckpt = cache / CKPT_NAME
    if checkpoint and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt} holds heads for another backbone (LM-head fingerprint {state['fingerprint']}, "
                             f"this model has {fingerprint}); use --overwrite to start again")
        net.load_state_dict(state["net"], strict=False)
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
    cur, data, perm = -1, None, {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(steps), initial=step, desc="heads", unit="step", disable=not progress, dynamic_ncols=True)
    ema = None
    while step < len(steps):
        e, s, b = steps[step]
        if s != cur:
            data, cur = load_shard(paths[s]), s
            perm.clear()
        if (e, s) not in perm:
            perm[(e, s)] = torch.randperm(sizes[s], generator=seeded(cfg.seed, e, s))
        sel = perm[(e, s)][b * cfg.batch_size : (b + 1) * cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, len(steps), cfg)
        loss, parts = step_loss(net, data, positions[s][0][sel], positions[s][1][sel], Wf, gram, cfg,
                                seeded(cfg.seed, "neg", step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step == 1 or step % 25 == 0 or step == len(steps):
            history.append([step, lv, *parts])
            bar.set_postfix(loss=f"{ema:.3f}", reg=f"{parts[0]:.3f}", ce=f"{parts[1]:.3f}", kl=f"{parts[2]:.3f}")
        bar.update(1)
        if checkpoint and step % cfg.checkpoint_every == 0 and step < len(steps):
            trainable = {n: p.detach().clone() for n, p in net.named_parameters()}
            atomic_torch_save({"net": trainable, "opt": opt.state_dict(), "step": step, "history": history,
                               "fingerprint": fingerprint}, ckpt)
            kill_point("fit:checkpoint")
        after_step(step)
    bar.close()
    return {"steps": len(steps), "positions_per_epoch": sum(sizes), "loss_history": history,
            "loss_columns": ["step", "loss", "reg", "ce", "kl"], "seconds_this_run": time.perf_counter() - t0}
