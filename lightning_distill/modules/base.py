"""DistillModule: what SoftDistill, HardDistill and CoDistill share.

The module is a system wiring two models (Lightning's style guide): a trainable student and a teacher that is
either frozen or trained alongside (CoDistill). It owns

- building both in an idempotent :meth:`configure_model` (so FSDP/DeepSpeed can shard them,
  :mod:`lightning_distill.sharding`; the models themselves: :mod:`~lightning_distill.modules.building`);
- a frozen teacher's hygiene: ``eval()``, ``requires_grad=False``, ``no_grad``, its own dtype, never in the optimizer
  or a checkpoint (stripped on save, reloaded by name on load, :mod:`~lightning_distill.modules.checkpoint`), ignored
  by DDP;
- the teacher's signal, asked of one source (:attr:`signal`, :mod:`lightning_distill.signals`), which is given a
  :class:`~lightning_distill.signals.Run` (:attr:`run`), never the module: a live teacher, a label store, or a
  trained teacher; a method never opens a store itself;
- the one place where the student's hidden states meet its output head and the loss (:meth:`student_loss`);
- token-exact normalization over an accumulation window (:class:`TokenWindow`), validation metrics
  (:mod:`lightning_distill.metrics`), AdamW with warmup + cosine decay (:func:`adamw_with_schedule`), export.

Settings have one source of truth: the init arguments as given (this class's and the subclass's), saved once by
``save_hyperparameters`` here and read as ``self.hparams.<name>``; option groups are the typed dataclasses of
:mod:`lightning_distill.options`. Under ``LightningCLI`` too they are the typed values (Lightning would record the
CLI's config dicts instead), so a checkpoint reloads with ``load_from_checkpoint`` alone and a subclass needs no
``save_hyperparameters()`` of its own.

The hooks a method may override, each with its default here: :meth:`training_step` (required),
:meth:`check_store`, :meth:`check_store_teacher`, :meth:`compares_vocabularies`,
:meth:`teacher_unused_in_training`, :meth:`records_layers`, :meth:`sharding_problem`, :meth:`trainable_models`,
:meth:`make_models`, :meth:`label_settings` and ``predict_step``.
"""

from __future__ import annotations

import inspect
import math
import os
import types
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill import checks, pruning, sharding, speedups
from lightning_distill.backbone import (
    DEFAULT_TEACHER,
    Run,
    as_dtype,
    final_hidden,
    load_tokenizer,
    same_teacher,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from lightning_distill.callbacks import IdleTeacherOffload, Throughput
from lightning_distill.generation import GenerationSettings, continue_texts
from lightning_distill.losses import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    CrossTokenizerLoss,
    Divergence,
    TeacherHidden,
    chunked_distill_loss,
    cross_entropy,
    cross_tokenizer_loss,
    distill_loss,
)
from lightning_distill.metrics import ValidationMetrics
from lightning_distill.modules import building
from lightning_distill.modules import checkpoint as saved
from lightning_distill.options import Optimization, Performance, Teachers, Validation
from lightning_distill.serve.client import is_url
from lightning_distill.signals import Distribution, LiveTeacher, ServedTeacher, TeacherSignal
from lightning_distill.signals.sampled import greedy_scores
from lightning_distill.signals.several import Routed, select

# A frozen teacher is in eval mode on purpose; Lightning warns about eval-mode modules at fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

DEFAULT_STUDENT = {"from_teacher": {"layers": 6}}


