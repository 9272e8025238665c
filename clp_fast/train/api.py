"""``train_heads``: the whole run -- plan, data, heads, CLP and gate, card -- each stage resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from clp_fast.heads import MTPHeads, lm_head_fingerprint
from clp_fast.train.build import build_data
from clp_fast.train.config import (
    CKPT_NAME,
    DATA_FIELDS,
    KINDS,
    PLAN_NAME,
    RUN_MARKER,
    TrainConfig,
    atomic_write_text,
    log,
)
from clp_fast.train.plan import make_plan


def _default_cache(out_dir: Path) -> Path:
    from clp_fast.models.hub import clp_home

    tag = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:10]
    return clp_home() / "train_cache" / f"{out_dir.name}-{tag}"


def _exclude_list(progress: bool) -> list[str]:
    from clp_fast.eval.data import humaneval_signatures

    try:
        return humaneval_signatures(download=False)
    except (FileNotFoundError, ValueError):
        pass
    try:
        return humaneval_signatures()
    except Exception as err:  # noqa: BLE001 -- offline machine: the stdlib holds no HumanEval code anyway
        log(f"HumanEval names unavailable ({err}); cutting prompts without the exclusion list", progress)
        return []


def _check_resume(cache: Path, run_id: dict, grow: bool, progress: bool) -> None:
    """Refuse to resume a run for another backbone or other data options; drop the checkpoint if only
    training options changed."""
    run_path = cache / "run.json"
    if not run_path.is_file():
        return
    prev = json.loads(run_path.read_text())
    if prev["fingerprint"] != run_id["fingerprint"] or [prev["vocab"], prev["hidden"]] != [run_id["vocab"],
                                                                                           run_id["hidden"]]:
        raise ValueError(f"cannot resume: the interrupted run in {cache} trained heads for another backbone "
                         f"(LM-head fingerprint {prev['fingerprint']}, [{prev['vocab']}, {prev['hidden']}]); this "
                         f"model has {run_id['fingerprint']}, [{run_id['vocab']}, {run_id['hidden']}]; use --overwrite")
    # a field added since the cache was written had its default value then
    old = {**dataclasses.asdict(TrainConfig()), "corpus": [], **prev["config"]}
    new = run_id["config"]
    diff = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    data_diff = sorted(set(diff) & set(DATA_FIELDS))
    if data_diff and not grow:
        raise ValueError(f"cannot resume: the data options differ from the interrupted run's in {data_diff}; "
                         f"pass --grow-data (grow_data=True) to keep the shards that still match the new plan, or "
                         f"use --overwrite")
    if data_diff:
        log(f"data options changed ({data_diff}): re-planning; shards that hold the new plan's sequences are kept, "
            f"the others rebuilt", progress)
        (cache / PLAN_NAME).unlink(missing_ok=True)
    if diff:
        log(f"training options changed ({diff}): training the heads from step 0", progress)
        (cache / CKPT_NAME).unlink(missing_ok=True)


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
    data_only: bool = False,
    grow_data: bool = False,
    command: str | None = None,
    ablation: dict | str | os.PathLike | None = None,
    **config,
) -> MTPHeads | dict:
    """Train k MTP heads + CLP (+ gate) for a frozen causal LM and write them to ``out_dir``.

    Args:
        model: a loaded transformers causal LM (Qwen2 / Llama), or a name / folder for
            :func:`clp_fast.models.hub.load_model`.
        out_dir: output folder (``heads.safetensors``, ``config.json``, ``training_card.json/.md``,
            ``clp_metrics.json``). Must not exist unless ``resume`` or ``overwrite``.
        tokenizer: anything with ``encode(text, add_special_tokens=False) -> list[int]`` (None → the
            model's own, found by :func:`clp_fast.models.hub.load_model`).
        k: number of heads.
        corpus: extra files / folders of source code, added to the stdlib (``stdlib=False`` drops it).
        max_tokens: teacher-forced tokens from training files (the main data volume).
        epochs: passes over the cached data.
        resume: continue an interrupted run (finished shards and the latest checkpoint are reused;
            the data options and backbone must match).
        overwrite: delete ``out_dir`` and the run's cache first.
        cache_dir: where hidden-state shards and checkpoints go (default
            ``<clp_home()>/train_cache/<out name>-<hash>``).
        exclude: strings that keep a window out of the data (default: HumanEval function names).
        keep_cache: keep the shards after success (they make a re-run of later stages cheap).
        save_dtype: dtype of the saved heads (bf16 for shipped assets).
        budget: a note on the wall-time budget, recorded in the training card.
        backbone: the backbone's name recorded in the heads' config (None → the model's ``name_or_path``).
        data_only: stop after building the data cache (returns its stats; ``resume=True`` continues later).
        grow_data: with ``resume``, accept changed data options (e.g. more ``max_tokens``): the plan is
            made again and every cached shard is checked against it; matching shards are kept.
        command: the command line that made this run, recorded in the training card.
        ablation: an ablation table (``bench/ablate_heads.py``'s JSON, or its path -- read when the card is
            written, so an ablation still running at the start is complete by then) shown in the card.
        **config: any other :class:`TrainConfig` field (``batch_size``, ``lr``, ``kl_weight`` ...).

    Returns:
        The trained :class:`MTPHeads` (fp32, as saved then loaded, so identical to the files), or the
        data stats with ``data_only``.

    Raises:
        FileExistsError: ``out_dir`` exists and neither ``resume`` nor ``overwrite`` is set.
        ValueError: empty / unreadable corpus (names the path), too little data for one batch,
            a resumed run for another backbone or data options, a corrupt shard (names it).
        OSError: disk full while writing a shard (earlier shards stay; resume works).
    """
    t_start = time.perf_counter()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = set(config) - fields
    if bad:
        raise TypeError(f"unknown training option(s) {sorted(bad)}; known: {sorted(fields)}")
    cfg = TrainConfig(k=k, max_tokens=max_tokens, epochs=epochs,
                      corpus=tuple(str(c) for c in (corpus or [])), **config)
    cfg.validate()

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
    from clp_fast.eval.data import iter_corpus_files

    files = iter_corpus_files(list(cfg.corpus), stdlib=cfg.stdlib)
    for f in files:
        if f.stat().st_size == 0 and len(files) == 1:
            raise ValueError(f"corpus file {str(f)!r} is empty")

    from clp_fast.models.hub import load_model

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
    from clp_fast.models.native import NativeBackbone

    bb = NativeBackbone(model)
    W = bb.plain_lm_head.detach()
    fingerprint = lm_head_fingerprint(W)
    name = backbone or str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    cfg_dict = {**dataclasses.asdict(cfg), "corpus": list(cfg.corpus)}
    run_id = {"config": cfg_dict, "fingerprint": fingerprint, "vocab": W.shape[0], "hidden": W.shape[1]}

    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(cache, run_id, grow_data, progress)
    atomic_write_text(cache / "run.json", json.dumps(run_id, indent=1))
    atomic_write_text(marker, json.dumps({"cache_dir": str(cache)}))

    torch.manual_seed(cfg.seed)
    stage = {}
    t = time.perf_counter()
    plan_path = cache / PLAN_NAME
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        plan = make_plan(files, tokenizer, cfg, exclude if exclude is not None else _exclude_list(progress), progress)
        atomic_write_text(plan_path, json.dumps(plan))
    n_pos = sum(max(0, len(s) - 1 - cfg.skip_first) for s in plan["tf"])
    n_pos += sum(len(s) for s in plan["gen"]) + (cfg.gen_new_tokens * len(plan["gen"]))
    if not plan["tf"] and not plan["gen"] or n_pos < cfg.batch_size:
        src = ", ".join(cfg.corpus) + (" + stdlib" if cfg.stdlib else "") if cfg.corpus else "the stdlib"
        raise ValueError(f"corpus {src} is too small: {len(plan['tf'])} windows, ~{n_pos} positions, fewer than "
                         f"one batch of {cfg.batch_size}")
    if not plan["heldout"] and not data_only:  # the heads' CLP and accuracy need them; a data-only build does not
        raise ValueError("the corpus gives no held-out prompts; pass more text with corpus=/--corpus")
    stage["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.inference_mode():
        data_stats = build_data(model, bb, plan, cfg, cache, progress)
    stage["data (this run)"] = time.perf_counter() - t
    if data_only:
        return data_stats

    from clp_fast.train.finish import finish_run

    return finish_run(model, bb, plan, cfg, cache, out_dir, marker, fingerprint=fingerprint, name=name,
                      data_stats=data_stats, stage=stage, t_start=t_start, save_dtype=save_dtype,
                      keep_cache=keep_cache, budget=budget, command=command, progress=progress,
                      ablation=ablation)
