"""Streamer calls shared by the decode loops, with transformers' streamer protocol.

transformers' ``generate`` puts the prompt first (``TextStreamer(skip_prompt=True)`` relies on it),
then the new tokens, then calls ``end()`` once; its assisted decoding puts all tokens accepted in a
step at once. The loops here do the same: one ``put`` per step with that step's kept tokens.
"""

from __future__ import annotations

import torch

__all__ = ["check_streamer", "put_prompt", "put_tokens", "end"]


def check_streamer(streamer, batch_size: int) -> None:
    """Raise unless ``streamer`` is None or has ``put``/``end`` and the batch has one row."""
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    if batch_size != 1:
        raise ValueError(f"streamer= supports batch size 1 only (as in transformers), got batch size {batch_size}")


def put_prompt(streamer, input_ids: torch.Tensor) -> None:
    """The prompt ``[1, P]``, as transformers' ``generate`` puts it first."""
    if streamer is not None:
        streamer.put(input_ids.cpu())


def put_tokens(streamer, fed: torch.Tensor, cnt: torch.Tensor) -> None:
    """Row 0's first ``cnt[0]`` tokens of ``fed [1, T]`` (nothing when it keeps none)."""
    if streamer is not None and int(cnt[0]) > 0:
        streamer.put(fed[0, : int(cnt[0])].cpu())


def end(streamer) -> None:
    if streamer is not None:
        streamer.end()
