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

Feature distillation (:mod:`lightning_distill.features`): with ``feature_weight > 0`` each student layer's hidden
states are also matched to a teacher layer's (recorded during the teacher's forward that gives its distribution), and
``loss += feature_weight * feature_loss``; ``feature_weight=0`` computes and holds nothing more.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from lightning_distill import checks, features, pruning
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
        on_policy_start: optimizer steps trained off-policy before on-policy batches begin (a pruned student's
            samples are noise at first; see the README); 0: from the first step.
        on_policy_loss: loss on the student's samples: a divergence (name or object; default reverse KL, as the
            on-policy papers use) over the full distributions, or ``"sampled_token"`` (only the teacher's log-prob
            of each sampled token, as a negative advantage; temperature 1).
        prompt_tokens: on-policy prompts: a block's first this-many tokens, or at most this many of a file prompt.
        max_new_tokens: tokens the student samples per prompt.
        sample_temperature: the student's sampling temperature > 0 (1: its own distribution).
        top_p: the student's nucleus sampling mass in (0, 1].
        prompts: a JSONL prompt file (``{"prompt": ...}`` or ``{"messages": [...]}`` per line, the latter rendered
            with the chat template); ``None``: prompts from the corpus blocks.
        feature_weight: weight >= 0 of the feature (hidden-state) term added to the loss; 0 turns it off. Needs a
            live teacher and off-policy training (``labels=None``, ``lmbda=0``).
        feature_loss: ``"cosine"`` (1 - cosine similarity per token) or ``"mse"`` (MSE of layer-normalized states).
        feature_layers: ``{student layer: teacher layer}`` to match; ``None``: every student layer to the teacher
            layer it was copied from (``from_teacher`` students), else to evenly spaced teacher layers.
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
        on_policy_start: int = 0,
        on_policy_loss: str | Divergence = "reverse_kl",
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        sample_temperature: float = 1.0,
        top_p: float = 1.0,
        prompts: str | None = None,
        feature_weight: float = 0.0,
        feature_loss: str = "cosine",
        feature_layers: dict[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.divergence = divergence_from(loss, beta=beta, alpha=alpha)
        checks.number("temperature", temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("ce_weight", ce_weight, "in [0, 1] (1 = CE-only baseline)", lambda v: 0 <= v <= 1, "0.5")
        features.check_arguments(feature_weight, feature_loss, feature_layers)
        if feature_weight > 0 and labels is not None:
            raise ValueError(f"feature_weight={feature_weight} matches the teacher's hidden states, which the label "
                             f"store labels={labels!r} does not hold: set feature_weight=0 to train from stored "
                             "labels, or labels=None to use a live teacher")
        if feature_weight > 0 and lmbda > 0:
            raise ValueError(f"feature_weight={feature_weight} matches hidden states on the corpus text, but "
                             f"lmbda={lmbda} trains on the student's own samples: set lmbda=0 or feature_weight=0")
        if tail == "renorm" and not isinstance(self.divergence, ForwardKL):
            raise ValueError(f"tail='renorm' leaves the teacher 0 outside its top-k ids, where only forward_kl is "
                             f"defined: use tail='bucket' with loss={loss!r}")
        signal = StoredLabels(labels, tail) if labels is not None else LiveTeacher()
        if labels is None and tail not in ("bucket", "renorm"):
            raise ValueError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
        if lmbda > 0 and labels is not None:
            raise ValueError(f"lmbda={lmbda} needs a live teacher to grade the student's samples, but labels="
                             f"{labels!r} is set: use lmbda=0 with stored labels, or labels=None")
        checks.integer("on_policy_start", on_policy_start, ">= 0 (optimizer steps)", lambda v: v >= 0, "0")
        if on_policy_start > 0 and lmbda == 0:
            raise ValueError(f"on_policy_start={on_policy_start} delays on-policy batches, but lmbda=0 trains none: "
                             "set lmbda > 0, or on_policy_start=0")
        if lmbda > 0:
            settings = GenerationSettings(max_new_tokens, True, sample_temperature, top_p)
            signal = StudentSamples(signal, lmbda, on_policy_loss, settings, prompt_tokens, prompts,
                                    start=on_policy_start)
        elif not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy batches), got {lmbda}")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.signal = signal
        self.feature_weight = float(feature_weight)
        self.features = features.FeatureMatcher(feature_loss, feature_layers) if feature_weight > 0 else None

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
            with self.feature_recording() as record:  # both forwards below record the matched layers' states
                needed = self.ce_weight < 1 or record is not None
                teacher = self.signal.distribution(self, batch) if needed else None
                parts = self.student_loss(batch["input_ids"], batch["labels"], teacher, divergence=self.divergence,
                                          ce_weight=self.ce_weight, temperature=self.temperature)
            if record is not None:
                mask = features.valid_positions(batch["labels"], batch.get("attention_mask"))  # (B, T-1)
                parts["feature_loss"] = self.features(record, mask)
                parts["loss"] = parts["loss"] + self.feature_weight * parts["feature_loss"]
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

    # ------------------------------------------------------------------------------------------ feature term
    def make_models(self) -> None:
        """Build the models, then fix the feature term's layer map and projection for them."""
        super().make_models()
        if self.features is not None and self.teacher is not None:
            student, teacher = self.student.config, self.teacher.config
            default = None if self.features.requested else pruning.counterparts(student, teacher.num_hidden_layers)
            self.features.bind(student, teacher, default)

    def feature_recording(self) -> AbstractContextManager[features.Recording | None]:
        """Records the matched layers' states of the forwards made inside (``None`` when the term is off)."""
        if self.features is None:
            return nullcontext()
        return self.features.recording(pruning.decoder_layers(self.student), pruning.decoder_layers(self.teacher))

    def teacher_unused_in_training(self) -> bool:
        """CE-only, off-policy, no feature term: no training step asks the teacher (:mod:`~.placement` offloads it)."""
        return self.ce_weight == 1.0 and self.features is None and not isinstance(self.signal, StudentSamples)

    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        """The student, and the feature projection when the widths differ (at the student's learning rate)."""
        extra = self.features is not None and self.features.projection is not None
        return super().trainable_models() + ([(self.features, self.learning_rate)] if extra else [])

