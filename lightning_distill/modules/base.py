"""DistillModule: what SoftDistill, HardDistill and CoDistill share.

The module is a system wiring two models (Lightning's style guide): a trainable student and a teacher that is
either frozen (a signal source) or trained alongside (CoDistill). It owns

- building both in an idempotent :meth:`configure_model` (so FSDP/DeepSpeed can shard them);
- a frozen teacher's hygiene: ``eval()``, ``requires_grad=False``, ``no_grad``, its own dtype, never in the optimizer,
  never in a checkpoint (stripped on save, reloaded by name on load), ignored by DDP;
- the one place where the student's hidden states meet its output head and the loss (:meth:`student_loss`),
  chunked over positions when ``chunk_size > 0`` so that (B, T, V) logits are never held;
- token-exact normalization over a gradient-accumulation window (and over DDP ranks);
- validation metrics logged under the same names by every method; AdamW with warmup + cosine decay; export;
- the teacher's signal for the label writer (:meth:`predict_step`), and reading it back: a method with
  ``labels=PATH`` never keeps a teacher in memory and takes its signal from ``batch["teacher"]``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill import chunked, losses
from lightning_distill import labels as stored_labels
from lightning_distill.backbone import (
    DEFAULT_TEACHER,
    _as_dtype,
    build_student,
    check_tokenizers,
    freeze,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

# A frozen teacher is in eval mode on purpose; Lightning warns about eval-mode modules at fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

IGNORE_INDEX = -100
#: token-weighted validation means; ``ce`` and ``teacher_ce`` are also logged as perplexities
VAL_METRICS = ("ce", "kl", "agreement", "teacher_ce")


class DistillModule(L.LightningModule):
    """Student backbone, teacher placement, shared metrics, optimizer and export.

    Args:
        teacher: teacher model name: ``builtin:smollm2-135m-instruct``, a Hugging Face id or a local folder. ``None``
            when the teacher signal comes from stored labels (then the student must not be ``from_teacher``... unless
            a teacher name is given only to build it; see ``labels``).
        student: ``{"from_teacher": {"layers": N}}`` (depth-pruned copy of the teacher), a model name, or
            ``{"config": {...}}`` for a fresh random model.
        teacher_dtype: dtype of a frozen teacher's weights: ``"bfloat16"`` halves its memory and, on GPUs and
            CPUs with bf16 units, runs it faster; ``"auto"`` (default) picks bfloat16 where it is native,
            else float32; ``None`` keeps
            float32.
        learning_rate: peak learning rate of AdamW for the student (1e-3: best of a sweep for the pruned
            6-layer default, see ``benchmarks/recipe_sweep.py``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warmup steps, then cosine decay to ``min_lr_ratio * learning_rate`` at the last step.
        min_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].
        chunk_size: compute the loss from hidden states in chunks of this many positions (0: all at once). Lower
            memory on the (B, T, V) logits at the cost of recomputing each chunk in backward.
        tokenizer: model name whose tokenizer to use; default the teacher's (or the student's when it is a name
            and there is no teacher).
        train_embeddings: train the student's token embeddings and output head (tied in SmolLM2). ``False``
            keeps the teacher's vocabulary geometry fixed and trains only the transformer layers.
    """

    #: CoDistill trains its teacher; the other methods keep it frozen.
    trains_teacher: bool = False
    #: folder of a label store when the teacher signal is read from disk (SoftDistill / HardDistill ``labels=``)
    labels: str | None = None
    #: that store's manifest, read in :meth:`setup`
    label_manifest: dict[str, Any] | None = None

    def __init__(
        self,
        teacher: str | dict[str, Any] | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        teacher_dtype: str | None = "auto",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        chunk_size: int = 0,
        tokenizer: str | None = None,
        train_embeddings: bool = True,
    ) -> None:
        super().__init__()
        student = {"from_teacher": {"layers": 6}} if student is None else student
        if teacher is None and isinstance(student, dict) and "from_teacher" in student:
            raise ValueError("student={'from_teacher': ...} needs a teacher name; set teacher= or name a student model")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 disables chunking), got {chunk_size}")
        _as_dtype(teacher_dtype)  # validates the name early
        self.teacher_name = teacher
        self.student_spec = student
        self.teacher_dtype = teacher_dtype
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.chunk_size = chunk_size
        self.train_embeddings = train_embeddings
        self.tokenizer_name = tokenizer or (teacher if isinstance(teacher, str) else student)
        if not isinstance(self.tokenizer_name, str):
            raise ValueError("neither teacher nor student is a model name: set tokenizer= to a model name")
        self.student: PreTrainedModel | None = None
        self.teacher: PreTrainedModel | None = None
        # Loaded now (cheap) because the data module tokenizes before configure_model runs.
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.tokenizer_name)
        self.val_metrics = torch.nn.ModuleDict(
            {f"{split}/{name}": MeanMetric() for split in ("val", "val_ood") for name in VAL_METRICS}
        )
        self._window_tokens = 0.0  # valid target tokens seen since the last optimizer step
        self._loss_scale: float | None = None  # constant divisor of summed losses (first micro-batch's size)
        self._step_start = 0.0

    # ----------------------------------------------------------------------------------------------- models
    def needs_teacher(self) -> bool:
        """Whether this run keeps a teacher in memory (False when the signal comes from stored labels)."""
        return self.teacher_name is not None and self.labels is None

    def configure_model(self) -> None:
        """Build (once) the tokenizer, the teacher and the student; idempotent, as Lightning asks. Without
        :meth:`needs_teacher`, a named teacher is loaded only to build a ``from_teacher`` student, then dropped."""
        if self.student is not None:
            return
        teacher = None
        prunes_teacher = isinstance(self.student_spec, dict) and "from_teacher" in self.student_spec
        if isinstance(self.teacher_name, dict):  # a fresh random teacher (CoDistill), sized to the tokenizer
            spec = {"config": {"vocab_size": len(self.tokenizer), **self.teacher_name.get("config", {})}}
            teacher = build_student(spec)
        elif self.teacher_name is not None and (self.needs_teacher() or prunes_teacher):
            teacher = load_model(self.teacher_name)  # fp32 first: a from_teacher student copies exact weights
        self.student = build_student(self.student_spec, teacher)
        if not self.train_embeddings:
            self.student.get_input_embeddings().requires_grad_(False)
            self.student.get_output_embeddings().requires_grad_(False)
        if isinstance(self.student_spec, str) and teacher is not None:
            check_tokenizers(self.tokenizer, load_tokenizer(self.student_spec), self.teacher_name,
                             self.student_spec, teacher.config.vocab_size, self.student.config.vocab_size)
        if teacher is not None and self.needs_teacher():
            self.teacher = teacher.train() if self.trains_teacher else freeze(teacher.to(_as_dtype(self.teacher_dtype)))
            if not self.trains_teacher:  # DDP must neither broadcast nor all-reduce a frozen teacher
                self._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in teacher.named_parameters()]
                self._ddp_params_and_buffers_to_ignore += [f"teacher.{n}" for n, _ in teacher.named_buffers()]

    def setup(self, stage: str) -> None:
        """With ``labels``: read the store's manifest and let the method check that it can train from it."""
        if self.labels is not None and self.label_manifest is None:
            self.label_manifest = stored_labels.read_manifest(self.labels)
            self.check_labels(self.label_manifest)

    def check_labels(self, manifest: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the argument to change when the store cannot feed this method."""

    def stored_signal(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The stored labels of a batch (``labels`` mode), or a clear error when the loader did not attach them."""
        if "teacher" not in batch:
            raise RuntimeError(f"labels={self.labels!r} is set but the batch carries no stored labels: train with "
                               "DistillDataModule, which attaches them by block_idx")
        return batch["teacher"]

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the models take (the data module checks ``block_size`` against it); read from the
        named models' configs, so it is known before the weights are loaded."""
        limits = []
        for spec in (self.teacher_name, self.student_spec):
            if isinstance(spec, str):
                config = AutoConfig.from_pretrained(resolve_model_path(spec))
                limits.append(getattr(config, "max_position_embeddings", None))
            elif isinstance(spec, dict) and "config" in spec:
                limits.append(spec["config"].get("max_position_embeddings"))
        limits = [x for x in limits if x]
        return min(limits) if limits else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Student next-token logits (B, T, V), for inference."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    def student_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states of the student, before its output head: (B, T, H)."""
        return self.student.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Frozen teacher's logits (B, T, V) under ``no_grad``, in the teacher's dtype."""
        if self.teacher is None:
            raise RuntimeError("this module has no live teacher (stored labels are used instead)")
        self.teacher.eval()
        return self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------------------------------------ loss
    def student_loss(
        self,
        input_ids: Tensor,
        targets: Tensor,
        teacher: Tensor | None = None,
        *,
        divergence: str = "forward_kl",
        ce_weight: float = 1.0,
        temperature: float = 1.0,
        attention_mask: Tensor | None = None,
        **params: Any,
    ) -> dict[str, Tensor]:
        """The one path from the student's hidden states and output head to the loss.

        Shifts for next-token prediction: position t predicts ``targets[t + 1]`` and is matched to
        ``teacher[t]``.

        Args:
            input_ids: (B, T) student input.
            targets: (B, T) token ids the student should predict (real text, or teacher picks), -100 masked.
            teacher: teacher signal aligned with ``input_ids`` (position t predicts token t + 1): logits (B, T, V),
                stored :class:`~lightning_distill.losses.SparseTargets` (B, T, K) (top-k or sampled), or hard
                picks (B, T) long (then KD is cross-entropy on the picks); unused when ``ce_weight == 1``.
            divergence: name in :data:`losses.DIVERGENCES`.
            ce_weight: ``loss = (1 - ce_weight) * KD + ce_weight * CE(targets)``.
            temperature: softening temperature of the KD term.
            attention_mask: (B, T) optional padding mask.
            **params: divergence parameters (``beta``, ``alpha``).

        Returns:
            ``{"loss", "kd", "ce"}`` scalars, each a mean over this micro-batch's valid target tokens, and
            ``"tokens"``: that count.
        """
        hidden = self.student_hidden(input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
        labels = targets[:, 1:]  # (B, T-1)
        tokens = (labels != IGNORE_INDEX).sum()
        teacher = None if ce_weight == 1.0 or teacher is None else teacher[:, :-1]
        if isinstance(teacher, Tensor) and not teacher.is_floating_point():  # hard picks (B, T-1)
            # KD is CE on the picks: a sparse target of one id with weight 1, so that KD and CE share one head
            # projection and one log-softmax
            weights = torch.ones_like(teacher, dtype=torch.float32)
            teacher = losses.SparseTargets("sampled", teacher.unsqueeze(-1), weights.unsqueeze(-1))
            divergence, temperature, params = "forward_kl", 1.0, {}
        out = self._head_loss(hidden, teacher, labels, divergence=divergence, ce_weight=ce_weight,
                              temperature=temperature, **params)
        return {**out, "tokens": tokens}

    def _head_loss(self, hidden: Tensor, teacher: Tensor | losses.SparseTargets | None, labels: Tensor,
                   **kwargs: Any) -> dict[str, Tensor]:
        """Student output head + loss on (B, T', H) hidden states, chunked when ``chunk_size > 0``."""
        head = self.student.get_output_embeddings()
        if self.chunk_size > 0:
            return chunked.chunked_distill_loss(hidden, head, teacher, labels, chunk_size=self.chunk_size, **kwargs)
        return losses.distill_loss(head(hidden), teacher, labels, **kwargs)  # logits (B, T', V)

    def backward_loss(self, loss: Tensor, tokens: Tensor) -> Tensor:
        """Turn a micro-batch mean into the value to backpropagate so that the accumulated gradient is the mean
        over every valid token of the whole accumulation window (and of all ranks); see
        :meth:`on_before_optimizer_step`."""
        if self._loss_scale is None:
            self._loss_scale = max(float(tokens), 1.0)
        self._window_tokens += float(tokens)
        return loss * tokens / self._loss_scale

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale accumulated gradients from ``sum / (N * scale)`` to ``sum / window_tokens``.

        Each micro-batch backpropagated ``sum_i / scale``; Lightning divided by N = accumulate_grad_batches and
        DDP averaged over W ranks, so the gradient is ``sum / (N * W * scale)``. Multiplying by
        ``N * W * scale / total_tokens`` gives exactly ``sum / total_tokens``."""
        if self._loss_scale is None:
            return
        total = torch.tensor(self._window_tokens, device=self.device, dtype=torch.float64)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        factor = self.trainer.accumulate_grad_batches * world * self._loss_scale / max(float(total), 1.0)
        self._window_tokens = 0.0
        if factor != 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)

    def log_train(self, parts: dict[str, Tensor], batch_size: int) -> None:
        """Log the loss parts as ``train/<name>`` (means over valid tokens) and throughput."""
        for name, value in parts.items():
            if name != "tokens":
                self.log(f"train/{name}", value.detach().float(), prog_bar=name == "loss", batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), batch_size=batch["input_ids"].shape[0])

    # ---------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Student perplexity and cross-entropy, KL(teacher || student), top-1 agreement with the teacher and the
        teacher's own perplexity, under ``val/`` (in-domain) or ``val_ood/`` (second loader: out-of-domain text)."""
        prefix = "val" if dataloader_idx == 0 else "val_ood"
        input_ids, labels = batch["input_ids"], batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        student = self(input_ids)[:, :-1].float()  # (B, T-1, V)
        values = {"ce": losses.cross_entropy(student, labels)}
        teacher = self.validation_teacher_logits(batch)
        if teacher is not None:
            teacher = teacher[:, :-1].float()
            values["kl"] = losses.forward_kl(student, teacher, labels)
            agree = (student.argmax(-1) == teacher.argmax(-1)) & mask
            values["agreement"] = agree.sum() / mask.sum().clamp(min=1)
            values["teacher_ce"] = losses.cross_entropy(teacher, labels)
        elif self.label_manifest is not None and "teacher" in batch:  # stored labels of the validation split
            stored = stored_labels.shifted(batch["teacher"])
            values.update(stored_labels.stored_metrics(student, stored, labels, self.label_manifest["temperature"]))
        weight = mask.sum().float()
        for name, value in values.items():
            self.val_metrics[f"{prefix}/{name}"].update(value.detach().float(), weight)

    def validation_teacher_logits(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Teacher logits (B, T, V) for validation metrics; None when no live teacher (subclasses may answer
        from stored labels)."""
        return self.teacher_logits(batch["input_ids"]) if self.teacher is not None else None

    def on_validation_epoch_start(self) -> None:
        # Fresh metric states as normal tensors: states created under inference mode (by `trainer.validate`)
        # could not be updated later by the validation inside `trainer.fit`.
        with torch.inference_mode(False):
            for metric in self.val_metrics.values():
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_metrics.items():
            if not metric.update_called:
                continue
            value = metric.compute()
            self.log(key, value, sync_dist=False)
            prefix, name = key.split("/")
            if name in ("ce", "teacher_ce"):
                ppl_name = "ppl" if name == "ce" else "teacher_ppl"
                self.log(f"{prefix}/{ppl_name}", torch.exp(value.clamp(max=30)), prog_bar=key == "val/ce")

    # ----------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal of a batch, which :class:`~lightning_distill.callbacks.LabelWriter` stores:
        ``{"block_idx": (B,), "logits": (B, T, V)}``."""
        return {"block_idx": batch["block_idx"], "logits": self.teacher_logits(batch["input_ids"])}

    def label_settings(self) -> dict[str, Any]:
        """What a label store records about the teacher that wrote it (the dtype as resolved here)."""
        dtype = _as_dtype(self.teacher_dtype) or torch.float32
        return {"teacher": self.teacher_name, "teacher_dtype": str(dtype).removeprefix("torch.")}

    # -------------------------------------------------------------------------------------------- optimizer
    def trainable_models(self) -> list[tuple[torch.nn.Module, float]]:
        """(model, learning rate) pairs the optimizer trains; CoDistill adds its teacher."""
        return [(self.student, self.learning_rate)]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on matrices only) with linear warmup and cosine decay, stepped every optimizer step."""
        groups = []
        for model, lr in self.trainable_models():
            params = [p for p in model.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups.append({"params": decay, "lr": lr, "weight_decay": self.weight_decay})
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1000
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak learning rate at ``step`` of ``total``: linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min((step - self.warmup_steps) / max(total - self.warmup_steps, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen teacher is reloaded from its name: keep it out of the checkpoint. Record the method so that
        ``lightning-distill export`` knows which class to load."""
        checkpoint["lightning_distill_class"] = type(self).__name__
        if not self.trains_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the freshly reloaded frozen teacher's weights back in so that strict loading succeeds."""
        if not self.trains_teacher and self.teacher is not None:
            state = checkpoint["state_dict"]
            for key, value in self.teacher.state_dict(prefix="teacher.").items():
                state.setdefault(key, value)

    # ----------------------------------------------------------------------------------------------- export
    def export(self, path: str) -> str:
        """Write the student and its tokenizer as a Hugging Face folder (``from_pretrained`` loads it)."""
        self.configure_model()
        self.student.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    @torch.no_grad()
    def generate(self, prompts: list[str], model: str = "student", max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Continue each prompt with the student or the teacher; returns only the new text."""
        net = self.student if model == "student" else self.teacher
        if net is None:
            raise ValueError(f"model must be 'student' or 'teacher' (with a live teacher), got {model!r}")
        was_training = net.training
        net.eval()
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
            out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature if do_sample else None,
                               top_p=top_p if do_sample else None, pad_token_id=self.tokenizer.pad_token_id)
            outputs.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        net.train(was_training)
        return outputs
