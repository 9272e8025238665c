"""Training the EAGLE-style drafter (:mod:`clp_fast.drafts.eagle`) on the cached shards of real code.

Data: the shards of :mod:`clp_fast.train.build` (teacher-forced windows of real code, greedy continuations),
built and resumed by the heads' own pipeline (:func:`clp_fast.train.api.train_heads` with ``data_only``).
Each window gives pairs ``(h_i, x_{i+1})``; the drafter reads token ``x_{i+1}``, so the backbone's distribution
at ``i + 1`` (the target) is conditioned on exactly the token it reads: teacher-forced text is clean data here.

Loss, at every unrolled depth ``j = 1..depth`` (**training-time test**: depth ``j > 1`` feeds the drafter its
own output feature of depth ``j - 1``, as drafting does, with the text's token): KL from the backbone's cached
top-k distribution at ``i + j`` to the drafter's softmax (over a sampled candidate vocabulary, as the heads'
fit does), plus ``reg_weight`` x smooth-L1 of the predicted feature against ``h_{i+j}`` (EAGLE's regression).
Attention at depth ``j`` sees the committed pairs ``<= i`` (depth 1) and the anchor's own deeper pairs, the mask
drafting uses.

Checkpoints (drafter, optimiser, step) are written atomically every ``checkpoint_every`` steps; the batch
schedule is a pure function of the seed, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clp_fast.drafts.eagle import EagleDrafter
from clp_fast.faults import kill_point
from clp_fast.train import losses
from clp_fast.train.config import RUN_MARKER, atomic_torch_save, atomic_write_text, log, seeded
from clp_fast.train.shards import load_shard, shard_paths

__all__ = ["EagleTrainConfig", "unrolled", "unrolled_loss", "step_loss", "train_eagle", "CKPT_NAME"]

CKPT_NAME = "eagle_checkpoint.pt"
TRAIN_KINDS = ("tf", "gen")
AMP_MODES = ("auto", "bf16", "off")


@dataclasses.dataclass
class EagleTrainConfig:
    """What shapes the drafter's training (the data options are :class:`clp_fast.train.config.TrainConfig`'s)."""

    depth: int = 3  # unrolled steps of the training-time test (>= 1; EAGLE-3 uses >= 3)
    epochs: int = 1
    batch_windows: int = 4  # windows per step
    lr: float = 1e-3
    warmup_steps: int = 20
    kl_topk: int = 32
    reg_weight: float = 0.1  # smooth-L1 feature regression beside the KL (EAGLE: 1.0 feature + 0.1 CE)
    negatives: int = 1024  # random candidate ids of the sampled softmax
    draft_vocab: int | None = None
    checkpoint_every: int = 50
    seed: int = 0
    max_steps: int | None = None  # stop early (a CPU-time budget); None: every batch of every epoch; 0 (with
    # ``init``): no step, only the card's held-out numbers and a CLP fitted for the saved drafter's weights
    init: str | None = None  # a saved drafter to start from (training on, e.g. over a grown cache); None: fresh
    clp_precision: float = 0.99  # the CLP's saved threshold: the smallest at which every depth reaches this
    gen_repeat: int = 1  # visits of each greedy-continuation shard per epoch (the teacher-forced ones: one)
    intermediate_size: int | None = None  # the drafter's MLP width; None: the backbone's (a narrower one keeps a
    # 1.5B drafter's int8 weights under 20 MB)
    amp: str = "auto"  # "bf16": matmuls under CPU autocast (fp32 master weights, fp32 losses); "off"; "auto":
    # bf16 where oneDNN runs bf16 natively (AVX-512 BF16 / AMX; ~1.8x per step measured on Zen 5), else off

    def validate(self) -> None:
        for name in ("depth", "epochs", "batch_windows", "kl_topk", "checkpoint_every", "gen_repeat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r} must be one of {AMP_MODES}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 0):
            raise ValueError(f"max_steps={self.max_steps!r} must be None or an int >= 0")
        if self.max_steps == 0 and self.init is None:
            raise ValueError("max_steps=0 trains nothing: it re-evaluates a saved drafter and fits its CLP, so it "
                             "needs init (--eagle-init DIR)")
        if not 0.0 < self.clp_precision < 1.0:
            raise ValueError(f"clp_precision={self.clp_precision!r} must be in (0, 1)")
        if self.lr <= 0 or self.reg_weight < 0 or self.negatives < 0:
            raise ValueError(f"lr={self.lr!r} must be > 0, reg_weight={self.reg_weight!r} and "
                             f"negatives={self.negatives!r} >= 0")
        if self.intermediate_size is not None and (isinstance(self.intermediate_size, bool)
                                                   or not isinstance(self.intermediate_size, int)
                                                   or self.intermediate_size <= 0):
            raise ValueError(f"intermediate_size={self.intermediate_size!r} must be None or a positive int")
        if self.init is not None and not Path(self.init).is_dir():
            raise FileNotFoundError(f"init={self.init!r}: no such drafter folder")


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The dtype the training step's matmuls run in under ``amp`` (None: fp32 throughout)."""
    if amp == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if amp == "bf16" else None


