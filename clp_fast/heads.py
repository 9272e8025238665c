"""Multi-token-prediction heads, the CLP (collocation-length predictor) and the gate baseline.

The backbone's own LM head always emits the next token (Backbone-as-Architect); head ``j``
(1-based) guesses the token ``j`` places after it. Heads are Medusa-1 residual blocks
``z_j = h + SiLU(W_j h + b_j)`` with ``W_j`` zero-initialised, and they share the backbone's
LM-head weight, so all ``k + 1`` logit rows come from one read of it
(:func:`clp_fast.reference.fused_heads`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from clp_fast import backend, files, reference
from clp_fast.drafts.calibration import TreeCalibration

__all__ = ["MTPHeads", "CLP", "GatePolicy", "lm_head_fingerprint", "MAX_HEADS"]

MAX_HEADS = 8
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "heads.safetensors"


def lm_head_fingerprint(weight: torch.Tensor) -> str:
    """A short, dtype-independent fingerprint of an LM-head weight ``[V, H]``.

    64 evenly spaced rows, rounded to bf16 (so a bf16 checkpoint loaded as fp32 gives the same
    fingerprint), hashed with sha256.
    """
    V = weight.shape[0]
    idx = torch.linspace(0, V - 1, steps=min(64, V)).long()
    sample = weight.detach()[idx].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(sample).hexdigest()[:16]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_HEADS:
        raise ValueError(f"k={k!r}: the number of MTP heads must be an int in [1, {MAX_HEADS}]")


class CLP(nn.Module):
    """Collocation-length predictor: one ``nn.Linear(H + k, k)`` over ``[h, conf_1..conf_k]``.

    Acceptance logit ``j`` says "heads 1..j are all right"; the accept length is the longest
    prefix whose sigmoid is at least ``threshold``. ``(H + k) * k + k`` parameters.
    """

    def __init__(self, hidden_size: int, k: int):
        super().__init__()
        _check_k(k)
        self.k = k
        self.linear = nn.Linear(hidden_size + k, k)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logits(self, hidden: torch.Tensor, head_conf: torch.Tensor) -> torch.Tensor:
        """``hidden [R, H]``, ``head_conf [R, k]`` → acceptance logits ``[R, k]`` (fp32)."""
        feats = torch.cat([hidden.float(), head_conf.float()], dim=-1)
        return F.linear(feats, self.linear.weight.float(), self.linear.bias.float())

    def accept_lengths(self, hidden: torch.Tensor, head_conf: torch.Tensor, threshold: float) -> torch.Tensor:
        """``[R]`` int64 accept lengths in ``[0, k]`` (same rule as the fused kernel)."""
        return reference.clp_accept_lengths(hidden, head_conf, self.linear.weight, self.linear.bias, threshold)


class GatePolicy(nn.Module):
    """The prior-work baseline: a ~1M-parameter gate MLP ``H → 1024 → k`` with the CLP's interface.

    It sees the hidden state only (the heads' confidences are accepted and ignored), as the gate
    networks the paper compares against do.
    """

    def __init__(self, hidden_size: int, k: int, width: int = 1024):
        super().__init__()
        _check_k(k)
        self.k = k
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, k))

    def logits(self, hidden: torch.Tensor, head_conf: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [R, H]`` → acceptance logits ``[R, k]`` (fp32)."""
        x = hidden.float()
        for layer in self.net:
            x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
        return x

    def accept_lengths(self, hidden: torch.Tensor, head_conf: torch.Tensor | None, threshold: float) -> torch.Tensor:
        """``[R]`` int64 accept lengths in ``[0, k]``: longest prefix with sigmoid ≥ ``threshold``."""
        ok = torch.sigmoid(self.logits(hidden)) >= threshold
        return ok.long().cumprod(dim=-1).sum(dim=-1)


class MTPHeads(nn.Module):
    """k MTP heads plus their CLP (and optionally the gate baseline), tied to one backbone.

    Args:
        hidden_size: the backbone's H.
        vocab_size: the backbone's LM-head rows V.
        k: number of heads, 1..8.
        backbone: a name recorded in the config (informational).
        fingerprint: :func:`lm_head_fingerprint` of the backbone's LM head; loading onto a
            backbone with another fingerprint raises ``ValueError``.
        thresholds: CLP acceptance thresholds per mode, ``{"clp": p, "lossless": p, "gate": p}``.
        with_gate: also hold a :class:`GatePolicy`.
        draft_vocab: the heads' output vocabulary is the LM head's first ``draft_vocab`` rows
            (see :func:`clp_fast.reference.fused_heads`); None = all ``vocab_size``.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        k: int,
        *,
        backbone: str = "",
        fingerprint: str = "",
        thresholds: dict | None = None,
        with_gate: bool = False,
        extra_config: dict | None = None,
        draft_vocab: int | None = None,
    ):
        super().__init__()
        _check_k(k)
        for name, val in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name}={val!r} must be a positive int")
        draft_vocab = vocab_size if draft_vocab is None else draft_vocab
        if isinstance(draft_vocab, bool) or not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= vocab_size:
            raise ValueError(f"draft_vocab={draft_vocab!r} must be an int in [1, vocab_size={vocab_size}]")
        self.k, self.hidden_size, self.vocab_size, self.draft_vocab = k, hidden_size, vocab_size, draft_vocab
        self.backbone, self.fingerprint = backbone, fingerprint
        self.thresholds = {"clp": 0.9, "lossless": 0.0, "gate": 0.9, **(thresholds or {})}
        self.extra_config = dict(extra_config or {})
        self.weight = nn.Parameter(torch.zeros(k, hidden_size, hidden_size))  # zero-init: head j starts as h
        self.bias = nn.Parameter(torch.zeros(k, hidden_size))
        self.clp = CLP(hidden_size, k)
        self.gate = GatePolicy(hidden_size, k) if with_gate else None

    @classmethod
    def for_model(cls, model, k: int, **kwargs) -> MTPHeads:
        """Fresh (zero-initialised) heads shaped for a loaded causal LM ``model``."""
        W = model.get_output_embeddings().weight
        name = kwargs.pop("backbone", getattr(model.config, "_name_or_path", "") or "")
        return cls(W.shape[1], W.shape[0], k, backbone=str(name), fingerprint=lm_head_fingerprint(W), **kwargs)

    def fused(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, threshold: float | None = None,
              *, with_clp: bool = True, top_m: int = 1):
        """:func:`clp_fast.backend.fused_heads` with these heads: ids ``[R, k + 1]``, conf, accept ``[R]``
        (and with ``top_m > 1`` each head's top-m ids and probabilities ``[R, k, m]``)."""
        lin = self.clp.linear if with_clp else None
        return backend.fused_heads(
            hidden, self.weight, self.bias, lm_head_weight, lin.weight if lin else None, lin.bias if lin else None,
            0.5 if threshold is None else threshold, draft_vocab=self.draft_vocab, top_m=top_m,
        )

    def head_rows(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, threshold: float | None = None, *,
                  policy: str | None = "clp", top_m: int = 1):
        """The heads' part of :meth:`fused` for a caller that has the backbone row: ids ``[R, k]``, conf
        ``[R, k]``, accept ``[R]`` (policy ``"clp"``, ``"gate"``, or None: all k), and with ``top_m > 1``
        top ids / probabilities ``[R, k, m]`` (:func:`clp_fast.reference.head_rows`)."""
        ids, conf, *top = reference.head_rows(hidden, self.weight, self.bias, lm_head_weight, self.draft_vocab, top_m)
        t = 0.5 if threshold is None else threshold
        if policy == "clp":
            n = self.clp.accept_lengths(hidden, conf, t)
        elif policy == "gate":
            n = self.gate.accept_lengths(hidden, conf, t)
        else:
            n = torch.full((hidden.shape[0],), self.k, dtype=torch.long, device=hidden.device)
        return (ids, conf, n, *top)

    @property
    def tree_calibration(self):
        """The shipped :class:`clp_fast.drafts.calibration.TreeCalibration` (config ``extra.tree``), or None."""
        table = self.extra_config.get("tree")
        return TreeCalibration.from_dict(table) if table else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [R, H]`` → ``[R, k + 1, H]`` (row 0 is ``hidden``; see reference.head_hidden)."""
        return reference.head_hidden(hidden, self.weight, self.bias)

    def num_parameters_report(self) -> dict:
        """Parameter counts of the heads, the CLP and the gate."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {
            "heads": self.weight.numel() + self.bias.numel(),
            "clp": count(self.clp),
            "gate": count(self.gate),
        }

    def truncated(self, j: int) -> MTPHeads:
        """The first ``j`` heads as their own ``MTPHeads`` (for k-sweeps with one trained set).

        The CLP keeps its hidden-state weights and the weights of heads 1..j's confidences; the
        dropped heads' confidence features are removed, which is an approximation unless the CLP
        was trained with them near-zero-weighted (reported by the benchmark, not hidden).
        """
        _check_k(j)
        if j > self.k:
            raise ValueError(f"cannot take {j} heads from a set of k={self.k}")
        if j == self.k:
            return self
        out = MTPHeads(
            self.hidden_size, self.vocab_size, j, backbone=self.backbone, fingerprint=self.fingerprint,
            thresholds=self.thresholds, with_gate=self.gate is not None, extra_config=self.extra_config,
            draft_vocab=self.draft_vocab,
        ).to(self.weight.device)
        H = self.hidden_size
        with torch.no_grad():
            out.weight.copy_(self.weight[:j])
            out.bias.copy_(self.bias[:j])
            cols = list(range(H)) + [H + i for i in range(j)]
            out.clp.linear.weight.copy_(self.clp.linear.weight[:j, cols])
            out.clp.linear.bias.copy_(self.clp.linear.bias[:j])
            if self.gate is not None:
                out.gate.net[0].load_state_dict(self.gate.net[0].state_dict())
                out.gate.net[2].weight.copy_(self.gate.net[2].weight[:j])
                out.gate.net[2].bias.copy_(self.gate.net[2].bias[:j])
        return out

    def check_compatible(self, model) -> None:
        """Raise ``ValueError`` if these heads were trained for another backbone than ``model``."""
        W = model.get_output_embeddings().weight
        V, H = W.shape
        if H != self.hidden_size:
            raise ValueError(f"heads were trained for hidden size {self.hidden_size}, the model has {H}")
        if V != self.vocab_size:
            raise ValueError(f"heads were trained for vocab size {self.vocab_size}, the model has {V}")
        if self.fingerprint and self.fingerprint != lm_head_fingerprint(W):
            raise ValueError(
                f"heads were trained for another backbone ({self.backbone or 'unnamed'}): LM-head fingerprint "
                f"{self.fingerprint} != the model's {lm_head_fingerprint(W)}"
            )

    # ---------------------------------------------------------------- persistence
    def config_dict(self) -> dict:
        return {
            "format": "clp_fast.mtp_heads/1",
            "k": self.k,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "draft_vocab": self.draft_vocab,
            "backbone": self.backbone,
            "lm_head_fingerprint": self.fingerprint,
            "thresholds": self.thresholds,
            "with_gate": self.gate is not None,
            "parameters": self.num_parameters_report(),
            **({"extra": self.extra_config} if self.extra_config else {}),
        }

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``heads.safetensors`` + ``config.json`` to ``directory`` atomically
        (:func:`clp_fast.files.save_weights`: temp dir, renames, the config naming the weights' sha256).

        Files already in ``directory`` that are not ours are left alone; ours are replaced.
        """
        tensors = {n: (t.detach().to(dtype) if dtype else t.detach()).contiguous().cpu()
                   for n, t in self.state_dict().items()}
        return files.save_weights(directory, tensors, self.config_dict(), WEIGHTS_NAME, CONFIG_NAME,
                                  kill_prefix="heads")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, model=None, dtype=torch.float32,
                        device="cpu") -> MTPHeads:
        """Load heads saved by :meth:`save_pretrained`; with ``model``, check they fit it.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything else
        wrong: unreadable or incomplete config, weights truncated, edited (``weights_sha256`` mismatch) or not
        matching the config's shapes, a NaN / inf weight (naming the tensor, head and row), heads for another
        backbone (LM-head fingerprint, hidden or vocab size).
        """
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"no MTP heads at {directory}: {p.name} is missing")
        heads = _heads_from_config(cls, cfg_path)
        state = _read_weights(w_path, json.loads(cfg_path.read_text()).get("weights_sha256"))
        try:
            heads.load_state_dict({n: t.float() for n, t in state.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not match {cfg_path}: {e}") from e
        heads = heads.to(device=device, dtype=dtype).eval()
        if model is not None:
            try:
                heads.check_compatible(model)
            except ValueError as e:
                raise ValueError(f"{directory}: {e}") from e
        return heads


def _heads_from_config(cls, cfg_path: Path) -> MTPHeads:
    """Fresh heads shaped as ``cfg_path`` says; ``ValueError`` naming the file for a bad or incomplete config."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "clp_fast.mtp_heads/1":
        fmt = cfg.get("format") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{cfg_path}: unknown heads format {fmt!r}")
    try:
        return cls(cfg["hidden_size"], cfg["vocab_size"], cfg["k"], backbone=cfg.get("backbone", ""),
                   fingerprint=cfg.get("lm_head_fingerprint", ""), thresholds=cfg.get("thresholds"),
                   with_gate=cfg.get("with_gate", False), extra_config=cfg.get("extra"),
                   draft_vocab=cfg.get("draft_vocab"))
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e


def _read_weights(w_path: Path, recorded: str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``w_path``, checked against the config's sha256 ``recorded`` (None: heads saved before it was
    recorded) and for NaN / inf, which are named by tensor, head and row."""
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path} is truncated or corrupted: {e}") from e
    actual = files.sha256(w_path) if recorded is not None else None
    if actual != recorded:
        raise ValueError(f"{w_path} is corrupted, edited or from another save: its sha256 {actual} is not the "
                         f"{recorded} recorded in {CONFIG_NAME}")
    for name, t in state.items():
        bad = (~torch.isfinite(t.float())).nonzero()
        if bad.numel():
            where = bad[0].tolist()
            if name in ("weight", "bias", "clp.linear.weight", "clp.linear.bias") and where:
                where = f"head {where[0] + 1}" + (f", row {where[1]}" if len(where) > 1 else "")
            raise ValueError(f"{w_path}: {name} holds NaN or inf at {where} ({bad.shape[0]} such values); the "
                             f"heads were saved from a diverged run -- retrain them")
    return state
