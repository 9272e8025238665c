"""Train MTP heads, the CLP and the gate baseline for a frozen backbone, on CPU, by self-distillation.

Pipeline (each stage resumable; one module per question):

1. :mod:`~clp_fast.train.plan` -- which token sequences: windows and prompts cut from local source
   code, split by file into training and held-out parts.
2. :mod:`~clp_fast.train.build` / :mod:`~clp_fast.train.shards` -- hidden states, argmaxes and the
   backbone's top-k soft targets of every sequence, in atomic, checked safetensors shards.
3. :mod:`~clp_fast.train.fit` / :mod:`~clp_fast.train.losses` -- the heads, fitted by cross-entropy,
   top-k distillation (KL) and/or logit-space regression.
4. :mod:`~clp_fast.train.policies` -- the CLP and gate, fitted on decode-time features of held-out data.
5. :mod:`~clp_fast.train.card` -- the training card; :mod:`~clp_fast.train.evaluate` -- HumanEval-style
   evaluation of trained heads; :mod:`~clp_fast.train.cli` -- ``clp-fast train``.
"""

from clp_fast.train.api import train_heads
from clp_fast.train.config import CKPT_NAME, PLAN_NAME, RUN_MARKER, TrainConfig

__all__ = ["TrainConfig", "train_heads", "evaluate_heads", "add_train_arguments", "run_train", "train_main",
           "RUN_MARKER", "CKPT_NAME", "PLAN_NAME"]


def __getattr__(name):  # the evaluation and CLI pull in more of the engine; load them on first use
    if name == "evaluate_heads":
        from clp_fast.train.evaluate import evaluate_heads

        return evaluate_heads
    if name in ("add_train_arguments", "run_train", "train_main"):
        from clp_fast.train import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'clp_fast.train' has no attribute {name!r}")