def ttt_mask(T: int, j: int, device) -> torch.Tensor:
    """``[1, 1, T, j * T]`` bool: at depth ``j`` the pair anchored at ``i`` sees depth-1 pairs ``<= i`` and its
    own pairs of depths ``2..j`` (keys laid out depth after depth)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * (j - 1), dim=1)[None, None]


def unrolled(drafter: EagleDrafter, embed: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
             depth: int) -> list[torch.Tensor]:
    """The drafter over teacher-forced windows, unrolled ``depth`` times.

    Args:
        hidden: ``[n, L, H]`` the backbone's final hidden states.
        tokens: ``[n, L]`` the text.

    Returns:
        per depth ``j`` (1-based), the predicted features ``[n, T, H]`` (``T = L - 1`` anchors): anchor ``i``'s
        guess of ``h_{i+j}`` (its LM-head row guesses token ``i + j + 1``). Anchors whose inputs run past the
        window are garbage; the loss masks them.
    """
    n, L, _ = hidden.shape
    T = L - 1
    dt = next(drafter.parameters()).dtype
    pos = torch.arange(T, device=hidden.device)[None].expand(n, T)
    feat = hidden[:, :T].to(dt)
    ks, vs, outs = None, None, []
    for j in range(1, depth + 1):
        tok = torch.zeros(n, T, dtype=torch.long, device=hidden.device)
        tok[:, : L - j] = tokens[:, j:]  # x_{i+j}
        out, k, v = drafter(feat, embed(tok), pos + (j - 1), ks, vs, ttt_mask(T, j, hidden.device))
        ks = k if ks is None else torch.cat([ks, k], dim=2)
        vs = v if vs is None else torch.cat([vs, v], dim=2)
        outs.append(out)
        feat = out
    return outs


def unrolled_loss(drafter: EagleDrafter, embed: torch.nn.Module, W: torch.Tensor, data: dict, cfg: EagleTrainConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """One batch's loss: mean over depths of (KL to the backbone's top-k + ``reg_weight`` x smooth-L1 feature).

    ``data``: a shard's tensors for ``n`` windows (``hidden [n, L, H]``, ``tokens``, ``top_ids`` / ``top_logp``
    ``[n, L, K]``, ``length``, ``start`` ``[n]``); ``W [V, H]`` the LM head (fp32). Returns the loss and the
    per-depth KL values.
    """
    hidden, tokens = data["hidden"].float(), data["tokens"].long()
    n, L, H = hidden.shape
    T = L - 1
    Vd = drafter.draft_vocab
    length, start = data["length"].long(), data["start"].long()
    outs = unrolled(drafter, embed, hidden, tokens, cfg.depth)
    i = torch.arange(T)[None]
    total, per_depth = hidden.new_zeros(()), []
    for j, f in enumerate(outs, start=1):
        ok = (i >= start[:, None]) & (i + j <= length[:, None] - 1)  # [n, T]
        if not bool(ok.any()):
            per_depth.append(0.0)
            continue
        tgt = (i + j).clamp(max=L - 1).expand(n, T)
        f_ok = f[ok]  # [R, H]
        top_ids = data["top_ids"].long().gather(1, tgt[..., None].expand(-1, -1, data["top_ids"].shape[-1]))[ok]
        top_lp = data["top_logp"].float().gather(1, tgt[..., None].expand(-1, -1, data["top_logp"].shape[-1]))[ok]
        top_ids, top_lp = top_ids[:, : cfg.kl_topk], top_lp[:, : cfg.kl_topk]
        cand = losses.candidates(top_ids[:, 0], top_ids, Vd, cfg.negatives, gen)
        kl = losses.topk_kl(f_ok.float() @ W[cand].t(), cand, top_ids, top_lp, Vd).mean()
        h_t = hidden.gather(1, tgt[..., None].expand(-1, -1, H))[ok]
        reg = F.smooth_l1_loss(f_ok.float(), h_t) if cfg.reg_weight else kl.new_zeros(())
        total = total + (kl + cfg.reg_weight * reg) / cfg.depth
        per_depth.append(float(kl.detach()))
    return total, per_depth


def step_loss(drafter: EagleDrafter, embed: torch.nn.Module, W: torch.Tensor, data: dict, cfg: EagleTrainConfig,
              gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """:func:`unrolled_loss` as a training step computes it: under bf16 autocast where ``cfg.amp`` says so."""
    amp = autocast_dtype(cfg.amp)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        return unrolled_loss(drafter, embed, W, data, cfg, gen)


def _windows(paths: list[Path]) -> list[int]:
    from safetensors import safe_open

    sizes = []
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            sizes.append(f.get_slice("length").get_shape()[0])
    return sizes


def _schedule(sizes: list[int], gen: list[bool], cfg: EagleTrainConfig) -> list[tuple[int, int, int, int]]:
    """Every step's (epoch, shard, batch-in-shard, visit): a pure function of the seed. Shard ``s`` is visited
    ``cfg.gen_repeat`` times per epoch where ``gen[s]`` (a greedy-continuation shard), else once."""
    steps = []
    visits = [(s, r) for s in range(len(sizes)) for r in range(cfg.gen_repeat if gen[s] else 1)]
    for e in range(cfg.epochs):
        for i in torch.randperm(len(visits), generator=seeded(cfg.seed, "eagle", e)).tolist():
            s, r = visits[i]
            steps += [(e, s, b, r) for b in range(math.ceil(sizes[s] / cfg.batch_windows))]
    return steps if cfg.max_steps is None else steps[: cfg.max_steps]


def _lr(step: int, total: int, cfg: EagleTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def after_step(step: int) -> None:
    """Called after every optimiser step (a seam for tests that simulate an interruption)."""


def fit_eagle(drafter: EagleDrafter, model, cache: Path, cfg: EagleTrainConfig, progress: bool = True,
              checkpoint: Path | None = None) -> dict:
    """Optimise ``drafter`` (fp32) over the training shards in ``cache``, resuming from its checkpoint
    (``checkpoint``, default ``cache / CKPT_NAME``; runs of other options over one cache each need their own)."""
    from clp_fast.heads import lm_head_fingerprint

    kinds = [(kind, p) for kind in TRAIN_KINDS for p in shard_paths(cache, kind)]
    paths = [p for _, p in kinds]
    if not paths:
        raise ValueError(f"no training shards in {cache}: build the data first")
    sizes = _windows(paths)
    steps = _schedule(sizes, [kind == "gen" for kind, _ in kinds], cfg)
    W = model.get_output_embeddings().weight.detach().float()
    embed = model.get_input_embeddings()
    fingerprint = lm_head_fingerprint(W)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    ckpt = Path(checkpoint) if checkpoint else cache / CKPT_NAME
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != fingerprint or state["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{ckpt} is from another backbone or other training options; delete it or use "
                             f"--overwrite to start again")
        drafter.load_state_dict(state["drafter"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
    t0 = time.perf_counter()
    cur, data = -1, None
    bar = tqdm(total=len(steps), initial=step, desc="eagle", unit="step", disable=not progress, dynamic_ncols=True)
    drafter.train()
    while step < len(steps):
        e, s, b, r = steps[step]
        if s != cur:
            data, cur = load_shard(paths[s]), s
        perm = torch.randperm(sizes[s], generator=seeded(cfg.seed, "eagle", e, s, *([r] if r else [])))
        sel = perm[b * cfg.batch_windows : (b + 1) * cfg.batch_windows]
        batch = {key: data[key][sel] for key in ("hidden", "tokens", "top_ids", "top_logp", "length", "start")}
        L = int(batch["length"].max())
        batch = {key: (t[:, :L] if t.dim() > 1 else t) for key, t in batch.items()}
        for g in opt.param_groups:
            g["lr"] = _lr(step, len(steps), cfg)
        loss, per_depth = step_loss(drafter, embed, W, batch, cfg, seeded(cfg.seed, "eagle-neg", step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step == 1 or step % 10 == 0 or step == len(steps):
            history.append([step, float(loss.detach()), *per_depth])
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", kl1=f"{per_depth[0]:.3f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < len(steps):
            atomic_torch_save({"drafter": {n: t.detach().clone() for n, t in drafter.state_dict().items()},
                               "opt": opt.state_dict(), "step": step, "history": history,
                               "fingerprint": fingerprint, "config": dataclasses.asdict(cfg)}, ckpt)
            kill_point("eagle:checkpoint")
        after_step(step)
    bar.close()
    drafter.eval()
    return {"steps": len(steps), "windows": sum(sizes), "loss_history": history,
            "amp": str(autocast_dtype(cfg.amp) or torch.float32),
            "loss_columns": ["step", "loss"] + [f"kl_depth{j}" for j in range(1, cfg.depth + 1)],
            "seconds_this_run": time.perf_counter() - t0}


def train_eagle(model, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                resume: bool = False, overwrite: bool = False, progress: bool = True, backbone: str | None = None,
                command: str | None = None, data: dict | None = None, save_dtype: torch.dtype = torch.bfloat16,
                data_only: bool = False, **options) -> EagleDrafter | dict:
    """Build (or reuse) the data cache, train a drafter, evaluate it on held-out windows, save it with a card.

    Args:
        model: a loaded Qwen2 / Llama causal LM (frozen here).
        out_dir: output folder (``drafter.safetensors``, ``config.json``, ``training_card.json/.md``); must not
            hold files unless ``resume`` or ``overwrite``.
        cache_dir: the data cache (default: the heads' default for ``out_dir``); shards already there that match
            the data options are reused.
        data: data options for :func:`clp_fast.train.api.train_heads` (``max_tokens``, ``heldout_tokens``,
            ``window``, ``gen_prompts``, ``corpus``, ``stdlib``, ``tokenizer`` ...).
        data_only: stop after the data cache (``--data-only``) and return its per-kind stats.
        **options: :class:`EagleTrainConfig` fields.

    Returns:
        The trained drafter, as saved then loaded (fp32); with ``data_only``, the data stats.
    """
    from clp_fast.train.api import _default_cache, train_heads
    from clp_fast.train.eagle_eval import evaluate_eagle, fit_drafter_clp

    t_start = time.perf_counter()
    fields = {f.name for f in dataclasses.fields(EagleTrainConfig)}
    if set(options) - fields:
        raise TypeError(f"unknown drafter training option(s) {sorted(set(options) - fields)}; known: {sorted(fields)}")
    cfg = EagleTrainConfig(**options)
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"output folder {out_dir} already exists; pass --resume (resume=True) to continue an "
                              f"interrupted run or --overwrite (overwrite=True) to replace it")
    marker = out_dir / RUN_MARKER
    if cache_dir is None and resume and marker.is_file():
        cache_dir = json.loads(marker.read_text()).get("cache_dir")
    cache = Path(cache_dir) if cache_dir else _default_cache(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"cache_dir": str(cache)}))
    if overwrite or not resume:
        (cache / CKPT_NAME).unlink(missing_ok=True)
    data = dict(data or {})
    data.setdefault("epochs", 1)
    t = time.perf_counter()
    data_stats = train_heads(model, cache / "data-run", cache_dir=cache, data_only=True, resume=True,
                             grow_data=True, progress=progress, **data)
    data_seconds = time.perf_counter() - t
    if data_only:  # the cache a drafter run builds first, then stop: its per-kind stats
        return data_stats
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    drafter = _first_drafter(model, cfg, backbone)

    def continuations():  # the held-out prompts' greedy parts: the text a decode step drafts for
        return evaluate_eagle(drafter, model, cache, cfg.depth, kind="heldout", greedy_only=True)

    before = None if cfg.init is None else evaluate_eagle(drafter, model, cache, cfg.depth)  # the card's "before"
    cont_before = None if cfg.init is None else continuations()
    fit = fit_eagle(drafter, model, cache, cfg, progress)
    ev, cont = evaluate_eagle(drafter, model, cache, cfg.depth), continuations()
    log(f"held-out per-depth top-1 {ev.get('acc')} chain {ev.get('chain')} tau {ev.get('tau')}", progress)
    clp = fit_drafter_clp(drafter, model, cache, cfg, progress)
    card = {"command": command, "config": dataclasses.asdict(cfg), "data": data_stats, "data_seconds": data_seconds,
            "fit": {k: v for k, v in fit.items() if k != "loss_history"}, "loss_history": fit["loss_history"],
            "heldout": ev, "heldout_continuations": _strip(cont), "clp": clp,
            "wall_seconds": time.perf_counter() - t_start}
    if before is not None:
        card["heldout_at_init"] = _strip(before)
        card["heldout_continuations_at_init"] = _strip(cont_before)
    drafter.extra = {"training": {"command": command, "heldout": _strip(ev),
                                  "steps": fit["steps"], "init": cfg.init}}
    if "calibration" in ev:  # the drafter's priors in the decode loop (EagleSource)
        drafter.extra["calibration"] = ev["calibration"]
    drafter.save_pretrained(out_dir, dtype=save_dtype)
    atomic_write_text(out_dir / "training_card.json", json.dumps(card, indent=1) + "\n")
    atomic_write_text(out_dir / "training_card.md", _card_md(card))
    if (cache / CKPT_NAME).is_file():
        (cache / CKPT_NAME).unlink()
    return EagleDrafter.from_pretrained(out_dir, model=model)


def _strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "calibration"}


def _first_drafter(model, cfg: EagleTrainConfig, backbone: str | None) -> EagleDrafter:
    """The weights training starts from (fp32): ``cfg.init``'s saved drafter, else a fresh one (seeded)."""
    torch.manual_seed(cfg.seed)
    if cfg.init is None:
        return EagleDrafter.for_model(model, draft_vocab=cfg.draft_vocab, intermediate_size=cfg.intermediate_size,
                                      backbone=backbone or str(getattr(model.config, "_name_or_path", ""))).float()
    drafter = EagleDrafter.from_pretrained(cfg.init, model=model)
    if cfg.draft_vocab is not None and cfg.draft_vocab != drafter.draft_vocab:
        raise ValueError(f"draft_vocab={cfg.draft_vocab} differs from the draft vocabulary of init={cfg.init!r} "
                         f"({drafter.draft_vocab})")
    if cfg.intermediate_size is not None and cfg.intermediate_size != drafter.intermediate_size:
        raise ValueError(f"intermediate_size={cfg.intermediate_size} differs from the MLP width of "
                         f"init={cfg.init!r} ({drafter.intermediate_size})")
    return drafter.float()


def _card_md(card: dict) -> str:
    ev = card["heldout"]
    lines = ["# EAGLE-style drafter: training card", "", f"Command: `{card['command']}`", "",
             f"Steps: {card['fit']['steps']} over {card['fit']['windows']} windows; "
             f"fit {card['fit']['seconds_this_run']:.0f} s this run; data {card['data_seconds']:.0f} s; "
             f"wall {card['wall_seconds']:.0f} s; step matmuls in {card['fit'].get('amp', 'torch.float32')}.", ""]
    if ev.get("positions"):
        lines += [f"Held-out ({ev['kind']}, {ev['positions']} positions, teacher-forced tokens, own features):", "",
                  "| depth | top-1 | chain (all right to here) |", "|---|---:|---:|"]
        lines += [f"| {j} | {a:.3f} | {c:.3f} |" for j, (a, c) in enumerate(zip(ev["acc"], ev["chain"]), start=1)]
        lines += ["", f"Chain tau (1 + sum of chain): {ev['tau']:.3f}", ""]
    clp = card.get("clp")
    if clp:
        c = clp["clp"]
        lines += [f"CLP (mode='clp'): threshold {c['threshold']:.4f} (every depth's precision >= "
                  f"{c['target_precision']} on {clp['rows_val']} validation positions); at it, per depth:", "",
                  "| depth | precision | recall |", "|---|---:|---:|"]
        lines += [f"| {r['depth']} | {'–' if r['precision'] is None else round(r['precision'], 3)} | "
                  f"{'–' if r['recall'] is None else round(r['recall'], 3)} |" for r in c["per_depth"]]
        lines += [""]
    cont, cont0 = card.get("heldout_continuations", {}), card.get("heldout_continuations_at_init", {})
    if cont.get("positions"):
        lines += [f"Held-out greedy continuations ({cont['positions']} positions, the greedy part after each prompt): "
                  f"top-1 {' / '.join(f'{a:.3f}' for a in cont['acc'])}, chain tau {cont['tau']:.3f}"
                  + (f" (at init {cont0['tau']:.3f})" if cont0.get("positions") else "") + ".", ""]
    if card.get("heldout_at_init", {}).get("positions"):
        b = card["heldout_at_init"]
        lines += [f"Started from `{card['config']['init']}`: on the same held-out positions it had top-1 "
                  f"{' / '.join(f'{a:.3f}' for a in b['acc'])}, chain tau {b['tau']:.3f}.", ""]
    return "\n".join(lines) + "\n"


def add_eagle_arguments(parser) -> None:
    """The ``--drafter eagle`` options of ``clp-fast train``."""
    d = EagleTrainConfig()
    a = parser.add_argument
    a("--eagle-depth", type=int, default=d.depth, help="unrolled training-time-test depth (default %(default)s)")
    a("--eagle-batch-windows", type=int, default=d.batch_windows, help="windows per step (default %(default)s)")
    a("--eagle-lr", type=float, default=d.lr)
    a("--eagle-reg-weight", type=float, default=d.reg_weight)
    a("--eagle-max-steps", type=int, default=None,
      help="stop after this many steps (a CPU budget); 0 with --eagle-init: no training, re-evaluate the saved "
           "drafter and fit its CLP")
    a("--eagle-init", metavar="DIR", default=None,
      help="start from this saved drafter (train on over a grown cache) instead of fresh weights")
    a("--eagle-gen-repeat", type=int, default=d.gen_repeat,
      help="visits of each greedy-continuation shard per epoch (teacher-forced shards: one; default %(default)s)")
    a("--eagle-intermediate", type=int, default=None, metavar="N",
      help="the drafter's MLP width (default: the backbone's)")
    a("--eagle-amp", choices=AMP_MODES, default=d.amp,
      help="bf16 autocast for the training step (fp32 master weights); auto: where the CPU runs bf16 natively")


def run_train_eagle(args) -> int:
    """``clp-fast train --drafter eagle``: the data options as for the heads, then the drafter's."""
    from clp_fast.models.hub import load_model
    from clp_fast.train.cli import _FIELDS

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    data_keys = ("max_tokens", "heldout_tokens", "gen_prompts", "heldout_prompts", "gen_new_tokens", "window",
                 "top_k", "max_ram_gb", "seed", "gen_batch", "prefill_batch", "dtype", "prompt_style")
    data = {k: getattr(args, k) for k in data_keys if k in _FIELDS}
    data.update(tokenizer=tokenizer, corpus=args.corpus, stdlib=not args.no_stdlib, backbone=args.model)
    got = train_eagle(model, args.out, cache_dir=args.cache_dir, resume=args.resume, overwrite=args.overwrite,
                backbone=args.model, data=data, command="clp-fast " + shlex.join(sys.argv[1:]),
                depth=args.eagle_depth, batch_windows=args.eagle_batch_windows, lr=args.eagle_lr,
                reg_weight=args.eagle_reg_weight, max_steps=args.eagle_max_steps, epochs=args.epochs,
                draft_vocab=args.draft_vocab, checkpoint_every=args.checkpoint_every, seed=args.seed,
                init=args.eagle_init, amp=args.eagle_amp, gen_repeat=args.eagle_gen_repeat,
                intermediate_size=args.eagle_intermediate, data_only=args.data_only)
    if args.data_only:
        print(json.dumps(got, indent=1))
    return 0
