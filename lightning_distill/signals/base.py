"""The seam between a method and its teacher: a method asks a :class:`TeacherSignal` for the teacher's signal of a
batch and does not care which source answers (DESIGN.md §4).

A source answers the questions it can and raises a ``ValueError`` naming the setting to change for the others:

- :meth:`TeacherSignal.distribution`: the teacher's next-token distribution at every position (soft methods), as
  full logits (B, T, V), :class:`TeacherHidden` (final hidden states + output head, projected chunk by chunk by
  the loss) or :class:`~lightning_distill.sparse.SparseTargets` (a few ids per position, from a store);
- :meth:`TeacherSignal.picks`: the teacher's chosen next token at every position (B, T) (token-level hard KD);
- :meth:`TeacherSignal.continuations`: the teacher's continuations (B, N) of prompts (sequence-level hard KD);
- :meth:`TeacherSignal.token_logprobs`: the teacher's log-prob of each token of a sequence (B, T) (on-policy);
- :meth:`TeacherSignal.validation_metrics`: ``kl`` / ``agreement`` / ``teacher_ce`` for the validation metrics.

A new kind of signal is one file in this package: a subclass that answers some of these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from lightning_distill.sparse import SparseTargets

if TYPE_CHECKING:
    from lightning_distill.generation import GenerationSettings
    from lightning_distill.modules.base import DistillModule

Batch = dict[str, Any]  # input_ids (B, T), labels (B, T), block_idx (B,); left-padded: attention_mask, position_ids


def padding_of(batch: Batch) -> dict[str, Tensor]:
    """The ``attention_mask`` and ``position_ids`` of a batch of left-padded sequences (empty when unpadded)."""
    return {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}


@dataclass(frozen=True)
class TeacherHidden:
    """The teacher's final hidden states with its output head: its logits, made only where the loss needs them.

    Attributes:
        hidden: (B, T, H_t) hidden states after the teacher's final norm.
        head: the teacher's output layer (V, H_t).
    """

    hidden: Tensor
    head: nn.Module

    def __getitem__(self, index: object) -> TeacherHidden:
        return replace(self, hidden=self.hidden[index])

    def logits(self) -> Tensor:
        """The full logits (..., V): what the unchunked loss and validation use."""
        return self.head(self.hidden)


Distribution = Tensor | TeacherHidden | SparseTargets
"""The teacher's next-token distribution of a batch, aligned with ``input_ids`` (position t predicts t + 1)."""


class TeacherSignal:
    """A source of the teacher's signal. Subclasses answer the questions their source can.

    The methods receive the module (its ``teacher``, ``tokenizer``, ``device``) and the batch; ``split`` is
    ``"train"`` or ``"validation"`` (a store keeps the two apart).
    """

    #: the module must load and keep its teacher model for this source
    needs_teacher: ClassVar[bool] = True

    def setup(self, module: DistillModule, stage: str) -> None:
        """Open and check whatever the source reads (called from the module's ``setup``)."""

    def distribution(self, module: DistillModule, batch: Batch, split: str = "train") -> Distribution:
        """The teacher's next-token distribution at every position of ``batch["input_ids"]``."""
        raise ValueError(f"{type(self).__name__} holds no teacher distribution: {self.cannot('distribution')}")

    def picks(self, module: DistillModule, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's chosen next token at every position: (B, T) long."""
        raise ValueError(f"{type(self).__name__} holds no per-position picks: {self.cannot('picks')}")

    def continuations(self, module: DistillModule, batch: Batch, prompt_tokens: int,
                      settings: GenerationSettings, split: str = "train") -> Tensor:
        """The teacher's continuations (B, N) of each block's first ``prompt_tokens`` tokens."""
        raise ValueError(f"{type(self).__name__} holds no continuations: {self.cannot('continuations')}")

    def token_logprobs(self, module: DistillModule, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's log-prob of each next token of ``batch["input_ids"]``: (B, T), position t scoring token
        t + 1 (the last position is meaningless). All that the sampled-token on-policy loss needs."""
        raise ValueError(f"{type(self).__name__} cannot score tokens: {self.cannot('token log-probs')}")

    def validation_metrics(self, module: DistillModule, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        """Metrics of the student (logits (B, T-1, V), aligned with ``labels`` (B, T-1)) against the teacher,
        among ``kl``, ``agreement`` and ``teacher_ce``; empty when the source has nothing for this loader."""
        return {}

    def cannot(self, question: str) -> str:
        """How to get an answer to ``question`` elsewhere (the end of the error message)."""
        return "use a live teacher (labels=None)"

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this source to go on exactly (kept in the module's checkpoint); most
        sources hold nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called when a checkpoint is loaded)."""
