"""DistillModule: what SoftDistill, HardDistill and CoDistill share.

The module is a system wiring two models (Lightning's style guide): a trainable student and a teacher that is
either frozen or trained alongside (CoDistill). It owns

- building both in an idempotent :meth:`configure_model` (so FSDP/DeepSpeed can shard them);
- a frozen teacher's hygiene: ``eval()``, ``requires_grad=False``, ``no_grad``, its own dtype, never in the optimizer
  or a checkpoint (stripped on save, reloaded by name on load), ignored by DDP;
- the teacher's signal, asked of one source (:attr:`signal`, :mod:`lightning_distill.signals`): a live teacher,
  a label store, or a trained teacher; a method never opens a store itself;
- the one place where the student's hidden states meet its output head and the loss (:meth:`student_loss`);
- token-exact normalization over an accumulation window (:class:`~lightning_distill.accumulation.TokenWindow`),
  validation metrics (:mod:`lightning_distill.metrics`), AdamW with warmup + cosine decay, export.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill import checkpoint as saved
from lightning_distill import checks, chunked, cpu_memory, generation, losses, optim, placement, sharding, speedups
from lightning_distill.accumulation import TokenWindow
from lightning_distill.backbone import DEFAULT_TEACHER, as_dtype, load_tokenizer
from lightning_distill.losses import IGNORE_INDEX, Divergence
from lightning_distill.metrics import ValidationMetrics
from lightning_distill.modules import building
from lightning_distill.signals import Distribution, LiveTeacher, TeacherHidden, TeacherSignal
from lightning_distill.signals.sampled import greedy_scores
from lightning_distill.sparse import SparseTargets
from lightning_distill.throughput import Throughput

# A frozen teacher is in eval mode on purpose; Lightning warns about eval-mode modules at fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class DistillModule(L.LightningModule):
    """Student backbone, teacher placement, the teacher's signal, shared metrics, optimizer and export.

    Args:
        teacher: teacher model name: ``builtin:smollm2-135m-instruct``, a Hugging Face id or a local folder; ``None``
            when the signal comes from stored labels and the student is a named model.
        student: ``{"from_teacher": {"layers": N}}`` (depth-pruned copy of the teacher), a model name, or
            ``{"config": {...}}`` for a fresh random model.
        teacher_dtype: dtype of a frozen teacher's weights: ``"bfloat16"`` halves its memory and, on GPUs and
            CPUs with bf16 units, runs it faster; ``"auto"`` (default) picks bfloat16 where it is native, else
            float32; ``None`` keeps float32.
        teacher_sharding: where a frozen teacher lives under FSDP (``--trainer.strategy fsdp``, or
            ``ModelParallelStrategy``): ``"shard"`` (default) splits its decoder layers across ranks, each a unit
            of its own in its own dtype, its embedding and head whole on every rank; ``"replicate"`` keeps all of
            it on every rank (a small teacher: no all-gathers). Unused without FSDP; see
            :mod:`lightning_distill.sharding`.
        learning_rate: peak learning rate of AdamW for the student (1e-3: best of a sweep for the pruned
            6-layer default, see ``benchmarks/recipe_sweep.py``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warmup steps, then cosine decay to ``min_lr_ratio * learning_rate`` at the last step.
        min_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].
        chunk_size: compute the loss from hidden states in chunks of this many positions (0: all at once), never
            holding the (B, T, V) logits (:mod:`lightning_distill.chunked`). ``None`` (default): the path measured
            fastest (:meth:`loss_chunk_size`).
        tokenizer: model name whose tokenizer to use; default the teacher's (or the student's when it is a name
            and there is no teacher).
        train_embeddings: train the student's token embeddings and output head (tied in SmolLM2). ``False``
            keeps the teacher's vocabulary geometry fixed and trains only the transformer layers.
        eval_new_tokens: > 0: at each validation the student also continues each held-out block's first
            ``eval_prompt_tokens`` greedily for this many tokens, and the live teacher scores them
            (``val/teacher_logprob``, ``val/on_policy_rkl``: what on-policy training optimizes); 0: off.
        eval_prompt_tokens: the prompt length of that metric.
        compile_student: ``torch.compile`` the student's decoder (:mod:`lightning_distill.speedups`).
        compile_teacher: ``torch.compile`` a frozen teacher's decoder.
        liger_kernels: patch Liger Kernel's Llama kernels into both models (CUDA only; the ``bench`` extra).
    """

    #: CoDistill trains its teacher; the other methods keep it frozen.
    trains_teacher: bool = False

    def __init__(
        self,
        teacher: str | dict[str, Any] | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        teacher_dtype: str | None = "auto",
        teacher_sharding: str = "shard",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        chunk_size: int | None = None,
        tokenizer: str | None = None,
        train_embeddings: bool = True,
        eval_new_tokens: int = 0,
        eval_prompt_tokens: int = 32,
        compile_student: bool = False,
        compile_teacher: bool = False,
        liger_kernels: bool = False,
    ) -> None:
        super().__init__()
        student = {"from_teacher": {"layers": 6}} if student is None else student
        if teacher is None and isinstance(student, dict) and "from_teacher" in student:
            raise ValueError("student={'from_teacher': ...} needs a teacher name; set teacher= or name a student model")
        checks.number("learning_rate", learning_rate, "> 0", lambda v: v > 0, "1e-3")
        checks.number("weight_decay", weight_decay, ">= 0", lambda v: v >= 0, "0.0")
        checks.integer("warmup_steps", warmup_steps, ">= 0", lambda v: v >= 0, "10")
        checks.number("min_lr_ratio", min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1, "0.1")
        if chunk_size is not None:  # None: the measured default
            checks.integer("chunk_size", chunk_size, ">= 0 (0 disables chunking)", lambda v: v >= 0, "256")
        checks.integer("eval_new_tokens", eval_new_tokens, ">= 0 (0 turns the metric off)", lambda v: v >= 0, "0")
        checks.integer("eval_prompt_tokens", eval_prompt_tokens, ">= 1", lambda v: v >= 1, "32")
        as_dtype(teacher_dtype, "teacher_dtype")  # validates the name early
        self.speedups = speedups.Speedups(compile_student, compile_teacher, liger_kernels, self.trains_teacher)
        if teacher_sharding not in sharding.TEACHER_SHARDING:
            raise ValueError(f"teacher_sharding must be one of {sharding.TEACHER_SHARDING}, got {teacher_sharding!r}")
        self.teacher_name = teacher
        self.student_spec = student
        self.teacher_dtype = teacher_dtype
        self.teacher_sharding = teacher_sharding
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.chunk_size = chunk_size
        self.train_embeddings = train_embeddings
        self.eval_new_tokens, self.eval_prompt_tokens = eval_new_tokens, eval_prompt_tokens
        self.tokenizer_name = tokenizer or (teacher if isinstance(teacher, str) else student)
        if not isinstance(self.tokenizer_name, str):
            raise ValueError("neither teacher nor student is a model name: set tokenizer= to a model name")
        #: where the teacher's signal comes from; methods set their own
        self.signal: TeacherSignal = LiveTeacher()
        self.student: PreTrainedModel | None = None
        self.teacher: PreTrainedModel | None = None
        # Loaded now (cheap) because the data module tokenizes before configure_model runs; a checkpoint being
        # loaded brings its own (checkpoint.restoring), so loading one does not need the teacher's folder.
        self._stored = saved.restored()
        role = "tokenizer" if tokenizer else "teacher" if isinstance(teacher, str) else "student"
        self.tokenizer: PreTrainedTokenizerBase = (saved.tokenizer_from(self._stored) if self._stored and not tokenizer
                                                   else load_tokenizer(self.tokenizer_name, role))
        self.teacher_missing: str | None = None  # why a checkpoint's live teacher could not be loaded
        self.val_metrics = ValidationMetrics()
        self.tokens = TokenWindow()

    # ----------------------------------------------------------------------------------------------- models
    def needs_teacher(self) -> bool:
        """Whether this run keeps a teacher in memory (False when the signal comes from stored labels)."""
        return self.teacher_name is not None and self.signal.needs_teacher

    def configure_model(self) -> None:
        """Build the models, then lay them out for FSDP (:func:`~lightning_distill.sharding.prepare`); idempotent."""
        self.make_models()
        sharding.prepare(self)

    def make_models(self) -> None:
        """Build (once) the teacher and the student (:func:`lightning_distill.modules.building.make_models`)."""
        building.make_models(self)

    def keep_models(self, student: PreTrainedModel, teacher: PreTrainedModel | None) -> None:
        """Hold the student and the teacher this run keeps (:func:`~lightning_distill.modules.building.keep`)."""
        building.keep(self, student, teacher)

    def configure_callbacks(self) -> list[L.Callback]:
        """Step throughput (:mod:`~.throughput`), a CE-only run's teacher offload (placement), CPU memory reuse."""
        present = {type(c) for c in self._trainer.callbacks} if self._trainer is not None else set()
        callbacks = (Throughput, placement.IdleTeacherOffload, cpu_memory.ReuseFreedMemory)
        return [c() for c in callbacks if c not in present]  # once per Trainer

    def setup(self, stage: str) -> None:
        """Let the signal source open and check what it reads (a label store is checked against the data here)."""
        if self.teacher_missing:  # loaded from a checkpoint whose live teacher is gone
            raise ValueError(self.teacher_missing)
        self.signal.setup(self, stage)

    def check_store(self, manifest: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the argument to change when a label store cannot feed this method."""

    def compares_vocabularies(self) -> bool:
        """Whether the method matches the student to the teacher id by id (then their vocabularies must agree)."""
        return True

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the models take, known before the weights load (the data module checks block_size)."""
        return building.max_positions(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Student next-token logits (B, T, V), for inference."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    def student_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None) -> Tensor:
        """Final hidden states of the student, before its output head: (B, T, H)."""
        return sharding.final_hidden(self.student, input_ids, attention_mask=attention_mask, position_ids=position_ids)

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Frozen teacher's logits (B, T, V) under ``no_grad``, in the teacher's dtype."""
        if self.teacher is None:
            raise RuntimeError("this module has no live teacher (stored labels are used instead)")
        self.teacher.eval()
        return self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------------------------------------ loss
    def student_loss(self, input_ids: Tensor, targets: Tensor, teacher: Distribution | None = None, *,
                     divergence: str | Divergence = "forward_kl", ce_weight: float = 1.0, temperature: float = 1.0,
                     attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        """The one path from the student's hidden states and output head to the loss.

        Shifts for next-token prediction: position t predicts ``targets[t + 1]`` and is matched to ``teacher[t]``.

        Args:
            input_ids: (B, T) student input.
            targets: (B, T) token ids the student should predict (real text, or the teacher's tokens), -100 masked.
            teacher: the teacher's distribution aligned with ``input_ids``: logits (B, T, V), hidden states with its
                head (:class:`~lightning_distill.signals.TeacherHidden`), or sparse targets (B, T, K) (stored top-k
                or sampled ids, or the teacher's picks); unused when ``ce_weight == 1``.
            divergence: a :class:`~lightning_distill.losses.Divergence` or its name.
            ce_weight: ``loss = (1 - ce_weight) * KD + ce_weight * CE(targets)``.
            temperature: softening temperature of the KD term.
            attention_mask: (B, T) optional padding mask (0 on left padding).
            position_ids: (B, T) positions of left-padded sequences.

        Returns:
            ``{"loss", "kd", "ce"}`` scalars, each a mean over this micro-batch's valid target tokens, and
            ``"tokens"``: that count.
        """
        hidden = self.student_hidden(input_ids, attention_mask, position_ids)[:, :-1]  # (B, T-1, H)
        labels = targets[:, 1:]  # (B, T-1)
        tokens = (labels != IGNORE_INDEX).sum()
        teacher = None if ce_weight == 1.0 or teacher is None else teacher[:, :-1]
        head = self.student.get_output_embeddings()
        kwargs = {"divergence": divergence, "ce_weight": ce_weight, "temperature": temperature}
        chunk_size = self.loss_chunk_size(teacher, hidden.device)
        if chunk_size == 0:
            teacher = teacher.logits() if isinstance(teacher, TeacherHidden) else teacher
            out = losses.distill_loss(head(hidden), teacher, labels, **kwargs)  # logits (B, T-1, V)
        elif isinstance(teacher, TeacherHidden):
            out = chunked.chunked_distill_loss(hidden, head, None, labels, chunk_size=chunk_size,
                                               teacher_hidden=teacher.hidden, teacher_head=teacher.head, **kwargs)
        else:
            tail = {"tail": teacher.tail} if isinstance(teacher, SparseTargets) else {}
            out = chunked.chunked_distill_loss(hidden, head, teacher, labels, chunk_size=chunk_size, **kwargs,
                                               **tail)
        return {**out, "tokens": tokens}

    def loss_chunk_size(self, teacher: Distribution | None, device: torch.device) -> int:
        """``chunk_size`` when set, else the path ``benchmarks/speed.py`` measured fastest: chunks of
        :data:`~lightning_distill.chunked.DEFAULT_CHUNK_SIZE` for a teacher's hidden states (its logits never made)
        and on CUDA; 0 (one pass over the logits) for the rest on CPU."""
        if self.chunk_size is not None:
            return self.chunk_size
        return chunked.DEFAULT_CHUNK_SIZE if isinstance(teacher, TeacherHidden) or device.type == "cuda" else 0

    def backward_loss(self, loss: Tensor, tokens: Tensor) -> Tensor:
        """The value to backpropagate so that the accumulated gradient is token-exact (see :class:`TokenWindow`)."""
        return self.tokens.backward_value(loss, tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.tokens.rescale(optimizer, self._trainer, self.device)

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
        values = {"ce": losses.cross_entropy(student, labels)}
        values.update(self.signal.validation_metrics(self, batch, student, labels, dataloader_idx))
        prefix = "val" if dataloader_idx == 0 else "val_ood"
        self.val_metrics.update(prefix, values, (labels != IGNORE_INDEX).sum())
        if self.eval_new_tokens > 0 and dataloader_idx == 0 and self.teacher is not None:
            scores, tokens = greedy_scores(self, batch, self.eval_prompt_tokens, self.eval_new_tokens)
            self.val_metrics.update(prefix, scores, tokens)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        for key, value in self.val_metrics.compute().items():
            self.log(key, value, sync_dist=False, prog_bar=key == "val/ppl")

    # ----------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal of a batch, which :class:`~lightning_distill.store.LabelWriter` stores:
        ``{"block_idx": (B,), "logits": (B, T, V)}``."""
        return {"block_idx": batch["block_idx"], "logits": self.teacher_logits(batch["input_ids"])}

    def label_settings(self) -> dict[str, Any]:
        """What a label store records about the teacher that wrote it (the dtype as resolved here)."""
        dtype = as_dtype(self.teacher_dtype) or torch.float32
        return {"teacher": self.teacher_name, "teacher_dtype": str(dtype).removeprefix("torch.")}

    # -------------------------------------------------------------------------------------------- optimizer
    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        """(model, learning rate) pairs the optimizer trains; CoDistill adds its teacher."""
        return [(self.student, self.learning_rate)]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on matrices only) with linear warmup and cosine decay, stepped every optimizer step."""
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1000
        return optim.adamw_with_schedule(self.trainable_models(), self.weight_decay, self.warmup_steps,
                                         self.min_lr_ratio, total)

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
        with saved.restoring(saved.read(checkpoint_path, "checkpoint_path")):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                hparams_file=hparams_file, strict=strict, **kwargs)

    # ----------------------------------------------------------------------------------------------- export
    def export(self, path: str) -> str:
        """Write the student and its tokenizer as a Hugging Face folder (``from_pretrained`` loads it). Under FSDP
        every rank must call it (the student is gathered) and rank 0 writes."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"the export folder {path!r} is a file: give a folder to write the student to (it is "
                             "created if missing)")
        self.configure_model()
        state = sharding.student_state_dict(self)  # None unless sharded
        if sharding.is_rank_zero():
            sharding.save_pretrained(self.student, path, state)
            self.tokenizer.save_pretrained(path)
        return path

    def generate(self, prompts: list[str], model: str = "student", max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Continue each prompt with the student or the teacher; returns only the new text."""
        net = self.student if model == "student" else self.teacher if model == "teacher" else None
        if net is None:
            raise ValueError(f"model must be 'student' or 'teacher' (with a live teacher), got {model!r}")
        settings = generation.GenerationSettings(max_new_tokens, do_sample, temperature, top_p)
        with sharding.gathered(self):  # sharded: every rank takes every step (synced)
            return generation.continue_texts(net, self.tokenizer, prompts, settings, synced=sharding.is_sharded(self))
