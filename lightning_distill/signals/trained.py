"""A teacher trained beside the student (CoDistill): it learns the real text, and its distribution, detached, is
the student's signal; or that of a frozen copy refreshed every ``stale_every`` optimizer steps (codistillation,
Anil et al. 2018, "Large scale distributed neural network training through online distillation")."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lightning_distill import checks, metrics
from lightning_distill.backbone import Run, freeze
from lightning_distill.signals.base import Batch, TeacherSignal


class TrainedTeacher(TeacherSignal):
    """The module's trained teacher.

    Args:
        stale_every: if > 0, the signal comes from a frozen copy of the teacher refreshed every this many optimizer
            steps; 0 uses the live teacher's logits of the same step, detached.
    """

    def __init__(self, stale_every: int = 0) -> None:
        checks.integer("stale_every", stale_every, ">= 0 (0 = the live teacher)", lambda v: v >= 0, "0")
        self.stale_every = stale_every
        self.stale: torch.nn.Module | None = None  # not a submodule: never optimized or synced; see state_dict
        self._stale_step = -1
        self._stale_state: dict[str, Tensor] | None = None  # restored from a checkpoint, built on first use

    def distribution(self, run: Run, batch: Batch, split: str = "train",
                     live_logits: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) without gradient: ``live_logits`` detached (the teacher's of this step, when the caller
        has them), or the stale copy's."""
        if self.stale_every == 0:
            if live_logits is not None:
                return live_logits.detach()
            with torch.no_grad():
                return run.teacher(input_ids=batch["input_ids"]).logits
        step = run.step
        if self.stale is None and self._stale_state is not None:  # the copy a checkpoint holds
            self.stale = freeze(copy.deepcopy(run.teacher))
            self.stale.load_state_dict(self._stale_state)
            self._stale_state = None
        if self.stale is None or (step % self.stale_every == 0 and self._stale_step != step):
            self.stale = freeze(copy.deepcopy(run.teacher))
            self._stale_step = step
        with torch.no_grad():
            return self.stale(input_ids=batch["input_ids"]).logits

    def state_dict(self) -> dict[str, object]:
        """The stale copy and the step it was taken at, for the checkpoint (a resumed run distils from the same
        copy, not from one rebuilt from the teacher of the resumed step); empty without a stale copy."""
        if self.stale is None and self._stale_state is None:
            return {}
        weights = self.stale.state_dict() if self.stale is not None else self._stale_state
        return {"step": self._stale_step, "weights": {k: v.detach().cpu() for k, v in weights.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s copy (built from the run's teacher when first needed)."""
        if state:
            self.stale, self._stale_step, self._stale_state = None, int(state["step"]), dict(state["weights"])

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher = run.teacher(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
        return metrics.against_logits(student_logits, teacher, labels)
