"""SoftDistill: the student matches the teacher's whole next-token distribution (Hinton et al. 2015).

``loss = (1 - ce_weight) * D(p_teacher, p_student; T) + ce_weight * CE(real text)``, with D a divergence of
:mod:`lightning_distill.losses`. ``ce_weight=1`` is plain fine-tuning with the teacher unused in training (the
CE-only baseline; the teacher then only serves validation metrics), ``ce_weight=0`` pure distillation.

The teacher's distribution comes from a live teacher (its hidden states and head; the loss makes the logits), from a
teacher behind a server (``teacher="http://HOST:PORT"``, :class:`~lightning_distill.signals.ServedTeacher`: its
top-k or sampled targets, as a label store's, ``served`` says which), or
with ``labels=PATH`` from a label store written once by ``lightning-distill predict``
(:class:`~lightning_distill.signals.StoredLabels`): then the teacher is never kept in memory (a named teacher is
loaded only to build a ``from_teacher`` student). Top-k stores take any divergence with ``tail="bucket"`` (the K ids
+ the rest) and the forward KL with ``tail="renorm"``; sampled stores the unbiased random-sampling estimate of the
forward KL (Anshumann et al. 2025).

On-policy distillation (``on_policy``, :mod:`lightning_distill.signals.sampled`): that share of the batches is
replaced by the student's own continuations of their first tokens (or of prompts from a file), graded token by
token by the live teacher; ``on_policy=None`` is the off-policy method.

Feature distillation (``features``, :mod:`lightning_distill.features`): each student layer's hidden states are also
matched to a teacher layer's (recorded during the teacher's forward that gives its distribution), and
``loss += features.weight * feature_loss``; ``features=None`` computes and holds nothing more.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_distill import checks, pruning
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.features import FeatureMatcher, Recording, valid_positions
from lightning_distill.losses import (
    CrossTokenizerLoss,
    Divergence,
    ForwardKL,
    get_cross_tokenizer_loss,
    get_divergence,
)
from lightning_distill.modules.base import DistillModule
from lightning_distill.options import Features, OnPolicy, Optimization, Performance, Served, Teachers, Validation
from lightning_distill.serve.client import is_url
from lightning_distill.signals import CrossTokenizerTeacher, LiveTeacher, StoredLabels, StudentSamples, TeacherSignal
from lightning_distill.signals.served import ServedTeacher, served_or
from lightning_distill.signals.several import several_signal

DivergenceName = Literal["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd"]
CrossTokenizerName = Literal["uld", "gold"]


class SoftDistill(DistillModule):
    """Soft-label (logit) distillation.

    Args:
        teacher: teacher model name (see :class:`DistillModule`), or the URL of a teacher server
            (``"http://HOST:PORT"``: ``lightning-distill serve`` or ``vllm serve``), or a list of URLs of servers of
            the same teacher; or several named teachers and which grades what (:class:`~lightning_distill.options.
            Teachers`: per corpus source or prompt file, or a mixture; YAML ``teacher: {models: {...}, sources:
            {...}}``).
        student: student spec (see :class:`DistillModule`).
        tokenizer: tokenizer model name (see :class:`DistillModule`).
        loss: the divergence: a name (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tvd``; :data:`lightning_distill.losses.DIVERGENCES`) or an object with its
            parameters, e.g. ``GeneralizedJSD(beta=0.3)`` (YAML: ``class_path`` / ``init_args``); or, for a
            teacher whose tokenizer is not the student's, a cross-tokenizer loss (``uld``, ``gold``, or
            ``GOLD(matched_weight=...)``; :mod:`lightning_distill.losses.cross_tokenizer`): the live teacher then
            reads each block in its own tokens (:class:`~lightning_distill.signals.CrossTokenizerTeacher`) and the
            student's tokenizer is its own (``student={"from_teacher": {..., "tokenizer": NAME}}``, ``tokenizer=``,
            or a named student's).
        temperature: softening temperature T > 0; the KD term is scaled by T^2.
        ce_weight: weight of cross-entropy on the real text, in [0, 1] (0.25: best of a sweep at the method table's
            budgets, ``benchmarks/recipe_sweep.py``).
        labels: folder of a ``topk`` or ``sampled`` label store to train from instead of a live teacher; its
            ``temperature`` must equal ``temperature``.
        tail: top-k stores: ``"bucket"`` or ``"renorm"`` (forward KL only); see
            :func:`lightning_distill.losses.topk_forward_kl`.
        labels_any_teacher: train from ``labels`` written by another teacher than ``teacher`` (a run refuses such
            a store by default: :meth:`~lightning_distill.modules.DistillModule.check_store_teacher`).
        on_policy: train a share of the batches on the student's own samples (:class:`~lightning_distill.options.
            OnPolicy`); ``None`` (or ``lmbda=0``): off-policy only.
        features: add the feature (hidden-state) term (:class:`~lightning_distill.options.Features`); ``None``: off.
            Needs a live teacher and off-policy training.
        optimization: see :class:`DistillModule`.
        performance: see :class:`DistillModule`.
        validation: see :class:`DistillModule`.
        served: with a served teacher, what is asked of the server (top-k or sampled, k, protocol) and how long a
            failing one is waited for (:class:`~lightning_distill.options.Served`).
    """

    accepts_served_teacher = True
    accepts_several_teachers = True

    def __init__(
        self,
        teacher: str | list[str] | Teachers | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        loss: DivergenceName | CrossTokenizerName | Divergence | CrossTokenizerLoss = "forward_kl",
        temperature: float = 1.0,
        ce_weight: float = 0.25,
        labels: str | None = None,
        tail: Literal["bucket", "renorm"] = "bucket",
        labels_any_teacher: bool = False,
        on_policy: OnPolicy | None = None,
        features: Features | None = None,
        optimization: Optimization = Optimization(),
        performance: Performance = Performance(),
        validation: Validation = Validation(),
        served: Served = Served(),
    ) -> None:
        cross = isinstance(loss, CrossTokenizerLoss) or loss in ("uld", "gold")
        self.divergence = get_cross_tokenizer_loss(loss) if cross else get_divergence(loss)
        checks.number("temperature", temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("ce_weight", ce_weight, "in [0, 1] (1 = CE-only baseline)", lambda v: 0 <= v <= 1, "0.25")
        checks.choice("tail", tail, ("bucket", "renorm"))
        checks.require(on_policy is None or isinstance(on_policy, OnPolicy), "on_policy", on_policy,
                       "None or OnPolicy(...)", "write e.g. on_policy=OnPolicy(lmbda=0.5)")
        checks.require(features is None or isinstance(features, Features), "features", features,
                       "None or Features(...)", "write e.g. features=Features(weight=1.0)")
        active = on_policy if on_policy is not None and on_policy.lmbda > 0 else None  # lmbda=0: off-policy
        if features is not None and is_url(teacher):
            raise ValueError(f"features={features} matches the teacher's hidden states, which teacher={teacher!r} "
                             "keeps on its server: set features=None to train from the served teacher, or name the "
                             "teacher's model")
        if features is not None and labels is not None:
            raise ValueError(f"features={features} matches the teacher's hidden states, which the label store "
                             f"labels={labels!r} does not hold: set features=None to train from stored labels, or "
                             "labels=None to use a live teacher")
        if features is not None and active is not None:
            raise ValueError(f"features={features} matches hidden states on the corpus text, but on_policy trains on "
                             "the student's own samples: set on_policy=None or features=None")
        if tail == "renorm" and not isinstance(self.divergence, ForwardKL):
            raise ValueError(f"tail='renorm' leaves the teacher 0 outside its top-k ids, where only forward_kl is "
                             f"defined: use tail='bucket' with loss={loss!r}")
        if active is not None and labels is not None:
            raise ValueError(f"on_policy={on_policy} needs a live teacher to grade the student's samples, but labels="
                             f"{labels!r} is set: use on_policy=None with stored labels, or labels=None")
        if isinstance(teacher, Teachers):
            check_several(teacher, labels, labels_any_teacher, features, cross, active)
        if cross:
            check_cross_tokenizer(loss, teacher, labels, active, features, validation)
        elif pruning.own_tokenizer(student) is not None:
            raise ValueError(f"student={student!r} reads with its own tokenizer "
                             f"{pruning.own_tokenizer(student)!r} and teacher={teacher!r} with the teacher's, but "
                             f"loss={loss!r} compares their distributions id by id: use loss='uld' or loss='gold' "
                             "(with ce_weight=1 for the CE-only baseline), or drop student.from_teacher.tokenizer")
        signal = self.signal_for(teacher, labels, tail, temperature, served)
        own = tokenizer or (student if cross and isinstance(student, str) else None)  # a named student's own
        super().__init__(teacher=teacher, student=student, tokenizer=own, optimization=optimization,
                         performance=performance, validation=validation)
        self.signal = StudentSamples(signal, active) if active is not None else signal
        #: the feature term (a submodule: its projection is trained and checkpointed), ``None`` when off
        self.features = FeatureMatcher(features) if features is not None else None

    def signal_for(self, teacher: Any, labels: str | None, tail: str, temperature: float,
                   served: Served) -> TeacherSignal:
        """Where the teacher's distribution comes from: the label store, the server(s), the live teacher, or the
        live teacher on its own tokens (a cross-tokenizer loss)."""
        if isinstance(self.divergence, CrossTokenizerLoss):
            return CrossTokenizerTeacher(teacher)
        if isinstance(teacher, Teachers):
            stores = teacher.labels or {}
            signal = several_signal(teacher, served, Served(), lambda name: StoredLabels(stores[name], tail)
                                    if name in stores else LiveTeacher(), tail=tail, temperature=temperature)
            self.check_served_sampled(signal.signals.values(), served)
            return signal
        signal = served_or(teacher, labels, served, lambda: StoredLabels(labels, tail) if labels is not None
                           else LiveTeacher(), tail=tail, temperature=temperature)
        self.check_served_sampled([signal], served)
        return signal

    def check_served_sampled(self, signals: Any, served: Served) -> None:
        """Sampled targets from a server feed only a loss linear in the teacher's distribution."""
        if any(isinstance(s, ServedTeacher) for s in signals) and served.kind == "sampled" and (
                not self.divergence.linear_in_teacher):
            raise ValueError(f"loss={self.divergence.name!r} has no unbiased estimate from sampled targets: use "
                             "loss='forward_kl', or served.kind='topk'")

    def compares_vocabularies(self) -> bool:
        """A cross-tokenizer loss compares the two on shared text spans; the divergences id by id."""
        return not isinstance(self.divergence, CrossTokenizerLoss)

    def check_store(self, manifest: dict[str, Any], where: str) -> None:
        """A store feeds SoftDistill when it holds soft targets at this temperature for this divergence."""
        temperature = self.hparams.temperature
        if manifest["kind"] not in ("topk", "sampled"):
            raise ValueError(f"{where} is a {manifest['kind']!r} store; SoftDistill trains from 'topk' or 'sampled' "
                             "stores: use HardDistill(labels=...) for hard labels")
        if manifest["temperature"] != temperature:
            raise ValueError(f"{where} was written at temperature={manifest['temperature']}, this model has "
                             f"temperature={temperature}: set temperature={manifest['temperature']}")
        if manifest["kind"] == "sampled" and not self.divergence.linear_in_teacher:
            raise ValueError(f"loss={self.divergence.name!r} has no unbiased estimate from sampled labels: use "
                             "loss='forward_kl', or a 'topk' store with tail='bucket'")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        temperature, ce_weight = self.hparams.temperature, self.hparams.ce_weight
        run = self.run
        if isinstance(self.signal, StudentSamples) and self.signal.chooses(self.global_step):  # on-policy batch
            rollout = self.signal.rollout(run, batch)
            self.step_stats.update(generated_tokens=rollout["generated"], generation_seconds=rollout["seconds"])
            parts = self.student_loss(**self.signal.loss_inputs(run, rollout, temperature))
        else:
            with self.feature_recording() as record:  # both forwards below record the matched layers' states
                needed = ce_weight < 1 or record is not None
                teacher = self.signal.distribution(run, batch) if needed else None
                parts = self.student_loss(batch["input_ids"], batch["labels"], teacher, divergence=self.divergence,
                                          ce_weight=ce_weight, temperature=temperature)
            if record is not None:
                mask = valid_positions(batch["labels"], batch.get("attention_mask"))  # (B, T-1)
                parts["feature_loss"] = self.features(record, mask)
                parts["loss"] = parts["loss"] + self.hparams.features.weight * parts["feature_loss"]
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

    def feature_recording(self) -> AbstractContextManager[Recording | None]:
        """Records the matched layers' states of the forwards made inside (``None`` when the term is off)."""
        if self.features is None:
            return nullcontext()
        return self.features.recording(pruning.decoder_layers(self.student), pruning.decoder_layers(self.teacher))

    def records_layers(self) -> bool:
        return self.features is not None

    def teacher_unused_in_training(self) -> bool:
        """CE-only, off-policy, no feature term: no training step asks the teacher."""
        return self.hparams.ce_weight == 1.0 and self.features is None and not isinstance(self.signal, StudentSamples)

    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        """The student, and the feature projection when the widths differ (at the student's learning rate)."""
        extra = self.features is not None and self.features.projection is not None
        lr = self.hparams.optimization.learning_rate
        return super().trainable_models() + ([(self.features, lr)] if extra else [])


def check_cross_tokenizer(loss: Any, teacher: Any, labels: str | None, on_policy: OnPolicy | None,
                          features: Features | None, validation: Validation) -> None:
    """A cross-tokenizer loss reads each block with the teacher's own tokenizer and model, live: the settings that
    ask for something else are refused, each naming what to change."""
    name = loss if isinstance(loss, str) else type(loss).__name__
    if not isinstance(teacher, str) or is_url(teacher):
        raise ValueError(f"loss={name!r} reads each block with the teacher's own tokenizer and model, but "
                         f"teacher={teacher!r}: name the teacher's model or folder")
    refused = (("labels", labels, "stored labels of a teacher with another tokenizer are not aligned yet"),
               ("on_policy", on_policy, "the student's samples are not aligned yet"),
               ("features", features, "hidden states of two tokenizations do not pair up"))
    for argument, value, why in refused:
        checks.require(value is None, argument, value, f"None with loss={name!r}", f"set {argument}=None ({why})")
    checks.require(validation.new_tokens == 0, "validation.new_tokens", validation.new_tokens,
                   f"0 with loss={name!r}", "the on-policy view scores the student's tokens with the teacher's ids")


def check_several(teachers: Teachers, labels: str | None, labels_any_teacher: bool, features: Features | None,
                  cross: bool, on_policy: OnPolicy | None) -> None:
    """Several teachers: their stores are named per teacher, and the options that pair the student with one
    teacher's model are refused, each naming what to change."""
    checks.require(labels is None, "labels", labels, "None with several teachers",
                   "name each store under its teacher: teacher.labels={NAME: PATH}")
    checks.require(not labels_any_teacher, "labels_any_teacher", labels_any_teacher, "False with several teachers",
                   "a store must come from the teacher it is named under (teacher.labels)")
    checks.require(features is None, "features", features, "None with several teachers",
                   "the feature term matches one teacher's hidden states: set features=None")
    checks.require(not cross, "loss", "a cross-tokenizer loss", "a divergence with several teachers",
                   "several teachers share the student's tokenizer; a teacher of another tokenizer takes a run of "
                   "its own (loss='uld' or 'gold')")
    files = on_policy.prompts if on_policy is not None else None
    files = [files] if isinstance(files, str) else files or []
    unrouted = [f for f in files if teachers.sources is not None and f not in teachers.sources]
    checks.require(not unrouted, "on_policy.prompts", unrouted, "prompt files that teacher.sources names",
                   f"add each to teacher.sources with its teacher (one of {list(teachers.models)})")
