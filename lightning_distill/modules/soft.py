"""SoftDistill: the student matches the teacher's whole next-token distribution (Hinton et al. 2015).

``loss = (1 - ce_weight) * D(p_teacher, p_student; T) + ce_weight * CE(real text)``, with D a divergence of
:mod:`lightning_distill.losses`. ``ce_weight=1`` is plain fine-tuning with the teacher unused in training (the
CE-only baseline; the teacher then only serves validation metrics), ``ce_weight=0`` pure distillation.

The teacher's distribution comes from a live teacher (its hidden states and head; the loss makes the logits), or
with ``labels=PATH`` from a label store written once by ``lightning-distill predict``
(:class:`~lightning_distill.signals.StoredLabels`): then the teacher is never kept in memory (a named teacher is
loaded only to build a ``from_teacher`` student). Top-k stores take any divergence with ``tail="bucket"`` (the K ids
+ the rest) and the forward KL with ``tail="renorm"``; sampled stores the unbiased random-sampling estimate of the
forward KL (Anshumann et al. 2025).

On-policy distillation (:mod:`lightning_distill.signals.sampled`): with ``lmbda > 0`` that share of the batches is
replaced by the student's own continuations of their first ``prompt_tokens`` tokens (or of prompts from a file),
graded token by token by the live teacher with ``on_policy_loss``; ``lmbda=0`` is exactly the off-policy method.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import checks
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.generation import GenerationSettings
from lightning_distill.losses import Divergence, ForwardKL, divergence_from
from lightning_distill.modules.base import DistillModule
from lightning_distill.signals import LiveTeacher, StoredLabels, StudentSamples


class SoftDistill(DistillModule):
    """Soft-label (logit) distillation.

    Args:
        teacher: teacher model name (see :class:`DistillModule`).
        student: student spec (see :class:`DistillModule`).
        loss: the divergence: a name (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tvd``; see :data:`lightning_distill.losses.DIVERGENCES`), built with ``beta`` /
            ``alpha`` where it takes them, or a :class:`~lightning_distill.losses.Divergence` object.
        beta: ``generalized_jsd`` by name: interpolation in [0, 1] (0 = forward KL, 1 = reverse KL).
        alpha: ``skew_kl`` / ``skew_reverse_kl`` by name: skew in [0, 1].
        temperature: softening temperature T > 0; the KD term is scaled by T^2.
        ce_weight: weight of cross-entropy on the real text, in [0, 1].
        labels: folder of a ``topk`` or ``sampled`` label store to train from instead of a live teacher; its
            ``temperature`` must equal ``temperature``.
        tail: top-k stores: ``"bucket"`` or ``"renorm"`` (forward KL only); see
            :func:`lightning_distill.sparse.topk_forward_kl`.
        lmbda: share of batches trained on-policy, in [0, 1] (GKD's ``lmbda``): 0 = off-policy only, 1 = always.
        on_policy_loss: loss on the student's samples: a divergence (name or object; default reverse KL, as the
            on-policy papers use) over the full distributions, or ``"sampled_token"`` (only the teacher's log-prob
            of each sampled token, as a negative advantage; temperature 1).
        prompt_tokens: on-policy prompts: a block's first this-many tokens, or at most this many of a file prompt.
        max_new_tokens: tokens the student samples per prompt.
        sample_temperature: the student's sampling temperature > 0 (1: its own distribution).
        top_p: the student's nucleus sampling mass in (0, 1].
        prompts: a JSONL prompt file (``{"prompt": ...}`` or ``{"messages": [...]}`` per line, the latter rendered
            with the chat template); ``None``: prompts from the corpus blocks.
        **kwargs: :class:`DistillModule` arguments (learning rate, schedule, chunking, dtypes).
    """

    def __init__(
        self,
        teacher: str | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        loss: str | Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ce_weight: float = 0.5,
        labels: str | None = None,
        tail: str = "bucket",
        lmbda: float = 0.0,
        on_policy_loss: str | Divergence = "reverse_kl",
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        sample_temperature: float = 1.0,
        top_p: float = 1.0,
        prompts: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.divergence = divergence_from(loss, beta=beta, alpha=alpha)
        checks.number("temperature", temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("ce_weight", ce_weight, "in [0, 1] (1 = CE-only baseline)", lambda v: 0 <= v <= 1, "0.5")
        if tail == "renorm" and not isinstance(self.divergence, ForwardKL):
            raise ValueError(f"tail='renorm' leaves the teacher 0 outside its top-k ids, where only forward_kl is "
                             f"defined: use tail='bucket' with loss={loss!r}")
        signal = StoredLabels(labels, tail) if labels is not None else LiveTeacher()
        if labels is None and tail not in ("bucket", "renorm"):
            raise ValueError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
        if lmbda > 0 and labels is not None:
            raise ValueError(f"lmbda={lmbda} needs a live teacher to grade the student's samples, but labels="
                             f"{labels!r} is set: use lmbda=0 with stored labels, or labels=None")
        if lmbda > 0:
            settings = GenerationSettings(max_new_tokens, True, sample_temperature, top_p)
            signal = StudentSamples(signal, lmbda, on_policy_loss, settings, prompt_tokens, prompts)
        elif not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy batches), got {lmbda}")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.signal = signal

    def check_store(self, manifest: dict[str, Any]) -> None:
        """A store feeds SoftDistill when it holds soft targets at this temperature for this divergence."""
        where = f"labels={self.hparams.labels!r}"
        if manifest["kind"] not in ("topk", "sampled"):
            raise ValueError(f"{where} is a {manifest['kind']!r} store; SoftDistill trains from 'topk' or 'sampled' "
                             "stores: use HardDistill(labels=...) for hard labels")
        if manifest["temperature"] != self.temperature:
            raise ValueError(f"{where} was written at temperature={manifest['temperature']}, this model has "
                             f"temperature={self.temperature}: set temperature={manifest['temperature']}")
        if manifest["kind"] == "sampled" and not self.divergence.linear_in_teacher:
            raise ValueError(f"loss={self.divergence.name!r} has no unbiased estimate from sampled labels: use "
                             "loss='forward_kl', or a 'topk' store with tail='bucket'")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if isinstance(self.signal, StudentSamples) and self.signal.chooses(self.global_step):  # on-policy batch
            parts = self.student_loss(**self.signal.loss_inputs(self, batch, self.temperature))
        else:
            teacher = self.signal.distribution(self, batch) if self.ce_weight < 1 else None
            parts = self.student_loss(batch["input_ids"], batch["labels"], teacher, divergence=self.divergence,
                                      ce_weight=self.ce_weight, temperature=self.temperature)
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

