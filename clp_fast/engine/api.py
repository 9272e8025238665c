"""The public decoding calls: argument checks and defaults, then one :class:`~clp_fast.engine.loop.Plan` for the
loop. :func:`generate` decodes by argmax (``greedy``, ``lossless``) or unverified CLP chains (``clp``);
:func:`generate_processed` through logits processors, stopping criteria and lossless speculative sampling.
Both run :func:`clp_fast.engine.loop.run`; only the verifier differs (:mod:`clp_fast.engine.verify`).
"""

from __future__ import annotations

import time

import torch

from clp_fast import backend
from clp_fast.assets import default_heads_for
from clp_fast.drafts import make_sources
from clp_fast.drafts.heads import HeadsSource, HeadsWorth
from clp_fast.drafts.lookup import PromptLookup
from clp_fast.engine import streaming
from clp_fast.engine.cost import StepCost, step_cost
from clp_fast.engine.loop import DecodeStats, Plan, run
from clp_fast.engine.prepare import MODES, POLICIES, _check_inputs, _start, _tree_setup
from clp_fast.engine.processors import sampling_processors
from clp_fast.engine.speculation import Speculator
from clp_fast.engine.verify import ArgmaxVerifier, ChainVerifier, SamplingVerifier
from clp_fast.heads import MTPHeads
from clp_fast.models.native import NativeBackbone

__all__ = ["MODES", "POLICIES", "SPECULATION", "PROCESSED_MODES", "MAX_STEP_TOKENS", "LOOKUP_WIDTH", "DecodeStats",
           "generate", "generate_processed", "left_pad", "sampling_processors"]

# Lossless mode: "adaptive" feeds, each step, the guesses whose expected return beats their measured cost
# (clp_fast.engine.speculation, clp_fast.engine.cost); "fixed" feeds every drafted guess up to max_step_tokens.
SPECULATION = ("adaptive", "fixed")
# Default prompt-lookup width in lossless mode. Qwen2.5-Coder-0.5B, 4 HumanEval prompts x 128 tokens, bf16,
# 2 threads: k = 2 heads with lookup width 2 -> tau 1.51, 1.39x our greedy; width 6 -> tau 1.68, 1.43x;
# width 10 gains ~0.03 tau more while every extra fed token costs ~1.5 % of a step.
LOOKUP_WIDTH = 6
# Default cap on tokens fed per forward in lossless mode, over the whole batch; every row keeps at least one guess
# (see generate()). Verifying is nearly free while a forward is memory-bound; on the 2-core CPU it stops being so
# past ~10 fed tokens, mostly in the LM head (each fed token is a full-vocabulary logit row plus k draft rows).
# Qwen2.5-Coder-0.5B, k = 2, bf16, 2 threads, HumanEval, lossless tok/s over transformers' batched greedy
# (bench/sweep_step_cap.py, 2 batches of 64 / 48 / 32 tokens at B = 4 / 8 / 16, +-10 % noise):
# B = 4: 1 guess per row 1.16x, 2: 1.08x, 3: 1.03x, 7: 0.90x, 0: 0.86x; B = 8: 1 guess 1.20x, 2: 1.10x,
# 0: 1.05x; B = 16: 1 guess 0.95x, 0: 0.89x. B = 1 stays uncapped.
MAX_STEP_TOKENS = 10


