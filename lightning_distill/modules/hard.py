"""HardDistill: the teacher contributes only its chosen tokens.

- ``mode="top1"`` (token level): at every position of the real text the student is trained with cross-entropy on
  the teacher's arg-max next token (optionally mixed with CE on the real token via ``ce_weight``).
- ``mode="generate"`` (sequence level, :mod:`lightning_distill.modules.sequences`): the teacher continues a prompt
  taken from each block of the corpus, and the student is trained on the teacher's tokens only.

The tokens come from the signal source: a live teacher (continuations kept on disk and reused across epochs and
runs), or with ``labels=PATH`` a label store written once by ``lightning-distill predict``: ``top1`` reads the
teacher's arg-max from a ``top1``, ``topk`` or ``sampled`` store, ``generate`` each block's continuation from a
``generate`` store.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import checks, generation
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.modules.base import DistillModule
from lightning_distill.modules.sequences import TeacherSequences
from lightning_distill.signals import LiveTeacher, StoredLabels
from lightning_distill.sparse import SparseTargets

MODES = ("top1", "generate")


class HardDistill(DistillModule):
    """Hard-label distillation: cross-entropy on tokens the teacher picked.

    Args:
        teacher: teacher model name (see :class:`DistillModule`).
        student: student spec (see :class:`DistillModule`).
        mode: ``"top1"`` (teacher's arg-max at each position of the real text) or ``"generate"`` (teacher
            continuations of corpus prompts).
        ce_weight: ``top1`` only: weight of CE on the real next token, in [0, 1].
        prompt_tokens: ``generate``: the first this-many tokens of each block form the prompt.
        max_new_tokens: ``generate``: length of the teacher's continuation.
        do_sample: ``generate``: sample instead of greedy decoding.
        temperature: ``generate`` with sampling: sampling temperature > 0.
        top_p: ``generate`` with sampling: nucleus mass in (0, 1].
        generations_dir: ``generate``: folder of stored continuations; default under the cache directory, in a
            subfolder keyed by teacher and generation settings.
        labels: folder of a label store to train from instead of a live teacher: ``top1`` / ``topk`` /
            ``sampled`` for ``mode="top1"``, ``generate`` (same ``prompt_tokens`` and ``max_new_tokens``) for
            ``mode="generate"``.
        **kwargs: :class:`DistillModule` arguments.
    """

    def __init__(
        self,
        teacher: str | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        mode: str = "top1",
        ce_weight: float = 0.0,
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generations_dir: str | None = None,
        labels: str | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        checks.number("ce_weight", ce_weight, "in [0, 1]", lambda v: 0 <= v <= 1, "0.0")
        checks.integer("prompt_tokens", prompt_tokens, ">= 1", lambda v: v >= 1, "32")
        self.generation = generation.GenerationSettings(max_new_tokens, do_sample, temperature, top_p)
        signal = StoredLabels(labels) if labels is not None else LiveTeacher(generations_dir)
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.mode = mode
        self.ce_weight = ce_weight
        self.prompt_tokens = prompt_tokens
        self.signal = signal
        #: the sequence-level piece (``mode="generate"``), None at token level
        self.sequences = TeacherSequences(prompt_tokens, self.generation) if mode == "generate" else None

    def check_store(self, manifest: dict[str, Any]) -> None:
        """``top1`` trains from any per-position store; ``generate`` from a generate store of equal settings."""
        kind, where = manifest["kind"], f"labels={self.hparams.labels!r}"
        if (kind == "generate") != (self.mode == "generate"):
            raise ValueError(f"{where} is a {kind!r} store, which mode={self.mode!r} cannot use: "
                             f"set mode={'generate' if kind == 'generate' else 'top1'!r}")
        if self.sequences is not None:
            self.sequences.check_store(manifest)

    def setup(self, stage: str) -> None:
        if self.sequences is not None:
            self.sequences.check_fit(self)
        super().setup(stage)

    def compares_vocabularies(self) -> bool:
        """``top1`` matches the teacher's picks id by id; ``generate`` trains on its continuations only."""
        return self.mode == "top1"

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.sequences is None:
            picks = SparseTargets.from_picks(self.signal.picks(self, batch))  # (B, T, 1): KD is CE on the picks
            parts = self.student_loss(batch["input_ids"], batch["labels"], picks, ce_weight=self.ce_weight)
        else:
            sequences, targets = self.teacher_sequences(batch)  # (B, P + N) each
            parts = self.student_loss(sequences, targets, ce_weight=1.0)
            parts = {"loss": parts["loss"], "kd": parts["ce"], "tokens": parts["tokens"]}
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

    def teacher_sequences(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``generate``: prompts + the teacher's continuations, and their targets (:class:`TeacherSequences`)."""
        return self.sequences.training_batch(self, batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal for the label writer: ``top1`` as every method (logits); ``generate`` its
        continuations (:meth:`TeacherSequences.predict`)."""
        if self.sequences is None:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        return self.sequences.predict(self, batch)

    def label_settings(self) -> dict[str, Any]:
        """The teacher, and in ``generate`` mode the generation settings a store records."""
        extra = {} if self.sequences is None else self.sequences.label_settings()
        return {**super().label_settings(), **extra}
