"""CoDistill: teacher and student train together on the same batches.

The teacher learns from ground truth by cross-entropy. The student minimizes
``(1 - a(t)) * CE(real text) + a(t) * KD(teacher, detached)`` where the schedule ``a(t)`` is

- ``constant``: ``kd_weight`` from the first step;
- ``linear``: a ramp from 0 to ``kd_weight`` over ``ramp_steps`` optimizer steps;
- ``gated``: 0 until the teacher "matures", i.e. its running (EMA) cross-entropy falls below ``gate_threshold``,
  then ``kd_weight`` (the seed's "mix teacher signal with real labels until the teacher matures").

Options: mutual learning (Deep Mutual Learning, Zhang et al. 2018): the teacher also receives
``mutual_weight * KD(student, detached)``; and a stale teacher (codistillation, Anil et al. 2018): the student
distils from a frozen copy of the teacher refreshed every ``stale_every`` steps.

Teacher and student have their own learning rates and weight decay; they share one AdamW whose per-model parameter
groups make it equivalent to two AdamW optimizers (AdamW's state is per parameter), which keeps Lightning's
automatic optimization, gradient accumulation and every strategy. Both models are checkpointed and resumed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_distill import checks, losses
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.losses import Divergence, divergence_from
from lightning_distill.modules.base import DistillModule
from lightning_distill.signals import TrainedTeacher

SCHEDULES = ("constant", "linear", "gated")


class CoDistill(DistillModule):
    """Co-distillation: a trainable teacher and a student learning side by side.

    Args:
        teacher: the teacher: a model name (pretrained) or ``{"config": {...}}`` (fresh random). It is trained.
        student: student spec (see :class:`DistillModule`).
        loss: divergence of the student's KD term (and of mutual learning): a name, built with ``beta`` / ``alpha``
            where it takes them, or a :class:`~lightning_distill.losses.Divergence` (as in SoftDistill).
        beta: ``generalized_jsd`` by name: interpolation in [0, 1].
        alpha: ``skew_kl`` / ``skew_reverse_kl`` by name: skew in [0, 1].
        temperature: KD temperature > 0.
        kd_weight: the largest weight ``a`` of the KD term, in [0, 1].
        schedule: ``constant``, ``linear`` or ``gated``.
        ramp_steps: ``linear``: steps to reach ``kd_weight``.
        gate_threshold: ``gated``: teacher EMA cross-entropy (nats) below which KD switches on.
        gate_ema: ``gated``: EMA decay of the teacher's running cross-entropy, in [0, 1).
        mutual_weight: weight of KD(student -> teacher) in the teacher's loss (0 disables mutual learning).
        stale_every: if > 0, the student distils from a frozen copy of the teacher refreshed every this many
            optimizer steps; 0 uses the live teacher.
        teacher_learning_rate: peak learning rate of the teacher.
        **kwargs: :class:`DistillModule` arguments (``learning_rate`` is the student's).
    """

    trains_teacher = True

    def __init__(
        self,
        teacher: str | dict[str, Any] | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        loss: str | Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        kd_weight: float = 0.5,
        schedule: str = "linear",
        ramp_steps: int = 100,
        gate_threshold: float = 4.0,
        gate_ema: float = 0.9,
        mutual_weight: float = 0.0,
        stale_every: int = 0,
        teacher_learning_rate: float = 5e-5,
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise ValueError("CoDistill trains its teacher: teacher must be a model name or {'config': {...}}")
        self.divergence = divergence_from(loss, beta=beta, alpha=alpha)
        checks.number("temperature", temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("kd_weight", kd_weight, "in [0, 1]", lambda v: 0 <= v <= 1, "0.5")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        checks.integer("ramp_steps", ramp_steps, ">= 1", lambda v: v >= 1, "100")
        checks.number("gate_threshold", gate_threshold, "> 0 (nats)", lambda v: v > 0, "4.0")
        checks.number("gate_ema", gate_ema, "in [0, 1)", lambda v: 0 <= v < 1, "0.9")
        checks.number("mutual_weight", mutual_weight, ">= 0 (0 disables mutual learning)", lambda v: v >= 0, "0.0")
        signal = TrainedTeacher(stale_every)
        checks.number("teacher_learning_rate", teacher_learning_rate, "> 0", lambda v: v > 0, "5e-5")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.signal = signal
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.schedule = schedule
        self.ramp_steps = ramp_steps
        self.gate_threshold = gate_threshold
        self.gate_ema = gate_ema
        self.mutual_weight = mutual_weight
        self.teacher_learning_rate = teacher_learning_rate
        self.register_buffer("teacher_ce_ema", torch.tensor(float("nan")))  # checkpointed with the models

    def kd_weight_at(self, step: int) -> float:
        """The schedule ``a(step)``: the student's KD weight at an optimizer step."""
        if self.schedule == "constant":
            return self.kd_weight
        if self.schedule == "linear":
            return self.kd_weight * min(step / self.ramp_steps, 1.0)
        mature = bool(self.teacher_ce_ema.isfinite()) and float(self.teacher_ce_ema) < self.gate_threshold
        return self.kd_weight if mature else 0.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        teacher_logits = self.teacher(input_ids=input_ids).logits  # (B, T, V), with grad
        teacher_ce = losses.cross_entropy(teacher_logits[:, :-1], labels[:, 1:])
        self._update_ema(teacher_ce.detach())
        a = self.kd_weight_at(self.global_step)
        signal = self.signal.distribution(self, batch, live_logits=teacher_logits)  # (B, T, V), no gradient
        parts = self.student_loss(input_ids, labels, signal, divergence=self.divergence, ce_weight=1.0 - a,
                                  temperature=self.temperature)
        loss = parts["loss"] + teacher_ce
        if self.mutual_weight > 0:  # Deep Mutual Learning: the teacher also matches the (detached) student
            with torch.no_grad():
                student_logits = self(input_ids)  # (B, T, V)
            mutual = self.divergence(teacher_logits[:, :-1], student_logits[:, :-1], labels[:, 1:],
                                     temperature=self.temperature)
            loss = loss + self.mutual_weight * mutual
            self.log("train/mutual", mutual.detach(), batch_size=input_ids.shape[0])
        self.log_train({**parts, "loss": loss, "teacher_ce": teacher_ce}, input_ids.shape[0])
        self.log("train/kd_weight", a, batch_size=input_ids.shape[0])
        return self.backward_loss(loss, parts["tokens"])

    def _update_ema(self, value: Tensor) -> None:
        ema = self.teacher_ce_ema
        self.teacher_ce_ema.copy_(value if not ema.isfinite() else self.gate_ema * ema + (1 - self.gate_ema) * value)

    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        return [(self.student, self.learning_rate), (self.teacher, self.teacher_learning_rate)]

