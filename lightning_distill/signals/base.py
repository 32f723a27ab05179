"""The seam between a method and its teacher: a method asks a :class:`TeacherSignal` for the teacher's signal of a
batch and does not care which source answers.

A source is given what it may use, a :class:`~lightning_distill.backbone.Run` (the models, the tokenizer, where the
run stands), never the LightningModule. It answers the questions it can and raises a ``ValueError`` naming the
setting to change for the others:

- :meth:`TeacherSignal.distribution`: the teacher's next-token distribution at every position (soft methods), as
  full logits (B, T, V), :class:`~lightning_distill.losses.TeacherHidden` (final hidden states + output head,
  projected chunk by chunk by the loss) or :class:`~lightning_distill.losses.SparseTargets` (a few ids per
  position, from a store);
- :meth:`TeacherSignal.picks`: the teacher's chosen next token at every position (B, T) (token-level hard KD);
- :meth:`TeacherSignal.continuations`: the teacher's continuations (B, N) of prompts (sequence-level hard KD);
- :meth:`TeacherSignal.token_logprobs`: the teacher's log-prob of each token of a sequence (B, T) (on-policy);
- :meth:`TeacherSignal.validation_metrics`: ``kl`` / ``agreement`` / ``teacher_ce`` for the validation metrics.

A new kind of signal is one file in this package: a subclass that answers some of these.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lightning_distill.backbone import Run
from lightning_distill.generation import GenerationSettings
from lightning_distill.losses import AlignedTeacher, SparseTargets, TeacherHidden

Batch = dict[str, Any]  # input_ids (B, T), labels (B, T), block_idx (B,); left-padded: attention_mask, position_ids

Distribution = Tensor | TeacherHidden | SparseTargets | AlignedTeacher
"""The teacher's next-token distribution of a batch, aligned with ``input_ids`` (position t predicts t + 1); a
teacher with another tokenizer: on its own tokens, with the spans both share (:class:`AlignedTeacher`)."""


class TeacherSignal:
    """A source of the teacher's signal. Subclasses answer the questions their source can; ``split`` is
    ``"train"`` or ``"validation"`` (a store keeps the two apart)."""

    #: the method must load and keep its teacher model for this source
    needs_teacher: ClassVar[bool] = True

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The manifest of the label store the source reads (the method checks its settings against it before
        :meth:`setup`); ``None`` for a source that reads none."""
        return None

    def stores(self) -> dict[str | None, dict[str, Any]]:
        """The manifests of the label stores the source reads, by the name of the teacher each must come from
        (``None``: the run's teacher); several teachers have one per teacher that reads one."""
        return {} if self.manifest is None else {None: self.manifest}

    def setup(self, run: Run, stage: str, data: Any = None) -> None:
        """Open and check whatever the source reads (``data``: the Trainer's data module, if any)."""

    def teardown(self) -> None:
        """Close whatever :meth:`setup` opened (the module's ``teardown`` calls it when the Trainer is done)."""

    def distribution(self, run: Run, batch: Batch, split: str = "train") -> Distribution:
        """The teacher's next-token distribution at every position of ``batch["input_ids"]``."""
        raise ValueError(f"{type(self).__name__} holds no teacher distribution: {self.cannot('distribution')}")

    def picks(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's chosen next token at every position: (B, T) long."""
        raise ValueError(f"{type(self).__name__} holds no per-position picks: {self.cannot('picks')}")

    def continuations(self, run: Run, batch: Batch, prompt_tokens: int, settings: GenerationSettings,
                      split: str = "train") -> Tensor:
        """The teacher's continuations (B, N) of each block's first ``prompt_tokens`` tokens."""
        raise ValueError(f"{type(self).__name__} holds no continuations: {self.cannot('continuations')}")

    def token_logprobs(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's log-prob of each next token of ``batch["input_ids"]``: (B, T), position t scoring token
        t + 1 (the last position is meaningless). All that the sampled-token on-policy loss needs."""
        raise ValueError(f"{type(self).__name__} cannot score tokens: {self.cannot('token log-probs')}")

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        """Metrics of the student (logits (B, T-1, V), aligned with ``labels`` (B, T-1)) against the teacher,
        among ``kl``, ``agreement`` and ``teacher_ce``; empty when the source has nothing for this loader."""
        return {}

    def metric_tokens(self, batch: Batch, labels: Tensor, dataloader_idx: int) -> dict[str, Tensor]:
        """The valid tokens behind those of :meth:`validation_metrics` that are means over fewer tokens than the
        batch's (several teachers: each over its own rows), by metric name."""
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