PROCESSED_MODES = ("greedy", "lossless")


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → left-padded ``(input_ids [B, P], attention_mask [B, P])``, as
    :func:`generate` and transformers' ``generate`` expect them."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError(f"empty prompt: row lengths {[len(r) for r in rows]}")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    heads: MTPHeads | None | bool = None,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    mode: str = "lossless",
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    clp_threshold: float | None = None,
    policy: str = "clp",
    prompt_lookup: int | None = None,
    max_step_tokens: int | None = None,
    return_stats: bool = False,
    max_cache_bytes: int | None = None,
    streamer=None,
    tree_top_m: int | None = None,
    speculation: str = "adaptive",
    cost_model: StepCost | None = None,
    drafts: list | None = None,
):
    """Decode ``max_new_tokens`` tokens for each row of a (left-padded) batch.

    Args:
        model: a loaded Qwen2 / Llama causal LM (transformers); it is used, not copied.
        input_ids: ``[B, P]`` int64 prompt ids, left-padded like transformers' ``generate``.
        heads: trained :class:`MTPHeads` for this backbone (None → the shipped heads for a known
            backbone in non-greedy modes, else an error; False → no heads: lossless guesses come from prompt
            lookup and ``drafts`` alone).
        attention_mask: ``[B, P]`` of 0/1 (1 = real token); None = all real.
        max_new_tokens: per-row budget, > 0.
        mode: ``"greedy"``, ``"lossless"`` or ``"clp"``.
        eos_token_id: int or list; None → the model's generation config. A row stops after EOS.
        pad_token_id: fills finished rows; None → the generation config's pad, else EOS, else 0.
        clp_threshold: acceptance probability; None → the heads' saved threshold for the mode.
        policy: ``"clp"`` (the CLP linear layer) or ``"gate"`` (the ~1M-parameter baseline).
        prompt_lookup: lossless mode only: up to this many guesses copied from the context where
            its last tokens occurred before (:mod:`clp_fast.drafts.lookup`), offered beside the heads'
            guesses; 0 disables; None → in lossless mode ``max(k, LOOKUP_WIDTH)`` with heads, ``LOOKUP_WIDTH``
            with ``drafts`` alone (the drafter + lookup pair measured fastest on HumanEval), else 0.
        max_step_tokens: lossless mode: cap on the tokens one forward feeds over all unfinished rows; None or
            0 = no cap. With ``speculation="fixed"`` each row gets ``max(1, max_step_tokens // rows - 1)``
            guesses at most (:data:`MAX_STEP_TOKENS` is the measured choice for the 2-core CPU); with
            ``"adaptive"`` it bounds what the cost model may choose. Only speed changes, never the output.
        speculation: lossless mode: ``"adaptive"`` (default) feeds each step the guesses, over all rows, that
            raise the batch's expected tokens per second given the measured cost of a forward here
            (:mod:`clp_fast.engine.speculation`): a compute-bound batch falls back to one token per row and speculates
            again as rows finish; ``"fixed"`` feeds every guess the CLP takes, up to ``max_step_tokens``.
        cost_model: adaptive speculation's forward cost (:class:`clp_fast.engine.cost.StepCost`); None → measured
            once per model on this machine (a few forwards, cached in the process and on disk) and refined
            from this call's own steps.
        return_stats: also return a :class:`DecodeStats`.
        max_cache_bytes: refuse (:class:`clp_fast.models.memory.CacheTooLargeError`) a static KV cache larger than this;
            one larger than the memory available on the device is always refused, before it is allocated.
        tree_top_m: lossless mode: draft trees over each head's ``tree_top_m`` best candidates, nodes chosen
            by calibrated expected acceptance (:mod:`clp_fast.engine.tree`; needs heads with a tree calibration);
            1 = the heads' argmax chain beside the lookup branch; None → the heads' calibrated m where their
            calibration makes trees the default (measured per head set), else 1.
        drafts: more draft sources beside the heads and prompt lookup (lossless mode): names registered in
            :data:`clp_fast.drafts.REGISTRY` or :class:`clp_fast.drafts.DraftSource` factories
            ``f(bb, heads, calib) -> DraftSource``; their guesses join the same trees and cost model.
        streamer: batch 1 only: ``put(prompt)``, one ``put`` per step with the kept tokens, ``end()``
            (transformers' protocol; see :mod:`clp_fast.engine.streaming`).

    Returns:
        ``[B, P + G]`` int64: the input followed by up to G generated tokens per row, finished
        rows padded with ``pad_token_id`` (the shape transformers' ``generate`` returns); with
        ``return_stats`` a tuple ``(ids, stats)``.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    bb = NativeBackbone(model)
    heads = _resolve_heads(model, heads, mode, drafts)
    threshold = _threshold(heads, mode, policy, clp_threshold)
    if prompt_lookup is None:
        prompt_lookup = _default_lookup(heads, drafts) if mode == "lossless" else 0
    _check_inputs(model, bb, heads, input_ids, attention_mask, max_new_tokens, mode, policy, threshold, prompt_lookup,
                  max_step_tokens)
    _check_speculation(speculation, cost_model)
    streaming.check_streamer(streamer, input_ids.shape[0])
    calib, top_m = _tree_setup(heads, mode, tree_top_m)
    adaptive = mode == "lossless" and speculation == "adaptive"
    verifier = (ChainVerifier if mode == "clp" else ArgmaxVerifier)(
        bb, heads, mode, policy, threshold, top_m, fuse_all=backend.backend_for(input_ids.device) == "triton")
    sources = _sources(bb, heads, mode, policy, threshold, calib, top_m, prompt_lookup, adaptive, drafts)
    cost = (cost_model or step_cost(bb)) if adaptive else StepCost.flat()
    speculator = Speculator([k for s in sources for k in s.kinds], input_ids.shape[0], cost,
                            max_step_tokens if mode == "lossless" else None, adaptive, len(sources))
    plan = _plan(model, bb, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, max_cache_bytes,
                 verifier, sources, speculator, streamer)
    stats = DecodeStats(mode=mode, accept_hist=[0] * (plan.width + 1))
    result = run(plan, stats)
    if adaptive:
        stats.cost_model = cost.to_dict()
    stats.wall_time_s = time.perf_counter() - t0
    return (result, stats) if return_stats else result


@torch.inference_mode()
def generate_processed(
    model,
    input_ids: torch.Tensor,
    heads: MTPHeads | None | bool = None,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    mode: str = "lossless",
    logits_processor=None,
    stopping_criteria=None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    prompt_lookup: int | None = None,
    max_step_tokens: int | None = MAX_STEP_TOKENS,
    return_stats: bool = False,
    speculation: str = "fixed",
    drafts: list | None = None,
):
    """Greedy or lossless-sampled decoding of a left-padded batch through logits processors.

    Args mirror :func:`clp_fast.generate`, plus:
        logits_processor: callables ``(input_ids [R, L], scores [R, V]) -> scores`` (a transformers
            ``LogitsProcessorList`` — temperature / top-k / top-p warpers included — or a list), applied
            at every accepted tree node with its own prefix ``L`` tokens (left padding included).
        stopping_criteria: callables ``(input_ids [R, L], None) -> [R] bool``, checked after each token.
        do_sample: draw from the processed distribution (lossless speculative sampling, see
            :mod:`clp_fast.engine.sampling`) instead of taking its argmax.
        generator: the ``torch.Generator`` for every random draw (None: torch's global RNG, so
            ``torch.manual_seed`` makes runs repeatable).
        streamer: batch 1 only: ``put(prompt)``, then one ``put`` per step with the kept tokens, then
            ``end()`` (also when decoding raises, so a consumer never waits forever).
        speculation: ``"fixed"`` (default: every guess up to ``max_step_tokens``) or ``"adaptive"`` (the cost
            model, as in :func:`clp_fast.generate`; it then learns the step's cost with the processors in it).
        drafts: more draft sources, as :func:`clp_fast.generate` takes them.
        mode: ``"greedy"`` or ``"lossless"`` (``"clp"`` accepts guesses unverified: not lossless).

    Returns:
        ``[B, P + G]`` int64 like :func:`clp_fast.generate`; with ``return_stats`` ``(ids, DecodeStats)``.
    """
    t0 = time.perf_counter()
    if mode not in PROCESSED_MODES:
        raise ValueError(f"mode={mode!r} is not one of {PROCESSED_MODES}: sampling, logits processors and stopping "
                         f"criteria need verified guesses (mode 'clp' accepts them unverified)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    bb = NativeBackbone(model)
    heads = _resolve_heads(model, heads, mode, drafts) if mode == "lossless" else None
    threshold = heads.thresholds.get("lossless", 0.0) if heads is not None else 0.5
    if prompt_lookup is None:
        prompt_lookup = _default_lookup(heads, drafts) if mode == "lossless" else 0
    _check_inputs(model, bb, heads, input_ids, attention_mask, max_new_tokens, mode, "clp", threshold, prompt_lookup,
                  max_step_tokens)
    _check_speculation(speculation, None)
    streaming.check_streamer(streamer, input_ids.shape[0])
    calib, top_m = _tree_setup(heads, mode, None)  # top-m trees where the heads carry a tree calibration
    adaptive = mode == "lossless" and speculation == "adaptive"
    lm_head = model.get_output_embeddings() if bb.step is None else bb.step.lm_head  # the packed one on CPU/bf16
    verifier = SamplingVerifier(lm_head, list(logits_processor or []), do_sample, generator)
    sources = _sources(bb, heads, mode, "clp", threshold, calib, top_m, prompt_lookup, adaptive, drafts)
    speculator = Speculator([k for s in sources for k in s.kinds], input_ids.shape[0],
                            step_cost(bb) if adaptive else StepCost.flat(), max_step_tokens, adaptive, len(sources))
    plan = _plan(model, bb, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, None, verifier,
                 sources, speculator, streamer, list(stopping_criteria or []))
    stats = DecodeStats(mode=mode, accept_hist=[0] * (plan.width + 1))
    result = run(plan, stats)
    stats.wall_time_s = time.perf_counter() - t0
    return (result, stats) if return_stats else result


def _resolve_heads(model, heads: MTPHeads | None | bool, mode: str, drafts: list | None) -> MTPHeads | None:
    """The heads to decode with: the caller's, else the shipped ones for a known backbone (not in greedy mode);
    ``False``: none (lossless decoding from prompt lookup and ``drafts=`` alone; clp mode from one draft source's
    own CLP)."""
    if heads is False:
        if mode == "clp" and not drafts:
            raise ValueError("heads=False: mode='clp' needs MTP heads or a drafts=[...] source with its own CLP "
                             "(a CLP decides what to take)")
        return None
    if heads is not None and not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTPHeads or None, got {type(heads).__name__}")
    if heads is None and mode != "greedy":
        heads = default_heads_for(model)
    if heads is None and mode == "clp" and not drafts:
        raise ValueError(f"mode={mode!r} needs MTP heads (heads=None only works with mode='greedy' or 'lossless')")
    return heads


def _threshold(heads: MTPHeads | None, mode: str, policy: str, clp_threshold: float | None) -> float:
    """The policy's acceptance probability: the caller's, else the heads' saved one for the mode."""
    if clp_threshold is not None or (heads is None and mode == "clp"):
        return clp_threshold  # clp mode from a draft source: None is the source's own threshold
    if heads is not None and policy == "gate":
        return heads.thresholds.get("gate", 0.9)
    return heads.thresholds.get(mode, 0.9) if heads is not None and mode != "greedy" else 0.5


def _check_speculation(speculation: str, cost_model) -> None:
    if speculation not in SPECULATION:
        raise ValueError(f"speculation={speculation!r} is not one of {SPECULATION}")
    if cost_model is not None and not isinstance(cost_model, StepCost):
        raise TypeError(f"cost_model must be a clp_fast.engine.cost.StepCost or None, got {type(cost_model).__name__}")


def _default_lookup(heads, drafts) -> int:
    """Prompt lookup's width when the caller leaves it to us (lossless mode): beside any other draft source."""
    if heads is not None:
        return max(heads.k, LOOKUP_WIDTH)
    return LOOKUP_WIDTH if drafts else 0


def _sources(bb, heads, mode, policy, threshold, calib, top_m, prompt_lookup, adaptive, drafts) -> list:
    """This call's draft sources: prompt lookup, the MTP heads, then the caller's ``drafts``."""
    tables = calib or (heads.tree_calibration if heads is not None else None)
    sources = [PromptLookup(prompt_lookup, tables)] if prompt_lookup else []
    if heads is not None and mode != "greedy":
        sources.append(HeadsSource(bb, heads, mode, policy, threshold, tables, top_m, all_heads=adaptive,
                                   worth=HeadsWorth() if adaptive else None))
    if drafts and mode == "clp":
        return _unverified(sources, heads, make_sources(drafts, bb, heads, tables), threshold)
    if drafts and mode != "lossless":
        raise ValueError(f"drafts={drafts!r} need mode='lossless' (their guesses must be verified), got {mode!r}")
    return sources + make_sources(drafts or [], bb, heads, tables)


def _unverified(sources: list, heads, drafts: list, threshold: float | None) -> list:
    """clp mode from ``drafts``: one source and nothing beside it, keeping what its own CLP takes at ``threshold``."""
    if heads is not None or sources or len(drafts) != 1:
        raise ValueError(f"mode='clp' with drafts keeps one source's chain unverified: pass heads=False, "
                         f"prompt_lookup=0 and one drafts=[...] entry (got heads={'yes' if heads else 'no'}, "
                         f"prompt lookup {'on' if sources else 'off'}, {len(drafts)} draft source(s))")
    drafts[0].unverified(threshold)
    return drafts


def _plan(model, bb, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, max_cache_bytes, verifier,
          sources, speculator, streamer, criteria=None) -> Plan:
    """The unpadded prompts, EOS and pad ids and a static cache with room for the deepest guess, as a Plan."""
    width = max([s.max_depth for s in sources] + [0])
    prompts, prompt_len, eos, pad_token_id, cache = _start(model, bb, input_ids, attention_mask, max_new_tokens,
                                                           width, eos_token_id, pad_token_id, max_cache_bytes)
    return Plan(bb, cache, input_ids, prompts, prompt_len, max_new_tokens, eos, pad_token_id, verifier, sources,
                speculator, criteria or [], streamer, width)
