"""An idle teacher off the accelerator: a CE-only run does not hold its teacher there while the student trains.

``SoftDistill(ce_weight=1)`` (off-policy, no feature term) never asks its teacher during a training step; it keeps
one only for the validation metrics (``val/kl``, ``val/agreement``, ``val/teacher_ce``) and to build a
``from_teacher`` student. :class:`IdleTeacherOffload`, which every method adds to its Trainer
(:meth:`DistillModule.configure_callbacks`), moves such a teacher to the CPU when training starts, onto the module's
device for each validation, back to the CPU when training resumes, and onto the device again when the fit ends (as
it was). The accelerator then holds the student, its gradients and optimizer state only. Every other run, and a
sharded (FSDP) teacher, is left where it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from lightning_distill import sharding

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule

IDLE_DEVICE = torch.device("cpu")


def teacher_idle_in_training(module: DistillModule) -> bool:
    """Whether ``module`` holds a frozen, unsharded teacher that its training steps never ask: the method says so
    through its ``teacher_unused_in_training()`` (``SoftDistill`` at ``ce_weight == 1``, off-policy, without a
    feature term); a method without it keeps its teacher where it is."""
    if module.teacher is None or module.trains_teacher or sharding.is_sharded(module):
        return False
    unused = getattr(module, "teacher_unused_in_training", None)
    return bool(unused and unused())


class IdleTeacherOffload(L.Callback):
    """Moves an idle teacher (:func:`teacher_idle_in_training`) off the accelerator while the student trains."""

    def __init__(self) -> None:
        self.active = False  # decided when training starts

    def on_train_start(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
        self.active = teacher_idle_in_training(pl_module)
        self._move(pl_module, IDLE_DEVICE)

    def on_validation_start(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
        self._move(pl_module, pl_module.device)

    def on_validation_end(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._move(pl_module, IDLE_DEVICE)

    def on_fit_end(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
        self._move(pl_module, pl_module.device)
        self.active = False

    def _move(self, module: DistillModule, device: torch.device) -> None:
        if self.active and module.teacher is not None:
            module.teacher.to(device)
