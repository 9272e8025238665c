"""The draft-source interface: what every source of guesses gives the decode loop, and what it gets back.

A **draft source** proposes, for each decoding row, guesses of the tokens that follow the row's pending
token (the backbone's own next token, always right), each with a **prior**: the probability that it is the
token the backbone will choose, given that its parent is. The loop builds one draft tree per row from all
sources' proposals (:func:`clp_fast.engine.tree.grow`), the cost model picks which nodes one forward
verifies (:class:`clp_fast.engine.speculation.Speculator`), and after the step every source learns what was
accepted (:class:`Accepted`). Sources never see each other; the tree merges guesses they share.

Proposals come in two shapes:

- :class:`Branch`: a chain of guesses, the i-th at depth i + 1 below the pending token (prompt lookup,
  the heads' argmax chain, a datastore's continuation);
- :class:`Layers`: position-wise candidates, any of ``tokens[d]`` may follow any node at depth d (the
  heads' top-m lists: head d + 1 guesses a position, not a path — Medusa's cartesian tree).

Adding a source is one file under ``clp_fast/drafts/`` with a :class:`DraftSource` subclass, plus its entry
in :data:`clp_fast.drafts.REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Branch", "Layers", "Proposal", "Accepted", "DraftSource"]


@dataclass
class Branch:
    """A chain of guesses: ``tokens[i]`` at depth ``i + 1``, ``priors[i]`` its acceptance given its parent's."""

    tokens: list[int]
    priors: list[float]
    kind: str  # which of its source's ``kinds`` (a row's acceptance is tracked per kind)


@dataclass
class Layers:
    """Position-wise candidates: ``tokens[d][i]`` may follow any node at depth ``d``; ``priors`` alike."""

    tokens: list[list[int]]
    priors: list[list[float]]
    kind: str


Proposal = Branch | Layers


@dataclass
class Accepted:
    """One step's outcome as every source sees it, after the prefill and after each verifying forward.

    ``hidden`` is the backbone's final hidden state at the node each row's ``pending`` token follows (the last
    prompt position after the prefill, the deepest accepted node after a step). ``head_rows`` is set where the
    LM-head pass that chose ``pending`` also computed the MTP heads' rows at that node (one read of the weight).
    """

    pending: torch.Tensor  # [B] each row's next token, the root of its next tree
    pending_conf: torch.Tensor | None  # [B] its probability, where the verifier computed it
    hidden: torch.Tensor  # [B, H]
    new_tokens: list[list[int]]  # per row, the tokens committed by this step (the prompt, after the prefill)
    live: list[bool]  # rows still decoding
    head_rows: tuple | None = None  # (ids [B, k], conf [B, k], n [B], *top) from the fused pass
    speculating: bool = True  # whether guesses are being fed (adaptive speculation may find greedy faster)
    step_seconds: float | None = None  # the forward's price by the cost model (adaptive speculation, on the CPU)
    # [B, N, H] the hidden states of ``new_tokens`` (row b's first len(new_tokens[b])), for sources that declare
    # ``wants_path_hidden``: the prompt's positions after the prefill, the accepted path (root first) after a step.
    path_hidden: torch.Tensor | None = None


class DraftSource:
    """Base of every draft source; created per decode call, for its batch.

    Attributes:
        kinds: the kinds of guess it proposes (a :class:`Branch`'s ``kind``); the loop tracks each row's
            acceptance per kind and corrects the priors by it.
        max_depth: the deepest guess it ever proposes (the static cache keeps room for that many more slots).
        wants_path_hidden: whether it reads the committed tokens' hidden states (:attr:`Accepted.path_hidden`).
    """

    kinds: tuple[str, ...] = ()
    max_depth: int = 0
    wants_path_hidden: bool = False  # whether advance() needs Accepted.path_hidden (a drafter reading features)

    def propose(self, live: list[bool]) -> list[list[Proposal]]:
        """Per row, this step's proposals (``[]`` for a row not ``live`` or with nothing to offer)."""
        raise NotImplementedError

    def advance(self, acc: Accepted) -> None:
        """Learn the step's outcome (after the prefill too). Default: nothing."""

    def unverified(self, threshold: float | None) -> None:
        """``mode="clp"``: from now on propose one chain of only the guesses to keep without verification, as the
        source's own accept-length predictor decides at ``threshold`` (None: its own default). Default: raise
        ``ValueError`` -- a source without such a predictor can only be verified."""
        raise ValueError(f"{type(self).__name__} cannot decide which of its guesses to keep unverified "
                         f"(mode='clp'); use mode='lossless'")

    def report(self) -> dict:
        """What this source did in the decode call, for :attr:`clp_fast.engine.loop.DecodeStats.sources` (beside
        the loop's own count of the steps it was asked for guesses and its time). Default: nothing."""
        return {}

    def chosen(self, expected: dict[str, float], total: float) -> None:
        """Adaptive speculation's choice for the step just proposed: expected accepted guesses per kind and in
        all (pending tokens included). Default: nothing."""
