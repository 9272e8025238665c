"""transformers integration: ``model.generate(..., custom_generate=clp_fast.hf.generate)`` and
``clp_fast.patch(model)`` / ``clp_fast.unpatch(model)``.

transformers' ``generate`` does the preparation (generation config, logits processors — temperature,
top-k/top-p, repetition penalty, min_new_tokens, ... — and stopping criteria) and then calls a
``custom_generate`` callable with ``model, input_ids, logits_processor, stopping_criteria,
generation_config`` and the model kwargs. :func:`generate` decodes with them: greedy without
processors through :func:`clp_fast.engine.generate` (the engine's own fused argmax), everything else
through :func:`clp_fast.engine.generate_processed` (processors at every accepted tree node with its
own prefix, lossless speculative sampling). Settings it cannot honour raise ``ValueError`` naming them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys

import torch

from clp_fast import engine
from clp_fast.assets import default_heads_for
from clp_fast.engine import MAX_STEP_TOKENS, MODES, generate_processed
from clp_fast.heads import MTPHeads
from clp_fast.models.native import NativeBackbone

__all__ = ["generate", "patch", "unpatch", "is_patched"]

# (attribute, is it unsupported?) on the generation config.
_UNSUPPORTED = (
    ("num_beams", lambda v: v is not None and v > 1),
    ("num_return_sequences", lambda v: v is not None and v > 1),
    ("num_beam_groups", lambda v: v is not None and v > 1),
    ("penalty_alpha", lambda v: v is not None and v > 0),
    ("prompt_lookup_num_tokens", lambda v: v is not None),
    ("assistant_early_exit", lambda v: v is not None),
    ("dola_layers", lambda v: v is not None),
    ("guidance_scale", lambda v: v is not None and v != 1),
    ("constraints", lambda v: bool(v)),
    ("force_words_ids", lambda v: bool(v)),
    ("output_scores", lambda v: bool(v)),
    ("output_logits", lambda v: bool(v)),
    ("output_attentions", lambda v: bool(v)),
    ("output_hidden_states", lambda v: bool(v)),
)
# Processors that couple rows (they index per-batch state by row) or call the model themselves: applied per
# tree node on a subset of rows they would be wrong, so they are refused by name.
_ROW_COUPLED = ("PrefixConstrainedLogitsProcessor", "EncoderRepetitionPenaltyLogitsProcessor",
                "EncoderNoRepeatNGramLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor",
                "UnbatchedClassifierFreeGuidanceLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor",
                "AlternatingCodebooksLogitsProcessor", "BarkEosPrioritizerLogitsProcessor",
                "WhisperTimeStampLogitsProcessor", "WhisperNoSpeechDetection")
_MODEL_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "past_key_values", "cache",
                 "cache_position", "output_attentions", "output_hidden_states")
_PATCH_ATTR = "_clp_fast_patch"


class _PromptAlreadySent:
    """A streamer whose prompt transformers' ``generate`` has already put: the first ``put`` is dropped."""

    def __init__(self, streamer):
        self.streamer, self.first = streamer, True

    def put(self, value):
        if self.first:
            self.first = False
            return
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def _dropped_by_transformers() -> tuple[object, object]:
    """``(streamer, assistant_model)`` from the calling transformers ``generate``, which (5.x) replaces its
    mode kwargs by the custom callable's own and so passes neither on; read here so that a streamer still
    streams and an assistant model is refused rather than silently ignored. (None, None) otherwise."""
    frame = sys._getframe(2)
    if frame.f_code.co_name != "generate" or not frame.f_code.co_filename.endswith("utils.py") \
            or "generation" not in frame.f_code.co_filename:
        return None, None
    return frame.f_locals.get("streamer"), frame.f_locals.get("assistant_model")


def _check_config(gc) -> None:
    for name, bad in _UNSUPPORTED:
        value = getattr(gc, name, None)
        if bad(value):
            raise ValueError(f"{name}={value!r} is not supported by clp_fast (greedy and sampling only)")
    get_mode = getattr(gc, "get_generation_mode", None)
    if get_mode is not None:
        gm = getattr(get_mode(), "value", str(get_mode()))
        if gm not in ("greedy_search", "sample"):
            raise ValueError(f"generation mode {gm!r} is not supported by clp_fast (greedy and sampling only)")
    if gc.max_length is None:
        raise ValueError("generation_config.max_length is None: pass max_new_tokens or max_length")


