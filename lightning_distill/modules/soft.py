"""SoftDistill: the student matches the teacher's whole next-token distribution (Hinton et al. 2015).

``loss = (1 - ce_weight) * D(p_teacher, p_student; T) + ce_weight * CE(real text)``, with D one of the
divergences in :mod:`lightning_distill.losses`. ``ce_weight=1`` is plain fine-tuning with the teacher unused in
training (the CE-only baseline every comparison needs; the teacher then only serves validation metrics), and
``ce_weight=0`` is pure distillation.

With ``labels=PATH`` the teacher's signal comes from a label store (:mod:`lightning_distill.labels`) written once
by ``lightning-distill predict``: the teacher is never kept in memory (a named teacher is loaded only to build a
``from_teacher`` student, then dropped; name a student model to skip even that). Top-k stores train with
:func:`~lightning_distill.losses.topk_forward_kl` (``tail`` chooses how the missing mass is handled) or, with
``tail="bucket"``, any divergence on the K ids + the rest; sampled stores with the unbiased random-sampling
estimator (Anshumann et al. 2025), which exists for ``forward_kl`` only.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import labels as labels_lib
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
        labels: folder of a ``topk`` or ``sampled`` label store to train from instead of a live teacher; its
            ``temperature`` must equal ``temperature``. The data module attaches it (and takes it from here).
        tail: top-k stores: ``"bucket"`` matches the teacher's missing mass as one extra outcome (the exact KL
            of both distributions coarse-grained to the K ids + the rest; every divergence is defined on it) or
            ``"renorm"`` renormalizes the K teacher probabilities and ignores the rest (``forward_kl`` only).
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
        labels: str | None = None,
        tail: str = "bucket",
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
        if labels is not None and (not isinstance(labels, str) or not labels):
            raise ValueError(f"labels must be the folder of a label store, or None for a live teacher, got {labels!r}")
        if tail not in ("bucket", "renorm"):
            raise ValueError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
        if tail == "renorm" and loss != "forward_kl":
            raise ValueError(f"tail='renorm' leaves the teacher 0 outside its top-k ids, where only forward_kl is "
                             f"defined: use tail='bucket' with loss={loss!r}")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.loss_name = loss
        self.loss_params = {"beta": beta} if loss == "generalized_jsd" else {}
        if loss in ("skew_kl", "skew_reverse_kl"):
            self.loss_params = {"alpha": alpha}
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.tail = tail
        self.labels = labels

    def check_labels(self, manifest: dict[str, Any]) -> None:
        """A store feeds SoftDistill when it holds soft targets at this temperature for this loss."""
        if manifest["kind"] not in ("topk", "sampled"):
            raise ValueError(f"labels={self.labels!r} is a {manifest['kind']!r} store; SoftDistill trains from "
                             "'topk' or 'sampled' stores: use HardDistill(labels=...) for hard labels")
        if manifest["temperature"] != self.temperature:
            raise ValueError(f"labels={self.labels!r} was written at temperature={manifest['temperature']}, this "
                             f"model has temperature={self.temperature}: set temperature={manifest['temperature']}")
        if manifest["kind"] == "sampled" and self.loss_name != "forward_kl":
            raise ValueError(f"loss={self.loss_name!r} has no unbiased estimate from sampled labels: use "
                             "loss='forward_kl', or a 'topk' store with tail='bucket'")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher = None
        if self.labels is not None:  # stored top-k / sampled targets (B, T, K)
            teacher = labels_lib.sparse_targets(self.stored_signal(batch))
        elif self.ce_weight < 1.0:
            teacher = self.teacher_logits(batch["input_ids"])  # (B, T, V)
        params = dict(self.loss_params)
        if isinstance(teacher, losses.SparseTargets) and teacher.kind == "topk":
            params["tail"] = self.tail
        parts = self.student_loss(
            batch["input_ids"], batch["labels"], teacher, divergence=self.loss_name, ce_weight=self.ce_weight,
            temperature=self.temperature, **params,
        )
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])
