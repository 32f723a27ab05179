"""HardDistill: the teacher contributes only its chosen tokens.

- ``mode="top1"`` (token level): at every position of the real text the student is trained with cross-entropy on
  the teacher's arg-max next token (optionally mixed with CE on the real token via ``ce_weight``).
- ``mode="generate"`` (sequence level, :mod:`lightning_distill.modules.sequences`): the teacher continues a prompt
  taken from each block of the corpus, and the student is trained on the teacher's tokens only.

The tokens come from the signal source: a live teacher (continuations kept on disk and reused across epochs and
runs), with ``labels=PATH`` a label store written once by ``lightning-distill predict`` (``top1`` reads the
teacher's arg-max from a ``top1``, ``topk`` or ``sampled`` store, ``generate`` each block's continuation from a
``generate`` store), or for ``top1`` a teacher behind a server (``teacher="http://HOST:PORT"``: each batch's picks
come with the server's top-``served.k`` answer, prefetched like SoftDistill's).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_distill import checks
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.losses import SparseTargets
from lightning_distill.modules.base import DistillModule
from lightning_distill.modules.sequences import TeacherSequences
from lightning_distill.options import Generation, Optimization, Performance, Served, Teachers, Validation
from lightning_distill.serve.client import is_url
from lightning_distill.signals import LiveTeacher, StoredLabels
from lightning_distill.signals.served import served_or
from lightning_distill.signals.several import several_signal

SERVED_PICKS = Served(k=1)  # a served teacher's picks: the arg-max travels with its top-1


class HardDistill(DistillModule):
    """Hard-label distillation: cross-entropy on tokens the teacher picked.

    Args:
        teacher: teacher model name (see :class:`DistillModule`); a server's URL (``mode="top1"``); or several
            named teachers (:class:`~lightning_distill.options.Teachers`, ``mode="top1"``: each block's picks from
            its source's teacher, or the arg-max of their mixture).
        student: student spec (see :class:`DistillModule`).
        tokenizer: tokenizer model name (see :class:`DistillModule`).
        mode: ``"top1"`` (teacher's arg-max at each position of the real text) or ``"generate"`` (teacher
            continuations of corpus prompts).
        ce_weight: ``top1`` only: weight of CE on the real next token, in [0, 1].
        generation: ``generate``: prompt length, continuation length, decoding and where continuations are kept
            (:class:`~lightning_distill.options.Generation`).
        labels: folder of a label store to train from instead of a live teacher: ``top1`` / ``topk`` /
            ``sampled`` for ``mode="top1"``, ``generate`` (same ``prompt_tokens`` and ``max_new_tokens``) for
            ``mode="generate"``.
        labels_any_teacher: train from ``labels`` written by another teacher than ``teacher`` (a run refuses such
            a store by default: :meth:`~lightning_distill.modules.DistillModule.check_store_teacher`).
        served: ``top1`` with a served teacher: what is asked of the server and how long a failing one is waited
            for (:class:`~lightning_distill.options.Served`; k=1 by default: only the picks travel).
        optimization: see :class:`DistillModule`.
        performance: see :class:`DistillModule`.
        validation: see :class:`DistillModule`.
    """

    accepts_served_teacher = True
    accepts_several_teachers = True

    def __init__(
        self,
        teacher: str | list[str] | Teachers | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        mode: Literal["top1", "generate"] = "top1",
        ce_weight: float = 0.0,
        generation: Generation = Generation(),
        labels: str | None = None,
        labels_any_teacher: bool = False,
        optimization: Optimization = Optimization(),
        performance: Performance = Performance(),
        validation: Validation = Validation(),
        served: Served = SERVED_PICKS,
    ) -> None:
        checks.choice("mode", mode, ("top1", "generate"))
        checks.number("ce_weight", ce_weight, "in [0, 1]", lambda v: 0 <= v <= 1, "0.0")
        checks.require(isinstance(generation, Generation), "generation", generation, "Generation(...)",
                       "write e.g. generation=Generation(max_new_tokens=64)")
        if is_url(teacher) and mode != "top1":
            raise ValueError(f"mode={mode!r} has the teacher write whole continuations, but teacher={teacher!r} is "
                             "served, which answers each position's distribution only: set mode='top1', or name the "
                             "teacher's model or folder")
        if isinstance(teacher, Teachers):
            checks.require(mode == "top1" and labels is None and not labels_any_teacher, "teacher", teacher,
                           "one teacher with mode='generate' or labels=", "several teachers give per-position picks "
                           "(mode='top1'), their stores named per teacher (teacher.labels={NAME: PATH})")
            stores = teacher.labels or {}
            signal = several_signal(teacher, served, SERVED_PICKS, lambda name: StoredLabels(stores[name])
                                    if name in stores else LiveTeacher())
        else:
            signal = served_or(teacher, labels, served, lambda: StoredLabels(labels) if labels is not None
                               else LiveTeacher(generation.cache_dir), default=SERVED_PICKS)
        super().__init__(teacher=teacher, student=student, tokenizer=tokenizer, optimization=optimization,
                         performance=performance, validation=validation)
        self.signal = signal
        #: the sequence-level piece (``mode="generate"``), None at token level
        self.sequences = TeacherSequences(generation) if mode == "generate" else None

    def check_store(self, manifest: dict[str, Any], where: str) -> None:
        """``top1`` trains from any per-position store; ``generate`` from a generate store of equal settings."""
        kind, mode = manifest["kind"], self.hparams.mode
        if (kind == "generate") != (mode == "generate"):
            raise ValueError(f"{where} is a {kind!r} store, which mode={mode!r} cannot use: "
                             f"set mode={'generate' if kind == 'generate' else 'top1'!r}")
        if self.sequences is not None:
            self.sequences.check_store(manifest)

    def setup(self, stage: str) -> None:
        if self.sequences is not None:
            self.sequences.check_fit(self.max_positions, getattr(self._trainer, "datamodule", None))
        super().setup(stage)

    def compares_vocabularies(self) -> bool:
        """``top1`` matches the teacher's picks id by id; ``generate`` trains on its continuations only."""
        return self.sequences is None

    def sharding_problem(self, world_size: int) -> str | None:
        """A live teacher sharded over several ranks cannot generate continuations: each rank generates for the
        prompts missing from its own cache, so the ranks would run different numbers of sharded forwards."""
        live = self.sequences is not None and self.hparams.labels is None
        if live and world_size > 1 and self.hparams.performance.teacher_sharding == "shard":
            return ("mode='generate' with a sharded live teacher would generate a different number of steps on each "
                    "rank: set performance.teacher_sharding='replicate', or train from a generate label store "
                    "(labels=)")
        return super().sharding_problem(world_size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.sequences is None:
            picks = SparseTargets.from_picks(self.signal.picks(self.run, batch))  # (B, T, 1): KD is CE on the picks
            parts = self.student_loss(batch["input_ids"], batch["labels"], picks, ce_weight=self.hparams.ce_weight)
        else:
            sequences, targets = self.sequences.training_batch(self.signal, self.run, batch)  # (B, P + N) each
            parts = self.student_loss(sequences, targets, ce_weight=1.0)
            parts = {"loss": parts["loss"], "kd": parts["ce"], "tokens": parts["tokens"]}
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal for the label writer: ``top1`` as every method (logits); ``generate`` its
        continuations (:meth:`TeacherSequences.predict`)."""
        if self.sequences is None:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        return self.sequences.predict(self.run, batch)

    def label_settings(self) -> dict[str, Any]:
        """The teacher, and in ``generate`` mode the generation settings a store records."""
        extra = {} if self.sequences is None else self.sequences.label_settings()
        return {**super().label_settings(), **extra}
