"""What determines a training run: :class:`TrainConfig`, and the small helpers every stage shares."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from pathlib import Path

import torch

from clp_fast.faults import kill_point

RUN_MARKER = "train_run.json"
CKPT_NAME = "checkpoint.pt"
PLAN_NAME = "plan.json"
# Data kinds, in build order: held-out teacher-forced windows first (the ablation's evaluation set and the
# CLP's rows), then the training volume, then greedy continuations (training and held-out).
KINDS = ("heldout_tf", "tf", "gen", "heldout")
TRAIN_KINDS = ("tf", "gen")
HEAD_DESIGNS = ("medusa1", "medusa1+token", "medusa2")
# Where the greedy continuations start: "window" -- a window of code from a def/class line (cut_prompts);
# "docstring" -- HumanEval-shaped, a function's def and docstring with the body left to the model.
PROMPT_STYLES = ("window", "docstring")
# Options that shape the cached data; the others only shape training, so a resumed run may change them
# (the heads are then retrained from step 0 on the cached hidden states).
DATA_FIELDS = ("max_tokens", "heldout_tokens", "window", "skip_first", "gen_prompts", "heldout_prompts",
               "gen_new_tokens", "prompt_chars", "prompt_style", "prefill_batch", "gen_batch", "max_ram_gb", "seed",
               "dtype", "stdlib", "corpus", "top_k")


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines the trained heads (a resumed run must match its data options exactly)."""

    k: int = 4
    max_tokens: int = 400_000  # teacher-forced tokens from training files (the main data volume)
    heldout_tokens: int = 0  # teacher-forced tokens from held-out files (CLP rows, ablation evaluation)
    window: int = 256  # tokens per teacher-forced window
    skip_first: int = 16  # positions at a window's start with too little context to train on
    gen_prompts: int = 96  # greedy continuations used as training data
    heldout_prompts: int = 96  # greedy continuations from held-out files (accuracy, CLP, gate)
    gen_new_tokens: int = 96
    prompt_chars: int = 600
    prompt_style: str = "window"  # PROMPT_STYLES: how the continuations' prompts (training and held-out) are cut
    top_k: int = 32  # soft targets cached per position: the backbone's top-k ids and log-probabilities
    epochs: int = 2
    batch_size: int = 512
    lr: float = 3e-3  # 1e-3 -> held-out head-1 0.276, 3e-3 -> 0.289 (SmolLM2, CE only, 80K positions, 3 epochs)
    warmup_steps: int = 50
    # Loss = ce_weight * CE(argmax label) + kl_weight * KL(top-k soft target || head) + reg_weight * logit MSE.
    # Defaults are the shipped recipe: KL alone beat CE by +0.037 head-1 top-1 (ablate_heads.py, docs/training.md).
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    kl_topk: int = 32  # soft-target ids used by the KL term (<= top_k)
    # Logit-space regression onto h_{t+j} (EAGLE-style, scored through the LM head) hurt here (SmolLM2, 80K
    # positions, 3 epochs, head-1 top-1: 0.240 with reg 0.1 + CE, 0.276 with CE alone): z_j - h = SiLU(.) >=
    # -0.28 cannot follow h_{t+j} downwards. Kept as an option; the ablation measures it again.
    reg_weight: float = 0.0
    ce_negatives: int = 2048
    inconsistent_weight: float = 0.5  # 0.0 -> head-1 0.214, 0.5 -> 0.240 (SmolLM2, same data): volume wins
    head_design: str = "medusa1"  # the shipped decode kernels run "medusa1"; the others are ablations
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
    dtype: str = "bf16"  # the backbone's dtype while building data (hidden states are stored in bf16)
    stdlib: bool = True
    corpus: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("k", "max_tokens", "epochs", "batch_size", "window", "checkpoint_every", "prefill_batch",
                     "gen_batch", "top_k", "kl_topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if isinstance(self.heldout_tokens, bool) or not isinstance(self.heldout_tokens, int) or self.heldout_tokens < 0:
            raise ValueError(f"heldout_tokens={self.heldout_tokens!r} must be a non-negative int")
        if self.kl_topk > self.top_k:
            raise ValueError(f"kl_topk={self.kl_topk} must be <= top_k={self.top_k}")
        if not 0.0 < self.clp_precision < 1.0:
            raise ValueError(f"clp_precision={self.clp_precision!r} must be in (0, 1)")
        if self.max_ram_gb <= 0:
            raise ValueError(f"max_ram_gb={self.max_ram_gb!r} must be positive")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style={self.prompt_style!r} must be one of {PROMPT_STYLES}")
        if self.head_design not in HEAD_DESIGNS:
            raise ValueError(f"head_design={self.head_design!r} must be one of {HEAD_DESIGNS}")
        for name in ("ce_weight", "kl_weight", "reg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.ce_weight + self.kl_weight + self.reg_weight <= 0:
            raise ValueError("ce_weight, kl_weight and reg_weight are all 0: nothing to train")


def log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[clp_fast.train] {msg}", file=sys.stderr, flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        kill_point("checkpoint-tmp")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def seeded(*parts) -> torch.Generator:
    """A generator seeded from values: every random draw is a pure function of (seed, where)."""
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
