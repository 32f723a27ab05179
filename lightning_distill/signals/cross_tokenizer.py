"""A live teacher whose tokenizer is not the student's: it reads each block as text, in its own tokens.

The blocks are the student's ids (the data module tokenizes with the student's tokenizer, ``run.tokenizer``). For
each block the :class:`~lightning_distill.alignment.Aligner` spells out its text, tokenizes it with the teacher's
tokenizer (document by document, within the block) and finds the spans both tokenizations share; the frozen
teacher then runs on its own ids, under ``no_grad``, and the cross-tokenizer losses
(:mod:`lightning_distill.losses.cross_tokenizer`) compare the two on those spans
(:class:`~lightning_distill.losses.AlignedTeacher`). With the same tokenizer on both sides every span is one token
and the shared vocabulary is all of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_distill.alignment import Aligner
from lightning_distill.backbone import Run, load_tokenizer
from lightning_distill.losses import AlignedTeacher
from lightning_distill.signals.base import Batch, TeacherSignal
from lightning_distill.signals.live import _teacher


class CrossTokenizerTeacher(TeacherSignal):
    """The run's frozen teacher, asked live on its own tokenization of each block.

    Args:
        teacher_tokenizer: the model name whose tokenizer the teacher reads with (the teacher's own name).
    """

    def __init__(self, teacher_tokenizer: str) -> None:
        self.teacher_tokenizer = teacher_tokenizer
        self._aligner: Aligner | None = None
        self._shared: dict[torch.device, Tensor] = {}

    def aligner(self, run: Run) -> Aligner:
        """The aligner of the student's tokenizer (``run.tokenizer``) and the teacher's (made on first use)."""
        if self._aligner is None:
            self._aligner = Aligner(run.tokenizer, load_tokenizer(self.teacher_tokenizer, "teacher"))
        return self._aligner

    def setup(self, run: Run, stage: str, data: object = None) -> None:
        """Load the teacher's tokenizer and check that both tokenizers can be aligned (before any step); labelling
        (``predict``) is refused: a store does not hold a teacher's own tokens yet."""
        if stage == "predict":
            raise ValueError("a teacher with another tokenizer cannot label a store yet (the store would need its "
                             "tokens and their byte spans per block): label with a teacher of the student's "
                             "tokenizer, or train live with loss='uld' or 'gold'")
        self.aligner(run)

    @torch.no_grad()
    def distribution(self, run: Run, batch: Batch, split: str = "train") -> AlignedTeacher:
        """The teacher's logits (B, U, V_t) on its tokens of each block, and the spans it shares with the student's
        tokens (:meth:`~lightning_distill.alignment.Aligner.batch`)."""
        if batch.get("attention_mask") is not None:
            raise ValueError("a cross-tokenizer teacher reads packed blocks of text; left-padded sequences (on-policy "
                             "prompts) are not aligned: set on_policy=None")
        aligner = self.aligner(run)
        device = batch["input_ids"].device
        teacher_ids, spans = aligner.batch(batch["input_ids"].cpu())
        teacher_ids = teacher_ids.to(device)
        if device not in self._shared:
            self._shared[device] = aligner.shared().to(device)
        logits = _teacher(run)(input_ids=teacher_ids).logits  # (B, U, V_t)
        return AlignedTeacher(logits, teacher_ids, spans.to(device), self._shared[device])

    def cannot(self, question: str) -> str:
        return "a teacher with another tokenizer answers only its distribution on the shared spans (SoftDistill)"
