"""SoftDistill: the student matches the teacher's whole next-token distribution (Hinton et al. 2015).

``loss = (1 - ce_weight) * D(p_teacher, p_student; T) + ce_weight * CE(real text)``, with D one of the
divergences in :mod:`lightning_distill.losses`. ``ce_weight=1`` is plain fine-tuning with the teacher unused in
training (the CE-only baseline every comparison needs; the teacher then only serves validation metrics), and
``ce_weight=0`` is pure distillation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import losses
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.modules.base import DistillModule


class SoftDistill(DistillModule):
    """Soft-label (logit) distillation from a live teacher.

    Args:
        teacher: teacher model name (see :class:`DistillModule`).
        student: student spec (see :class:`DistillModule`).
        loss: divergence between teacher and student distributions: ``forward_kl`` (Hinton), ``reverse_kl``
            (MiniLLM, Gu et al. 2024), ``generalized_jsd`` (GKD, Agarwal et al. 2024; uses ``beta``), ``skew_kl``
            / ``skew_reverse_kl`` (DistiLLM, Ko et al. 2024; use ``alpha``), ``tvd``.
        beta: interpolation of ``generalized_jsd``, in [0, 1] (0 = forward KL, 1 = reverse KL).
        alpha: skew of ``skew_kl`` / ``skew_reverse_kl``, in [0, 1].
        temperature: softening temperature T > 0; the KD term is scaled by T^2.
        ce_weight: weight of cross-entropy on the real text, in [0, 1].
        **kwargs: :class:`DistillModule` arguments (learning rate, schedule, chunking, dtypes).
    """

    def __init__(
        self,
        teacher: str | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        loss: str = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ce_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if loss not in losses.DIVERGENCES:
            raise ValueError(f"loss must be one of {sorted(losses.DIVERGENCES)}, got {loss!r}")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= ce_weight <= 1:
            raise ValueError(f"ce_weight must be in [0, 1] (1 = CE-only baseline), got {ce_weight}")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.loss_name = loss
        self.loss_params = {"beta": beta} if loss == "generalized_jsd" else {}
        if loss in ("skew_kl", "skew_reverse_kl"):
            self.loss_params = {"alpha": alpha}
        self.temperature = temperature
        self.ce_weight = ce_weight

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher = self.teacher_logits(batch["input_ids"]) if self.ce_weight < 1.0 else None  # (B, T, V)
        parts = self.student_loss(
            batch["input_ids"], batch["labels"], teacher, divergence=self.loss_name, ce_weight=self.ce_weight,
            temperature=self.temperature, **self.loss_params,
        )
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])
