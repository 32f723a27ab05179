"""CoDistill: teacher and student train together on the same batches.

The teacher learns from ground truth by cross-entropy. The student minimizes
``(1 - a(t)) * CE(real text) + a(t) * KD(teacher, detached)`` where the schedule ``a(t)``
(:class:`~lightning_distill.options.Schedule`) is

- ``constant``: ``kd_weight`` from the first step;
- ``linear``: a ramp from 0 to ``kd_weight`` over ``schedule.ramp_steps`` optimizer steps;
- ``gated``: 0 until the teacher "matures", i.e. its running (EMA) cross-entropy falls below
  ``schedule.gate_threshold``, then ``kd_weight`` (the seed's "mix teacher signal with real labels until the
  teacher matures").

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

from lightning_distill import checks
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.losses import Divergence, cross_entropy, get_divergence
from lightning_distill.modules.base import DistillModule
from lightning_distill.modules.soft import DivergenceName
from lightning_distill.options import Optimization, Performance, Schedule, Validation
from lightning_distill.signals import TrainedTeacher


class CoDistill(DistillModule):
    """Co-distillation: a trainable teacher and a student learning side by side.

    Args:
        teacher: the teacher: a model name (pretrained) or ``{"config": {...}}`` (fresh random). It is trained.
        student: student spec (see :class:`DistillModule`).
        tokenizer: tokenizer model name (see :class:`DistillModule`).
        loss: divergence of the student's KD term (and of mutual learning): a name or an object, as in SoftDistill.
        temperature: KD temperature > 0.
        kd_weight: the largest weight ``a`` of the KD term, in [0, 1].
        schedule: how ``a`` reaches ``kd_weight`` (:class:`~lightning_distill.options.Schedule`).
        mutual_weight: weight of KD(student -> teacher) in the teacher's loss (0 disables mutual learning).
        stale_every: if > 0, the student distils from a frozen copy of the teacher refreshed every this many
            optimizer steps; 0 uses the live teacher.
        teacher_learning_rate: peak learning rate of the teacher (``optimization.learning_rate`` is the student's).
        optimization: see :class:`DistillModule`.
        performance: see :class:`DistillModule`.
        validation: see :class:`DistillModule`.
    """

    trains_teacher = True

    def __init__(
        self,
        teacher: str | dict[str, Any] | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        loss: DivergenceName | Divergence = "forward_kl",
        temperature: float = 1.0,
        kd_weight: float = 0.5,
        schedule: Schedule = Schedule(),
        mutual_weight: float = 0.0,
        stale_every: int = 0,
        teacher_learning_rate: float = 5e-5,
        optimization: Optimization = Optimization(),
        performance: Performance = Performance(),
        validation: Validation = Validation(),
    ) -> None:
        checks.require(teacher is not None, "teacher", teacher, "a model name or {'config': {...}}",
                       "CoDistill trains its teacher")
        self.divergence = get_divergence(loss)
        checks.number("temperature", temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("kd_weight", kd_weight, "in [0, 1]", lambda v: 0 <= v <= 1, "0.5")
        checks.require(isinstance(schedule, Schedule), "schedule", schedule, "Schedule(...)",
                       "write e.g. schedule=Schedule(kind='linear')")
        checks.number("mutual_weight", mutual_weight, ">= 0 (0 disables mutual learning)", lambda v: v >= 0, "0.0")
        checks.number("teacher_learning_rate", teacher_learning_rate, "> 0", lambda v: v > 0, "5e-5")
        signal = TrainedTeacher(stale_every)
        super().__init__(teacher=teacher, student=student, tokenizer=tokenizer, optimization=optimization,
                         performance=performance, validation=validation)
        self.signal = signal
        self.register_buffer("teacher_ce_ema", torch.tensor(float("nan")))  # checkpointed with the models

    def kd_weight_at(self, step: int) -> float:
        """The schedule ``a(step)``: the student's KD weight at an optimizer step."""
        schedule, kd_weight = self.hparams.schedule, self.hparams.kd_weight
        if schedule.kind == "constant":
            return kd_weight
        if schedule.kind == "linear":
            return kd_weight * min(step / schedule.ramp_steps, 1.0)
        mature = bool(self.teacher_ce_ema.isfinite()) and float(self.teacher_ce_ema) < schedule.gate_threshold
        return kd_weight if mature else 0.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        temperature, mutual_weight = self.hparams.temperature, self.hparams.mutual_weight
        teacher_logits = self.teacher(input_ids=input_ids).logits  # (B, T, V), with grad
        teacher_ce = cross_entropy(teacher_logits[:, :-1], labels[:, 1:])
        self._update_ema(teacher_ce.detach())
        a = self.kd_weight_at(self.global_step)
        signal = self.signal.distribution(self.run, batch, live_logits=teacher_logits)  # (B, T, V), no gradient
        parts = self.student_loss(input_ids, labels, signal, divergence=self.divergence, ce_weight=1.0 - a,
                                  temperature=temperature)
        loss = parts["loss"] + teacher_ce
        if mutual_weight > 0:  # Deep Mutual Learning: the teacher also matches the (detached) student
            with torch.no_grad():
                student_logits = self(input_ids)  # (B, T, V)
            mutual = self.divergence(teacher_logits[:, :-1], student_logits[:, :-1], labels[:, 1:],
                                     temperature=temperature)
            loss = loss + mutual_weight * mutual
            self.log("train/mutual", mutual.detach(), batch_size=input_ids.shape[0])
        self.log_train({**parts, "loss": loss, "teacher_ce": teacher_ce}, input_ids.shape[0])
        self.log("train/kd_weight", a, batch_size=input_ids.shape[0])
        return self.backward_loss(loss, parts["tokens"])

    def _update_ema(self, value: Tensor) -> None:
        ema, decay = self.teacher_ce_ema, self.hparams.schedule.gate_ema
        self.teacher_ce_ema.copy_(value if not ema.isfinite() else decay * ema + (1 - decay) * value)

    def sharding_problem(self, world_size: int) -> str | None:
        """A stale teacher copy is a whole, unsharded model."""
        stale_every = self.hparams.stale_every
        if stale_every > 0:
            return (f"stale_every={stale_every} keeps an unsharded copy of the teacher, which FSDP cannot give: set "
                    "stale_every=0, or train with DDP")
        return None

    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        return [(self.student, self.hparams.optimization.learning_rate),
                (self.teacher, self.hparams.teacher_learning_rate)]
