"""Which token sequences the data is made of: a deterministic plan cut from local source code.

Files are split into a training part and a held-out part (10 %, by file), so no held-out number ever
sees a training window's file. HumanEval function names are passed to
:func:`clp_fast.eval.data.cut_prompts` as ``exclude``.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

from clp_fast.train.config import TrainConfig, encode, log


def _cut(files, n, chars, seed, exclude) -> list[str]:
    """Up to ``n`` windows from ``files`` (fewer if the corpus is small; never an error here)."""
    from clp_fast.eval.data import cut_prompts

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


def _windows(files, tokenizer, cfg: TrainConfig, tokens: int, seed: int, exclude) -> list[list[int]]:
    n_windows = math.ceil(tokens / cfg.window)
    # ~4.5 characters per token for Python code with these BPE vocabularies; short windows are dropped.
    texts = _cut(files, int(n_windows * 1.25) + 4, int(cfg.window * 4.5), seed, exclude) if tokens else []
    out = []
    for text in texts:
        ids = encode(tokenizer, text)[: cfg.window]
        if len(ids) >= max(cfg.window // 2, cfg.skip_first + cfg.k + 2):
            out.append(ids)
        if len(out) == n_windows:
            break
    return out


def make_plan(files: list[Path], tokenizer, cfg: TrainConfig, exclude: list[str], progress: bool) -> dict:
    """Token sequences for every data kind: ``{"tf", "heldout_tf": windows; "gen", "heldout": prompts}``."""
    rng = random.Random(cfg.seed)
    shuffled = sorted(files)
    rng.shuffle(shuffled)
    if len(shuffled) >= 10:
        n_held = max(1, len(shuffled) // 10)
        held_files, train_files = sorted(shuffled[:n_held]), sorted(shuffled[n_held:])
    else:  # a tiny corpus: held-out prompts come from the same files (other windows, other seed)
        held_files, train_files = sorted(files), sorted(files)
    log(f"cutting ~{cfg.max_tokens // cfg.window} windows of {cfg.window} tokens from {len(train_files)} files",
        progress)
    max_prompt = max(8, cfg.window - cfg.gen_new_tokens)

    def prompts(fs, n, seed):
        if not n:
            return []
        if cfg.prompt_style == "docstring":  # whole prompts only: one over max_prompt tokens is skipped
            from clp_fast.eval.data import docstring_prompts

            texts = docstring_prompts(fs, None, cfg.prompt_chars, seed, exclude=exclude)
            ids = (encode(tokenizer, t) for t in texts)
            return list(itertools.islice((p for p in ids if 0 < len(p) <= max_prompt), n))
        ids = (encode(tokenizer, text)[-max_prompt:] for text in _cut(fs, n, cfg.prompt_chars, seed, exclude))
        return [p for p in ids if p]

    return {"tf": _windows(train_files, tokenizer, cfg, cfg.max_tokens, cfg.seed, exclude),
            "heldout_tf": _windows(held_files, tokenizer, cfg, cfg.heldout_tokens, cfg.seed + 3, exclude),
            "gen": prompts(train_files, cfg.gen_prompts, cfg.seed + 1),
            "heldout": prompts(held_files, cfg.heldout_prompts, cfg.seed + 2),
            "files": {"train": len(train_files), "heldout": len(held_files)}}