def _check_model_kwargs(model_kwargs: dict) -> None:
    for name, value in model_kwargs.items():
        if name not in _MODEL_KWARGS:
            raise ValueError(f"{name}= is not supported by clp_fast's generate (it decodes from input_ids only)")
        if name in ("past_key_values", "cache") and value is not None:
            length = value.get_seq_length() if hasattr(value, "get_seq_length") else None
            if length != 0:
                raise ValueError(f"{name}= with cached tokens is not supported: clp_fast prefills its own cache")
        if name in ("output_attentions", "output_hidden_states") and value:
            raise ValueError(f"{name}={value!r} is not supported by clp_fast")


def _check_processors(procs) -> None:
    for proc in procs:
        name = type(proc).__name__
        if name in _ROW_COUPLED:
            raise ValueError(f"logits processor {name} is not supported by clp_fast: it couples batch rows or "
                             f"calls the model, so it cannot be applied per draft-tree node")


def _token_list(gc, tensor_attr: str, attr: str) -> list[int] | None:
    value = getattr(gc, tensor_attr, None)
    value = getattr(gc, attr, None) if value is None else value.flatten().tolist()
    if value is None:
        return None
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _engine_handles(criteria, gc, eos: list[int] | None) -> bool:
    """Whether the stopping criteria are only the budget and EOS that :func:`clp_fast.engine.generate` applies."""
    for c in criteria:
        name = type(c).__name__
        if name == "MaxLengthCriteria" and c.max_length == gc.max_length:
            continue
        if name == "EosTokenCriteria" and eos is not None and sorted(c.eos_token_id.flatten().tolist()) == sorted(eos):
            continue
        return False
    return True


def generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None, generation_config=None,
             heads: MTPHeads | None = None, mode: str = "lossless", prompt_lookup: int | None = None,
             max_step_tokens: int | None = None, speculation: str = "adaptive", clp_streamer=None, **model_kwargs):
    """A ``custom_generate`` callable: ``model.generate(ids, custom_generate=clp_fast.hf.generate, heads=...,
    mode=..., max_new_tokens=..., do_sample=..., ...)``.

    Args:
        model: the Qwen2 / Llama causal LM ``generate`` was called on.
        input_ids: ``[B, P]`` prompt ids, left-padded (transformers' prepared ``input_ids``).
        logits_processor, stopping_criteria, generation_config: as prepared by transformers' ``generate``.
        heads, mode, prompt_lookup, max_step_tokens, speculation: as in :func:`clp_fast.generate` (``mode="clp"``
            only without sampling, logits processors and stopping criteria beyond the budget and EOS; the
            processed path -- sampling, processors -- speculates with the fixed policy, capped at
            ``MAX_STEP_TOKENS`` unless ``max_step_tokens`` says otherwise).
        clp_streamer: the streamer when called through :func:`patch` (transformers does not hand
            ``streamer=`` to custom callables; a streamer given to a plain ``model.generate`` call is read
            from its frame).
        model_kwargs: ``attention_mask`` (and the position / cache kwargs transformers adds, unused).

    Returns:
        ``[B, P + G]`` int64 sequences, or a ``GenerateDecoderOnlyOutput`` with ``sequences`` when
        ``return_dict_in_generate=True``.
    """
    streamer, assistant = _dropped_by_transformers()
    if assistant is not None:
        raise ValueError("assistant_model= is not supported by clp_fast: it drafts with its own heads")
    if clp_streamer is not None:
        streamer = clp_streamer
    elif streamer is not None:
        streamer = _PromptAlreadySent(streamer)
    gc = generation_config if generation_config is not None else model.generation_config
    _check_config(gc)
    _check_model_kwargs(model_kwargs)
    procs, criteria = list(logits_processor or []), list(stopping_criteria or [])
    _check_processors(procs)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    P = input_ids.shape[1]
    max_new_tokens = gc.max_length - P
    if max_new_tokens <= 0:
        raise ValueError(f"max_length={gc.max_length} leaves no new tokens after the {P}-token prompt")
    eos = _token_list(gc, "_eos_token_tensor", "eos_token_id")
    pad = _token_list(gc, "_pad_token_tensor", "pad_token_id")
    pad = pad[0] if pad else (eos[0] if eos else 0)
    common = dict(attention_mask=model_kwargs.get("attention_mask"), max_new_tokens=max_new_tokens, mode=mode,
                  eos_token_id=eos or [], pad_token_id=pad, prompt_lookup=prompt_lookup,
                  streamer=streamer)
    if not gc.do_sample and not procs and _engine_handles(criteria, gc, eos):
        out = engine.generate(model, input_ids, heads, max_step_tokens=max_step_tokens, speculation=speculation,
                              **common)
    else:
        cap = MAX_STEP_TOKENS if max_step_tokens is None else max_step_tokens
        out = generate_processed(model, input_ids, heads, logits_processor=procs, stopping_criteria=criteria,
                                 do_sample=bool(gc.do_sample), max_step_tokens=cap, **common)
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out)
    return out