class DistillModule(L.LightningModule):
    """Student backbone, teacher placement, the teacher's signal, shared metrics, optimizer and export.

    Args:
        teacher: teacher model name: ``builtin:smollm2-135m-instruct``, a Hugging Face id or a local folder; ``None``
            when the signal comes from stored labels and the student is a named model; SoftDistill also takes the
            URL of a teacher server (``"http://HOST:PORT"``, or a list of URLs; :mod:`lightning_distill.serve`);
            SoftDistill and HardDistill take several named teachers (:class:`~lightning_distill.options.Teachers`).
        student: ``{"from_teacher": {"layers": N}}`` (depth-pruned copy of the teacher keeping its N layers of
            highest measured importance, or ``"select": "evenly"`` spaced ones; ``None``: 6 layers), a model name,
            or ``{"config": {...}}`` for a fresh random model.
        tokenizer: model name whose tokenizer to use; default the teacher's (or the student's when it is a name
            and there is no teacher).
        optimization: learning rate and schedule (:class:`~lightning_distill.options.Optimization`).
        performance: memory, speed and layout (:class:`~lightning_distill.options.Performance`).
        validation: the on-policy view at validation (:class:`~lightning_distill.options.Validation`).
    """

    #: CoDistill trains its teacher; the other methods keep it frozen.
    trains_teacher: bool = False
    #: whether the method takes a teacher behind a server (``teacher="http://HOST:PORT"``)
    accepts_served_teacher: bool = False
    #: whether the method takes several named teachers (``teacher=Teachers(...)``)
    accepts_several_teachers: bool = False

    def __init__(
        self,
        teacher: str | list[str] | Teachers | dict[str, Any] | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        optimization: Optimization = Optimization(),
        performance: Performance = Performance(),
        validation: Validation = Validation(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(given_arguments(inspect.currentframe()))  # the one source of settings
        for name, value, kind in (("optimization", optimization, Optimization),
                                  ("performance", performance, Performance), ("validation", validation, Validation)):
            checks.require(isinstance(value, kind), name, value, f"{kind.__name__}(...)",
                           f"write {name}={kind.__name__}(...) (from lightning_distill.options)")
        checks.require(not isinstance(teacher, Teachers) or self.accepts_several_teachers, "teacher", teacher,
                       f"one teacher: {type(self).__name__} does not take several",
                       "use SoftDistill or HardDistill(mode='top1') for several teachers")
        several = teacher if isinstance(teacher, Teachers) else None
        teacher = self.teacher_name  # with several teachers, the main one's (the student is pruned from it)
        spec = self.student_spec
        if teacher is None and isinstance(spec, dict) and "from_teacher" in spec:
            raise ValueError("student={'from_teacher': ...} needs a teacher name; set teacher= or name a student model")
        served = is_url(teacher)
        checks.require(not isinstance(teacher, (list, tuple)) or served, "teacher", teacher,
                       "a model name, or a list of http:// URLs of servers of the same teacher")
        if served:
            check_served(type(self), teacher, spec, tokenizer, self.accepts_served_teacher)
        speedups.check(performance, self.trains_teacher)
        own = pruning.own_tokenizer(spec)  # a from_teacher student with a tokenizer of its own
        name = tokenizer or own or (teacher if isinstance(teacher, str) and not served else spec)
        checks.require(isinstance(name, str), "tokenizer", tokenizer, "a model name when neither teacher nor "
                       "student is one")
        #: where the teacher's signal comes from; methods set their own
        self.signal: TeacherSignal = LiveTeacher()
        self.student: PreTrainedModel | None = None
        self.teacher: PreTrainedModel | None = None
        #: the other named teachers' models, kept frozen as the main :attr:`teacher` is (several teachers)
        self.other_teachers = torch.nn.ModuleDict()
        # Loaded now (cheap) because the data module tokenizes before configure_model runs; a checkpoint being
        # loaded brings its own (checkpoint.restoring), so loading one does not need the teacher's folder.
        self._stored = saved.restored()
        role = ("tokenizer" if tokenizer else "student.from_teacher.tokenizer" if own
                else "teacher" if isinstance(teacher, str) and not served else "student")
        self.tokenizer: PreTrainedTokenizerBase = (saved.tokenizer_from(self._stored) if self._stored and not tokenizer
                                                   else load_tokenizer(name, role))
        if several is not None and not self._stored:
            check_same_tokenizer(several, self.tokenizer)
        self.teacher_missing: str | None = None  # why a checkpoint's live teacher could not be loaded
        self.val_metrics = ValidationMetrics(tuple(several.models) if several is not None else ())
        self.tokens = TokenWindow()
        #: what the step under way measured of itself (``generated_tokens``, ``generation_seconds``), read and
        #: cleared by the :class:`~lightning_distill.callbacks.Throughput` callback
        self.step_stats: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- models
    @property
    def student_spec(self) -> str | dict[str, Any]:
        """The student as given, or the default 6-layer ``from_teacher`` student."""
        return DEFAULT_STUDENT if self.hparams.student is None else self.hparams.student

    @property
    def teacher_name(self) -> str | list[str] | dict[str, Any] | None:
        """The teacher as given (a name, a server's URL or URLs, CoDistill's ``{"config": ...}``, or ``None``);
        with several teachers, the main (first) one's."""
        teacher = self.hparams.teacher
        return teacher.models[teacher.main] if isinstance(teacher, Teachers) else teacher

    @property
    def several_teachers(self) -> Teachers | None:
        """The named teachers and their rule, when the run has several."""
        return self.hparams.teacher if isinstance(self.hparams.teacher, Teachers) else None

    @property
    def local_teacher(self) -> str | dict[str, Any] | None:
        """The teacher as this machine has it: :attr:`teacher_name`, or, for a teacher behind a server, the
        ``tokenizer=`` model (a local copy of it, which a ``from_teacher`` student is pruned from; ``None``
        without one)."""
        return self.hparams.tokenizer if is_url(self.teacher_name) else self.teacher_name

    @property
    def run(self) -> Run:
        """What a teacher signal may use of this run: the models, the tokenizer, the step, the rank."""
        several = self.several_teachers
        teachers = {several.main: self.teacher, **self.other_teachers} if several is not None else {}
        return Run(teacher=self.teacher, tokenizer=self.tokenizer,
                   teacher_name=self.teacher_name if isinstance(self.teacher_name, str) else None,
                   student=self.student, step=self.global_step, rank=self.global_rank, teachers=teachers)

    def needs_teacher(self) -> bool:
        """Whether this run keeps a teacher in memory (False when the signal comes from stored labels)."""
        return self.teacher_name is not None and self.signal.needs_teacher

    def configure_model(self) -> None:
        """Build the models (:meth:`make_models`), then lay them out for FSDP (:func:`lightning_distill.sharding.
        prepare`); idempotent."""
        self.make_models()
        strategy = self._trainer.strategy if self._trainer is not None else None
        problem = self.sharding_problem(strategy.world_size) if strategy is not None else None
        sharding.prepare(self, strategy, self.trains_teacher, self.hparams.performance.teacher_sharding, problem)

    def make_models(self) -> None:
        """Build (once) the teacher and the student (:func:`lightning_distill.modules.building.make_models`)."""
        building.make_models(self)

    def configure_callbacks(self) -> list[L.Callback]:
        """Step throughput and a CE-only run's teacher offload (:mod:`lightning_distill.callbacks`), once per
        Trainer."""
        present = {type(c) for c in self._trainer.callbacks} if self._trainer is not None else set()
        return [c() for c in (Throughput, IdleTeacherOffload) if c not in present]

    def setup(self, stage: str) -> None:
        """Check a label store's settings against the method's, then let the signal source open and check what it
        reads (a label store is checked against the data here)."""
        if self.teacher_missing:  # loaded from a checkpoint whose live teacher is gone
            raise ValueError(self.teacher_missing)
        for name, manifest in self.signal.stores().items():
            self.check_store(manifest, self.store_argument(name))
            self.check_store_teacher(manifest, name)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.signal.setup(self.run, stage, data)

    def teardown(self, stage: str) -> None:
        """Let the signal source close what it opened (a served teacher's connections and threads)."""
        self.signal.teardown()

    # ----------------------------------------------------------------------------- hooks a method may override
    def check_store(self, manifest: dict[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming the argument to change when a label store cannot feed this method (``where``:
        the argument that names the store, with its value, e.g. ``labels='labels/topk'``)."""

    def store_argument(self, name: str | None = None) -> str:
        """The argument naming a label store, with its value: ``labels=...``, or ``teacher.labels.NAME=...`` for
        the store of teacher ``name`` among several."""
        several = self.several_teachers
        if several is not None and name is not None:
            return f"teacher.labels.{name}={several.labels[name]!r}"
        return f"labels={self.hparams.get('labels')!r}"

    def check_store_teacher(self, manifest: dict[str, Any], name: str | None = None) -> None:
        """Refuse a label store written by another teacher than the one this run names for it (their files'
        fingerprints differ, :func:`~lightning_distill.backbone.teacher_fingerprint`): the run's teacher, or with
        several teachers the one named ``name``. ``labels_any_teacher=True`` lets the run's one store come from
        another teacher (a student pruned from a small model, labelled by a large one of the same tokenizer)."""
        several = self.several_teachers
        given = several.models[name] if several is not None and name is not None else self.local_teacher
        where = self.store_argument(name)
        stored, here = manifest.get("teacher_fingerprint"), teacher_fingerprint(given)
        if (self.hparams.get("labels_any_teacher") and several is None) or same_teacher(stored, here):
            return
        fix = (f"give teacher.models.{name} the teacher that labelled the store, or label it anew with {given!r}"
               if several is not None else "name the teacher that labelled the store, or pass "
               "labels_any_teacher=True if the labels may come from another teacher")
        who = f"teacher.models.{name}={given!r}" if several is not None and name is not None else (
            f"teacher={self.teacher_name!r}")
        raise ValueError(f"{where} was labelled by teacher {manifest.get('teacher')!r} (config {stored['config']}, "
                         f"weights {stored['weights']}), and {who} is another model (config {here['config']}, "
                         f"weights {here['weights']}): {fix}")

    def compares_vocabularies(self) -> bool:
        """Whether the method matches the student to the teacher id by id (then their vocabularies must agree)."""
        return True

    def teacher_unused_in_training(self) -> bool:
        """Whether no training step asks the teacher (then an idle teacher leaves the accelerator while the student
        trains, :class:`~lightning_distill.callbacks.IdleTeacherOffload`)."""
        return False

    def records_layers(self) -> bool:
        """Whether the method records its models' layers with hooks (then they cannot be compiled)."""
        return False

    def sharding_problem(self, world_size: int) -> str | None:
        """Why this method's settings cannot be sharded (FSDP) on ``world_size`` ranks, with the fix; ``None``
        when they can."""
        if self.several_teachers is not None and world_size > 1:
            return ("several teachers are kept whole on every rank, not sharded: train them with DDP, or serve the "
                    "large ones (teacher.models.NAME='http://HOST:PORT')")
        return None

    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        """(model, peak learning rate) pairs the optimizer trains; CoDistill adds its teacher."""
        return [(self.student, self.hparams.optimization.learning_rate)]

    def label_settings(self) -> dict[str, Any]:
        """What a label store records about the teacher that wrote it: its name, its identity
        (:func:`~lightning_distill.backbone.teacher_fingerprint`; a served teacher's, as its server reports it) and
        the dtype as resolved here."""
        dtype = as_dtype(self.hparams.performance.teacher_dtype) or torch.float32
        identity = (self.signal.teacher_identity() if isinstance(self.signal, ServedTeacher)
                    else teacher_fingerprint(self.local_teacher))
        return {"teacher": self.teacher_name, "teacher_fingerprint": identity,
                "teacher_dtype": str(dtype).removeprefix("torch.")}

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the models take, known before the weights load (the data module checks block_size)."""
        return building.max_positions(self)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Student next-token logits (B, T, V), for inference."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------------------------------------ loss
    def student_loss(self, input_ids: Tensor, targets: Tensor, teacher: Distribution | None = None, *,
                     divergence: str | Divergence | CrossTokenizerLoss = "forward_kl", ce_weight: float = 1.0,
                     temperature: float = 1.0,
                     attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        """The one path from the student's hidden states and output head to the loss.

        Shifts for next-token prediction: position t predicts ``targets[t + 1]`` and is matched to ``teacher[t]``.

        Args:
            input_ids: (B, T) student input.
            targets: (B, T) token ids the student should predict (real text, or the teacher's tokens), -100 masked.
            teacher: the teacher's distribution aligned with ``input_ids``: logits (B, T, V), hidden states with its
                head (:class:`~lightning_distill.losses.TeacherHidden`), or sparse targets (B, T, K) (stored top-k
                or sampled ids, or the teacher's picks); unused when ``ce_weight == 1``.
            divergence: a :class:`~lightning_distill.losses.Divergence` or its name; a
                :class:`~lightning_distill.losses.CrossTokenizerLoss` for a teacher with another tokenizer (then
                ``teacher`` is an :class:`~lightning_distill.losses.AlignedTeacher` and KD is a mean over spans).
            ce_weight: ``loss = (1 - ce_weight) * KD + ce_weight * CE(targets)``.
            temperature: softening temperature of the KD term.
            attention_mask: (B, T) optional padding mask (0 on left padding).
            position_ids: (B, T) positions of left-padded sequences.

        Returns:
            ``{"loss", "kd", "ce"}`` scalars, each a mean over this micro-batch's valid target tokens, and
            ``"tokens"``: that count.
        """
        if isinstance(teacher, Routed):  # several teachers, each grading its rows: the token-weighted mean
            return routed_loss(self.student_loss, teacher, input_ids, targets, divergence=divergence,
                               ce_weight=ce_weight, temperature=temperature, attention_mask=attention_mask,
                               position_ids=position_ids)
        hidden = final_hidden(self.student, input_ids, attention_mask=attention_mask,
                              position_ids=position_ids)[:, :-1]  # (B, T-1, H)
        labels = targets[:, 1:]  # (B, T-1)
        tokens = (labels != IGNORE_INDEX).sum()
        head = self.student.get_output_embeddings()
        if isinstance(divergence, CrossTokenizerLoss):  # a teacher with another tokenizer: compared on shared spans
            out = cross_tokenizer_loss(head(hidden), input_ids, teacher, targets, loss=divergence, ce_weight=ce_weight,
                                       temperature=temperature)  # student logits (B, T-1, V_s)
            return {**out, "tokens": tokens}
        teacher = None if ce_weight == 1.0 or teacher is None else teacher[:, :-1]
        settings = {"divergence": divergence, "ce_weight": ce_weight, "temperature": temperature}
        chunk_size = self.loss_chunk_size(teacher, hidden.device)
        if chunk_size == 0:
            out = distill_loss(head(hidden), teacher, labels, **settings)  # logits (B, T-1, V)
        else:
            out = chunked_distill_loss(hidden, head, teacher, labels, chunk_size=chunk_size, **settings)
        return {**out, "tokens": tokens}

    def loss_chunk_size(self, teacher: Distribution | None, device: torch.device) -> int:
        """``performance.chunk_size`` when set, else the path ``benchmarks/speed.py`` measured fastest: chunks of
        :data:`~lightning_distill.losses.DEFAULT_CHUNK_SIZE` for a teacher's hidden states (its logits never made)
        and on CUDA; 0 (one pass over the logits) for the rest on CPU."""
        chunk_size = self.hparams.performance.chunk_size
        if chunk_size is not None:
            return chunk_size
        return DEFAULT_CHUNK_SIZE if isinstance(teacher, TeacherHidden) or device.type == "cuda" else 0

    def backward_loss(self, loss: Tensor, tokens: Tensor) -> Tensor:
        """The value to backpropagate so that the accumulated gradient is token-exact (see :class:`TokenWindow`)."""
        return self.tokens.backward_value(loss, tokens, self._trainer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale the window's gradients (:class:`TokenWindow`); a non-finite loss or gradient on any rank stops the
        run here, before the optimizer step would write it into the weights (:class:`NonFiniteLossError`)."""
        if self.tokens.rescale(optimizer, self._trainer, self.device):
            lr = self.hparams.optimization.learning_rate
            raise NonFiniteLossError(
                f"the loss or its gradient became NaN or infinite in step {self.global_step + 1}: the run stops "
                f"before that step changes the weights, which stay those of step {self.global_step} (what a "
                "ModelCheckpoint(save_on_exception=True) and ExportStudent save now). Usually the learning rate is "
                f"too high (optimization.learning_rate={lr:g}: try 10x lower), or the data or labels hold bad values")

    def on_train_start(self) -> None:
        """The configuration wins over a restored optimizer: a fit resumed from a checkpoint gets the optimizer's
        and the schedule's saved peak learning rates and weight decay back, so they are set again from
        ``hparams.optimization`` (the learning rate at the restored step of the schedule); a fresh fit is left as
        it is."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            settings = [(lr, decay) for _, lr in self.trainable_models()
                        for decay in (self.hparams.optimization.weight_decay, 0.0)]
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or len(settings) != len(groups):
                continue
            for i, (group, (peak, decay)) in enumerate(zip(groups, settings, strict=True)):
                scheduler.base_lrs[i] = group["initial_lr"] = peak
                group["lr"], group["weight_decay"] = peak * scheduler.lr_lambdas[i](scheduler.last_epoch), decay
            scheduler._last_lr = [group["lr"] for group in groups]

    def log_train(self, parts: dict[str, Tensor], batch_size: int) -> None:
        """Log the loss parts as ``train/<name>`` (means over valid tokens)."""
        for name, value in parts.items():
            if name != "tokens":
                self.log(f"train/{name}", value.detach().float(), prog_bar=name == "loss", batch_size=batch_size)

    # ---------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Student cross-entropy and, from the signal source, KL(teacher || student), top-1 agreement and the
        teacher's own cross-entropy, under ``val/`` (in-domain) or ``val_ood/`` (second loader)."""
        labels = batch["labels"][:, 1:]  # (B, T-1)
        student = self(batch["input_ids"])[:, :-1].float()  # (B, T-1, V)
        values = {"ce": cross_entropy(student, labels)}
        values.update(self.signal.validation_metrics(self.run, batch, student, labels, dataloader_idx))
        prefix = "val" if dataloader_idx == 0 else "val_ood"
        weights = self.signal.metric_tokens(batch, labels, dataloader_idx)
        self.val_metrics.update(prefix, values, (labels != IGNORE_INDEX).sum(), weights)
        options = self.hparams.validation
        if options.new_tokens > 0 and dataloader_idx == 0 and self.teacher is not None:
            scores, weights = greedy_scores(self.run, batch, options.prompt_tokens, options.new_tokens)
            self.val_metrics.update(prefix, scores, weights["teacher_logprob"], weights)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        for key, value in self.val_metrics.compute().items():
            self.log(key, value, sync_dist=False, prog_bar=key == "val/ppl")

    # ----------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """The teacher's signal of a batch, which :class:`~lightning_distill.store.LabelWriter` stores:
        ``{"block_idx": (B,), "logits": (B, T, V)}``; from a served teacher ``"records"`` instead, a function that
        asks the server for the batch's records in the writer's settings (the server encodes them as the writer
        would)."""
        several = self.several_teachers
        checks.require(several is None, "teacher", several, "one teacher to label a store with",
                       "label with each teacher in a run of its own (teacher=NAME), then name each store under its "
                       "teacher: teacher.labels={NAME: PATH}")
        if isinstance(self.signal, ServedTeacher):
            return {"block_idx": batch["block_idx"], "records": partial(self.signal.label_records, batch)}
        return {"block_idx": batch["block_idx"], "logits": LiveTeacher.logits(self.run, batch)}

    # -------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on matrices only) with linear warmup and cosine decay, stepped every optimizer step."""
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1000
        options = self.hparams.optimization
        return adamw_with_schedule(self.trainable_models(), options.weight_decay, options.warmup_steps,
                                   options.min_lr_ratio, total)

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen teacher out of the checkpoint, what makes it self-contained in (:func:`~.checkpoint.write`)."""
        saved.write(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen teacher's weights back for strict loading; signal and random state (:func:`~.checkpoint.load`)."""
        saved.load(self, checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None, hparams_file: str | None = None,
                             strict: bool | None = None, **kwargs: Any) -> DistillModule:
        """Lightning's ``load_from_checkpoint``, with the student and tokenizer taken from the checkpoint: the
        teacher's folder is needed only by a method that asks a live teacher (``teacher=NEW_PATH`` points at it).
        A missing file or one that is not a lightning_distill checkpoint is a ``ValueError`` that says so."""
        checkpoint = saved.read(checkpoint_path, "checkpoint_path")
        arguments = {**saved.option_groups(checkpoint), **kwargs}  # the option groups rebuilt; the caller's win
        with saved.restoring(checkpoint):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                hparams_file=hparams_file, strict=strict, **arguments)

    # ----------------------------------------------------------------------------------------------- export
    def export(self, path: str) -> str:
        """Write the student and its tokenizer as a Hugging Face folder (``from_pretrained`` loads it). Under FSDP
        every rank must call it (the student is gathered) and rank 0 writes."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"the export folder {path!r} is a file: give a folder to write the student to (it is "
                             "created if missing)")
        self.configure_model()
        state = sharding.student_state_dict(self, self._strategy())  # None unless sharded
        if sharding.is_rank_zero():
            sharding.save_pretrained(self.student, path, state)
            self.tokenizer.save_pretrained(path)
        return path

    def generate(self, prompts: list[str], model: str = "student", max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Continue each prompt with the student or the teacher; returns only the new text."""
        net = self.student if model == "student" else self.teacher if model == "teacher" else None
        checks.require(net is not None, "model", model, "'student' or 'teacher' (with a live teacher)")
        settings = GenerationSettings(max_new_tokens, do_sample, temperature, top_p)
        own = net is self.student or self.compares_vocabularies()  # else a teacher with another tokenizer: its own
        tokenizer = self.tokenizer if own else load_tokenizer(self.local_teacher, "teacher")
        with sharding.gathered(self._strategy()):  # sharded: every rank takes every step (synced)
            return continue_texts(net, tokenizer, prompts, settings, synced=sharding.is_sharded(self))

    def _strategy(self) -> L.pytorch.strategies.Strategy | None:
        return self._trainer.strategy if self._trainer is not None else None


def check_served(method: type, teacher: Any, student: Any, tokenizer: str | None, accepted: bool) -> None:
    """A served teacher (``teacher="http://..."``) is refused by a method that asks a model, and a ``from_teacher``
    student needs a local copy of the teacher to be pruned from (named by ``tokenizer``)."""
    name = method.__name__
    if not accepted:
        raise ValueError(f"teacher={teacher!r} is a teacher behind a server, which {name} cannot ask (it needs the "
                         "model itself): use SoftDistill(teacher=...) or HardDistill(teacher=..., mode='top1'), or "
                         "name the teacher's model or folder")
    if isinstance(student, dict) and "from_teacher" in student and tokenizer is None:
        raise ValueError(f"student={student!r} prunes the teacher's weights, but teacher={teacher!r} keeps them on "
                         "the server: name a local copy of the same teacher with tokenizer=NAME (it builds the "
                         "student, and its tokenizer is checked against the server's), or give the student as a "
                         "model name or {'config': {...}}")


def check_same_tokenizer(several: Teachers, tokenizer: PreTrainedTokenizerBase) -> None:
    """Several teachers are compared with the student id by id: each must read with the main teacher's tokenizer
    (the same :func:`~lightning_distill.backbone.tokenizer_fingerprint`: vocabulary, special tokens, ids of a probe
    text). Refused on construction, naming both teachers (a served one is checked
    against the server's tokenizer when it connects)."""
    main = f"teacher.models.{several.main}={several.models[several.main]!r}"
    for name, spec in several.models.items():
        if name == several.main or is_url(spec):
            continue
        other = load_tokenizer(spec, f"teacher.models.{name}")
        if tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"teacher.models.{name}={spec!r} reads with another tokenizer (vocabulary {len(other)}) "
                             f"than {main} (vocabulary {len(tokenizer)}), and several teachers are compared with the "
                             "student id by id: give teachers of one tokenizer, or distil from the other teacher in "
                             "a run of its own (SoftDistill(loss='uld' or 'gold') takes one teacher of another "
                             "tokenizer)")


def given_arguments(frame: types.FrameType | None) -> dict[str, Any]:
    """The arguments of the ``__init__`` calls of a DistillModule (sub)class under way, from ``frame`` (the base
    class's ``__init__``) outward: the subclass's values win. What ``save_hyperparameters()`` collects outside
    LightningCLI."""
    found: dict[str, Any] = {}
    for arguments in collect_init_args(frame, [], classes=(DistillModule,)):
        found.update(arguments)
    return found


def routed_loss(loss: Any, teacher: Routed, input_ids: Tensor, targets: Tensor, **settings: Any) -> dict[str, Tensor]:
    """:meth:`DistillModule.student_loss` (``loss``) of each teacher's rows against its distribution, combined into
    the means over all the batch's valid target tokens (what one call on the whole batch would give)."""
    batch = {"input_ids": input_ids, "targets": targets, "attention_mask": settings.pop("attention_mask"),
             "position_ids": settings.pop("position_ids")}
    parts = [loss(**select(batch, rows), teacher=distribution, **settings) for rows, distribution in teacher.parts]
    tokens = sum(part["tokens"] for part in parts)
    out = {key: sum(part[key] * part["tokens"] for part in parts) / tokens.clamp(min=1)
           for key in parts[0] if key != "tokens"}
    return {**out, "tokens": tokens}


class TokenWindow:
    """Token-exact gradient accumulation: the accumulated gradient is the mean over every valid target token of the
    whole accumulation window and of all ranks, not a mean of per-micro-batch means.

    Each micro-batch backpropagates ``sum_i / scale`` (:meth:`backward_value`, ``scale`` being the first
    micro-batch's token count, a constant); Lightning divides by N = ``accumulate_grad_batches`` and DDP averages
    over W ranks, so the gradient is ``sum / (N * W * scale)``. :meth:`rescale` multiplies it by
    ``N * W * scale / total_tokens``, which gives exactly ``sum / total_tokens``.
    """

    def __init__(self) -> None:
        self.tokens = 0.0  # valid target tokens since the last optimizer step
        self.nonfinite = 0.0  # micro-batches of the window whose loss was NaN or infinite
        self.scale: float | None = None

    def backward_value(self, loss: Tensor, tokens: Tensor, trainer: L.Trainer | None = None) -> Tensor:
        """The value to backpropagate for a micro-batch whose mean loss over ``tokens`` valid tokens is ``loss``.
        ``scale`` must be the same on every rank (the ranks' batches may differ in size: the last of an epoch), so
        the first micro-batch's largest count over the ranks is taken; a checkpoint keeps it, so that a resumed run
        scales as the uninterrupted one did."""
        if self.scale is None:
            first = torch.tensor(max(float(tokens), 1.0), dtype=torch.float64, device=tokens.device)
            if trainer is not None and trainer.world_size > 1:
                first = trainer.strategy.reduce(first, reduce_op="max")
            self.scale = float(first)
        self.tokens += float(tokens)
        self.nonfinite += float(not torch.isfinite(loss.detach()).all())
        return loss * tokens / self.scale

    def rescale(self, optimizer: torch.optim.Optimizer, trainer: L.Trainer | None, device: torch.device) -> bool:
        """Turn the accumulated gradients into the mean over the window's valid tokens (all ranks).

        Returns:
            Whether a loss of the window, or a gradient, was NaN or infinite on any rank (all ranks agree: the
            count is reduced with the tokens', one collective). Gradients are not checked under fp16 mixed
            precision, whose loss scaler skips infinite ones by design.
        """
        if self.scale is None:
            return False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        precision = str(getattr(trainer, "precision", "32")) if trainer is not None else "32"
        if grads and not precision.startswith("16"):  # a sharded (FSDP) gradient: this rank's shard
            norms = torch._foreach_norm([g.to_local() if hasattr(g, "to_local") else g for g in grads])
            self.nonfinite += float(not torch.isfinite(torch.stack([n.float() for n in norms])).all())
        counts = torch.tensor([self.tokens, self.nonfinite], device=device, dtype=torch.float64)
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        factor = accumulate * world * self.scale / max(float(counts[0]), 1.0)
        self.tokens = self.nonfinite = 0.0
        if factor != 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        return bool(counts[1] > 0)


class NonFiniteLossError(ValueError):
    """A loss or gradient became NaN or infinite: the run stops before the optimizer step (the weights stay those of
    the last good step). A ``ValueError``: the CLI shows it as one message, exit status 2."""


def lr_factor(step: int, total: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` of ``total``: linear warmup over ``warmup_steps``, then
    cosine decay to ``min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain floating-point tensors (not the ``DTensor`` shards of
    FSDP2), all on the CPU or all on one CUDA device. Elsewhere the default implementation runs."""
    devices = {p.device for p in params}
    return bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(
        type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)


def adamw_with_schedule(models: list[tuple[torch.nn.Module, float]], weight_decay: float, warmup_steps: int,
                        min_lr_ratio: float, total_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: one AdamW with two parameter groups per (model, peak lr) pair
    (decay on matrices, none on biases and norms) and the schedule of :func:`lr_factor`, stepped every step.

    One AdamW with per-model groups is equivalent to one AdamW per model (its state is per parameter) and keeps
    Lightning's automatic optimization, gradient accumulation and every strategy. It is torch's fused AdamW where
    :func:`fused_adamw` allows (the same update in one kernel over every tensor: 3-5x faster than torch's default
    on 2 CPU cores, 5-11% of the demo's whole training step; ``benchmarks/adamw.py``).
    """
    groups, every = [], []
    for model, lr in models:
        params = [p for p in model.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
        every += params
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused_adamw(every) or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
