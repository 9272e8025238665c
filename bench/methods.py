"""Which methods the bench compares, on which prompts, with which heads and stop tokens."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import clp_fast
from clp_fast.engine.api import LOOKUP_WIDTH
from clp_fast.heads import MTPHeads

BASELINE = "hf-greedy"
PROMPT_LOOKUP = "hf-prompt-lookup"
COMPILED = "hf-greedy + torch.compile"
# End-of-text tokens that stop generation besides the generation config's EOS. The GGUF-converted
# Qwen2.5 config names only <|im_end|>; Qwen's own generation_config.json also stops at
# <|endoftext|>, the token the model ends a raw (non-chat) completion with.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")


@dataclass
class Method:
    """One row of the table: ``run(ids [B, P], mask [B, P], max_new_tokens) -> (out [B, P + G], info)``."""

    name: str
    k: int | None
    run: Callable
    family: str  # "hf" | "clp_fast"
    compiles: bool = False  # torch.compile'd: a call that compiles is timed again (see timing.run_single_stream)

    @property
    def label(self) -> str:
        return f"{self.name} k={self.k}" if self.k else self.name


class ForwardCounter:
    """Counts top-level forwards of a transformers model (to give HF methods a τ)."""

    def __init__(self, model):
        self.n = 0
        self.model = model
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1

    @contextlib.contextmanager
    def paused(self):
        """No counting inside: keeps the hook (a Python side effect) out of a torch.compile'd forward."""
        self._handle.remove()
        try:
            yield
        finally:
            self._handle = self.model.register_forward_pre_hook(self._hook)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far: a rise across a call means it compiled (or recompiled)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiled_hf_greedy(model, eos: list[int], pad: int, counter: ForwardCounter, max_cache_len: int) -> Method:
    """transformers greedy with its documented fast path: a static KV cache whose decode step ``generate`` compiles.

    Inductor with ``freezing`` (weights become constants of the graph) and ``cpp.weight_prepack`` (linears
    prepacked once for oneDNN): on the EPYC VM (issue 26) plain ``torch.compile`` gained nothing (17.1 vs 18.5
    tok/s eager), with freezing 32.1. ``generate`` runs the prefill eagerly and compiles only the one-token
    step, whose shapes are set by the static cache: ``max_cache_len`` sizes it once for the whole run (longest
    prompt + new tokens, transformers' own knob for this), so every prompt reuses one graph. Sized per call
    (the default) the cache grows with the longest prompt so far, and each growth recompiles (~20 s each for
    Qwen2.5-0.5B, issue 26). The freezing pass
    keeps a prepacked copy of every weight (peak RSS shows it); the model's own parameters are untouched.
    """
    from transformers import CompileConfig, GenerationConfig

    # mode=None: torch.compile takes either a mode or inductor options, not both (CompileConfig defaults the mode)
    cc = CompileConfig(fullgraph=False, dynamic=False, mode=None,
                       options={"freezing": True, "cpp.weight_prepack": True})
    # generate auto-compiles on accelerators only; this private flag is transformers' own switch for CPU (5.25)
    cc._compile_all_devices = True

    def run(ids, mask, n):
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad,
                               cache_implementation="static", max_cache_len=max_cache_len, compile_config=cc)
        with counter.paused():
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
        return out, {"forward_passes": out.shape[1] - ids.shape[1]}  # greedy: one forward per new token
    return Method(COMPILED, None, run, "hf", compiles=True)