# ---------------------------------------------------------------------------------------------- patch
def is_patched(model) -> bool:
    return hasattr(model, _PATCH_ATTR)


def patch(model, heads: MTPHeads | None = None, mode: str = "lossless", **options):
    """Make ``model.generate(...)`` decode through clp_fast (streamer included); returns ``model``.

    Args:
        model: a loaded Qwen2 / Llama causal LM (changed in place: an instance-level ``generate``).
        heads: :class:`MTPHeads` (None: the shipped heads for a known backbone, unless ``mode="greedy"``).
        mode: ``"lossless"`` (default), ``"greedy"`` or ``"clp"``.
        options: defaults for ``prompt_lookup`` / ``max_step_tokens`` / ``speculation``; per-call kwargs override
            all of these.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if heads is not None and not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTPHeads or None, got {type(heads).__name__}")
    unknown = set(options) - {"prompt_lookup", "max_step_tokens", "speculation"}
    if unknown:
        raise ValueError(f"unknown patch options {sorted(unknown)}: only prompt_lookup, max_step_tokens, speculation")
    NativeBackbone(model)  # an unsupported architecture fails here, not at the first generate
    if heads is None and mode != "greedy":
        heads = default_heads_for(model)
    if heads is not None:
        heads.check_compatible(model)
    if is_patched(model):
        unpatch(model)
    defaults = dict(heads=heads, mode=mode, **options)
    previous = model.__dict__.get("generate")  # an instance-level generate set before us, if any

    @functools.wraps(type(model).generate)
    def patched_generate(*args, **kwargs):
        return _patched_generate(model, defaults, args, kwargs)

    model.generate = patched_generate
    setattr(model, _PATCH_ATTR, {"previous": previous})
    return model


def unpatch(model):
    """Undo :func:`patch` (``ValueError`` if ``model`` is not patched); returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by clp_fast.patch")
    previous = getattr(model, _PATCH_ATTR)["previous"]
    delattr(model, _PATCH_ATTR)
    del model.generate
    if previous is not None:
        model.generate = previous
    return model


def _patched_generate(model, defaults: dict, args: tuple, kwargs: dict):
    """transformers' ``generate`` with ``custom_generate=generate``; the streamer and stop strings, which it
    would not hand to a custom callable, are passed on here."""
    bound = inspect.signature(type(model).generate).bind(model, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {})
    if arguments.get("custom_generate") is not None:
        raise ValueError("custom_generate= on a model patched by clp_fast: call clp_fast.unpatch(model) first")
    if arguments.get("assistant_model") is not None:
        raise ValueError("assistant_model= is not supported by clp_fast: it drafts with its own heads")
    streamer = arguments.pop("streamer", None)
    _move_stop_strings(model, arguments, extra)
    for key, value in defaults.items():
        extra.setdefault(key, value)
    return type(model).generate(model, **arguments, custom_generate=generate, clp_streamer=streamer, **extra)


def _move_stop_strings(model, arguments: dict, extra: dict) -> None:
    """Stop strings become an explicit ``StopStringCriteria``: transformers builds theirs from the
    ``tokenizer=`` kwarg, which it does not keep for custom callables."""
    gc = arguments.get("generation_config")
    stops = extra.pop("stop_strings", None)
    if stops is None and gc is not None and gc.stop_strings:
        stops, gc = gc.stop_strings, copy.deepcopy(gc)
        gc.stop_strings = None
        arguments["generation_config"] = gc
    if stops is None and model.generation_config.stop_strings:
        stops = model.generation_config.stop_strings
        extra["stop_strings"] = None
    if not stops:
        return
    tokenizer = extra.pop("tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"stop_strings={stops!r} needs tokenizer= (the model's tokenizer)")
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(list(arguments.get("stopping_criteria") or []))
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stops))
    arguments["stopping_criteria"] = criteria