@contextlib.contextmanager
def env(**values):
    """Environment variables set for the duration of a block, restored after."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_methods(model, heads: MTPHeads, ks: list[int], eos: list[int], pad: int, threshold: float | None,
                 counter: ForwardCounter, speculation: str = "adaptive",
                 compiled_cache_len: int | None = None, datastore=None, drafter=None) -> list[Method]:
    """The methods of the single-stream table, in table order; ``compiled_cache_len`` adds the compiled peer,
    ``datastore`` (a :func:`clp_fast.drafts.datastore.datastore_factory`) a lossless k=2 row with the retrieval
    drafts beside the plain one (``run_bench.py --datastore``); ``drafter`` (a factory from
    :func:`drafter_factory`) the rows ``drafter alone`` (no heads, no prompt lookup), ``heads alone`` (its
    control), ``drafter + lookup`` (no heads: the drafter in the heads' place) and ``lossless + drafter`` (heads
    k=2, lookup and the drafter)."""
    from transformers import GenerationConfig

    def hf(**extra):
        def run(ids, mask, n):
            # A fresh config: the baseline must be plain greedy whatever the checkpoint's defaults
            # (Qwen's published generation_config.json samples, with a repetition penalty).
            cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos,
                                   pad_token_id=pad, **extra)
            before = counter.n
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
            return out, {"forward_passes": counter.n - before}
        return run

    def ours(mode, k, policy="clp", pack="1", drafts=None, lookup=None):
        h = heads.truncated(k) if k else (False if drafts and mode == "lossless" else None)
        more = {} if lookup is None else {"prompt_lookup": lookup}

        def run(ids, mask, n):
            with env(CLP_FAST_PACK=pack):
                return run_ours(ids, mask, n)

        def run_ours(ids, mask, n):
            out, st = clp_fast.generate(model, ids, h, attention_mask=mask, max_new_tokens=n, mode=mode,
                                        eos_token_id=eos, pad_token_id=pad, policy=policy,
                                        clp_threshold=threshold if mode == "clp" and policy == "clp" else None,
                                        return_stats=True, drafts=drafts, **more,
                                        **({"speculation": speculation} if mode == "lossless" else {}))
            info = {"forward_passes": st.forward_passes, "row_forwards": st.row_forwards,
                    "accept_hist": st.accept_hist, "new_tokens": st.new_tokens, "drafted": st.drafted}
            for src in st.sources:  # each source's report: retrieval's accepted guesses, a drafter's own time
                info.update({key: src[key] for key in ("by_kind", "draft_s", "draft_steps") if key in src})
            info["sources"] = st.sources
            return out, info
        return run

    methods = [Method(BASELINE, None, hf(), "hf"), Method(PROMPT_LOOKUP, None, hf(prompt_lookup_num_tokens=10), "hf"),
               Method("clp_fast greedy", None, ours("greedy", None), "clp_fast"),
               # the eager step before issue 26 (weights not prepacked), side by side
               Method("clp_fast greedy, plain step", None, ours("greedy", None, pack="0"), "clp_fast")]
    if compiled_cache_len:
        methods.insert(1, compiled_hf_greedy(model, eos, pad, counter, compiled_cache_len))
    methods += [Method("clp_fast lossless", k, ours("lossless", k), "clp_fast") for k in ks]
    if datastore is not None:
        methods += [Method("clp_fast lossless + datastore", k, ours("lossless", k, drafts=[datastore]), "clp_fast")
                    for k in ks if k == 2]
    if drafter is not None:
        methods += [Method("clp_fast heads alone", 2, ours("lossless", 2, lookup=0), "clp_fast"),
                    Method("clp_fast drafter alone", None, ours("lossless", None, drafts=[drafter], lookup=0),
                           "clp_fast"),
                    # without heads, generate() defaults to no lookup: its width here is the one it takes beside heads
                    Method("clp_fast drafter + lookup", None,
                           ours("lossless", None, drafts=[drafter], lookup=LOOKUP_WIDTH), "clp_fast"),
                    Method("clp_fast lossless + drafter", 2, ours("lossless", 2, drafts=[drafter]), "clp_fast")]
    methods += [Method("clp_fast clp", k, ours("clp", k), "clp_fast") for k in ks]
    if heads.gate is not None:
        methods.append(Method("gate", heads.k, ours("clp", heads.k, policy="gate"), "clp_fast"))
    return methods


def drafter_factory(model, folder: str, depth: int, top_m: int = 1, stop_below: float = 0.0):
    """A ``drafts=[...]`` entry drafting with the EAGLE-style drafter saved in ``folder`` (in the model's dtype);
    the sources it made are kept in ``factory.sources`` (their draft seconds and steps)."""
    from clp_fast.drafts.eagle import EagleDrafter, EagleSource

    W = model.get_output_embeddings().weight
    return EagleSource.factory(EagleDrafter.from_pretrained(folder, model=model, dtype=W.dtype, device=W.device),
                               depth, top_m, stop_below)


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    set: str  # "humaneval" | "prose"
    id: str
    text: str
    ids: torch.Tensor = field(repr=False)  # [1, P]


def load_prompts(tok, n_humaneval: int, n_prose: int, seed: int) -> list[Prompt]:
    """A seeded subset of HumanEval (raw completion prompts) and of the stdlib prose set."""
    from clp_fast.eval.data import humaneval_prompts, prose_prompts

    out = []
    if n_humaneval:
        rows = humaneval_prompts() if n_humaneval >= 164 else humaneval_prompts(n_humaneval, seed)
        out += [Prompt("humaneval", r["task_id"], r["prompt"], tok(r["prompt"], return_tensors="pt").input_ids)
                for r in rows]
    if n_prose:
        for i, text in enumerate(prose_prompts(n_prose, seed)):
            out.append(Prompt("prose", f"prose/{i}", text, tok(text, return_tensors="pt").input_ids))
    return out


def stop_ids(model, tok) -> list[int]:
    """EOS ids used by every method: the generation config's, the tokenizer's and :data:`END_TOKENS`."""
    ids = []
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids += [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in END_TOKENS if t in vocab and t in tok.all_special_tokens]
    return sorted(set(ids))



def load_heads(args, model) -> MTPHeads:
    """``--heads DIR`` or the shipped heads for this backbone; a clear message if there are none."""
    from clp_fast.assets import HEADS_DIR, default_heads_for

    if args.heads:
        try:
            return MTPHeads.from_pretrained(args.heads, model=model)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"run_bench: --heads {args.heads}: {e}") from None

    try:
        return default_heads_for(model)
    except ValueError as e:
        raise SystemExit(
            f"run_bench: no MTP heads for {args.model}.\n  {e}\n"
            f"  Shipped heads live in {HEADS_DIR}/<model name>/ (they may still be training).\n"
            f"  Pass --heads DIR (a folder written by `clp-fast train --out DIR` or MTPHeads.save_pretrained)."
        ) from None

