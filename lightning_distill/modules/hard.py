"""HardDistill: the teacher contributes only its chosen tokens.

- ``mode="top1"`` (token level): at every position of the real text the student is trained with cross-entropy on
  the teacher's arg-max next token (optionally mixed with CE on the real token via ``ce_weight``).
- ``mode="generate"`` (sequence level; Kim & Rush 2016, "Sequence-Level Knowledge Distillation"; the DeepSeek-R1
  distillation recipe): the teacher continues a prompt taken from each block of the corpus, and the student is
  trained on the teacher's tokens only (prompt positions and everything after the teacher's EOS masked;
  :func:`lightning_distill.generation.training_sequences`).

The tokens come from the signal source: a live teacher (continuations kept on disk and reused across epochs and
runs), or with ``labels=PATH`` a label store written once by ``lightning-distill predict``: ``top1`` reads the
teacher's arg-max from a ``top1``, ``topk`` or ``sampled`` store, ``generate`` each block's continuation from a
``generate`` store.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import checks, generation
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.modules.base import DistillModule
from lightning_distill.signals import LiveTeacher, StoredLabels
from lightning_distill.sparse import SparseTargets

MODES = ("top1", "generate")


class HardDistill(DistillModule):
    """Hard-label distillation: cross-entropy on tokens the teacher picked.

    Args:
        teacher: teacher model name (see :class:`DistillModule`).
        student: student spec (see :class:`DistillModule`).
        mode: ``"top1"`` (teacher's arg-max at each position of the real text) or ``"generate"`` (teacher
            continuations of corpus prompts).
        ce_weight: ``top1`` only: weight of CE on the real next token, in [0, 1].
        prompt_tokens: ``generate``: the first this-many tokens of each block form the prompt.
        max_new_tokens: ``generate``: length of the teacher's continuation.
        do_sample: ``generate``: sample instead of greedy decoding.
        temperature: ``generate`` with sampling: sampling temperature > 0.
        top_p: ``generate`` with sampling: nucleus mass in (0, 1].
        generations_dir: ``generate``: folder of stored continuations; default under the cache directory, in a
            subfolder keyed by teacher and generation settings.
        labels: folder of a label store to train from instead of a live teacher: ``top1`` / ``topk`` /
            ``sampled`` for ``mode="top1"``, ``generate`` (same ``prompt_tokens`` and ``max_new_tokens``) for
            ``mode="generate"``.
        **kwargs: :class:`DistillModule` arguments.
    """

    def __init__(
        self,
        teacher: str | None = DEFAULT_TEACHER,
        student: str | dict[str, Any] | None = None,
        mode: str = "top1",
        ce_weight: float = 0.0,
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generations_dir: str | None = None,
        labels: str | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        checks.number("ce_weight", ce_weight, "in [0, 1]", lambda v: 0 <= v <= 1, "0.0")
        checks.integer("prompt_tokens", prompt_tokens, ">= 1", lambda v: v >= 1, "32")
        self.generation = generation.GenerationSettings(max_new_tokens, do_sample, temperature, top_p)
        signal = StoredLabels(labels) if labels is not None else LiveTeacher(generations_dir)
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.mode = mode
        self.ce_weight = ce_weight
        self.prompt_tokens = prompt_tokens
        self.signal = signal

    def check_store(self, manifest: dict[str, Any]) -> None:
        """``top1`` trains from any per-position store; ``generate`` from a generate store of equal settings."""
        kind, where = manifest["kind"], f"labels={self.hparams.labels!r}"
        if (kind == "generate") != (self.mode == "generate"):
            raise ValueError(f"{where} is a {kind!r} store, which mode={self.mode!r} cannot use: "
                             f"set mode={'generate' if kind == 'generate' else 'top1'!r}")
        stored = manifest.get("generation") or {}
        ours = {"prompt_tokens": self.prompt_tokens, "max_new_tokens": self.generation.max_new_tokens}
        for name, value in ours.items():
            if kind == "generate" and stored.get(name) != value:
                raise ValueError(f"{name}={value} differs from the store's {stored.get(name)}: set "
                                 f"{name}={stored.get(name)}")

    def setup(self, stage: str) -> None:
        """Before any work: in ``generate`` mode the prompt must fit in a block (it is each block's first
        ``prompt_tokens``) and prompt + continuation in the models' positions."""
        if self.mode == "generate":
            data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            block = getattr(getattr(data, "hparams", None), "block_size", None)
            if isinstance(block, int) and self.prompt_tokens > block:
                raise ValueError(f"prompt_tokens={self.prompt_tokens} is longer than the data's block_size={block} "
                                 f"(a prompt is a block's first prompt_tokens): use prompt_tokens <= {block}")
            total, limit = self.prompt_tokens + self.generation.max_new_tokens, self.max_positions
            if limit is not None and total > limit:
                raise ValueError(f"prompt_tokens + max_new_tokens = {total} is more than the models' {limit} "
                                 f"positions: use max_new_tokens <= {limit - self.prompt_tokens}")
        super().setup(stage)

    def compares_vocabularies(self) -> bool:
        """``top1`` matches the teacher's picks id by id; ``generate`` trains on its continuations only."""
        return self.mode == "top1"

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.mode == "top1":
            picks = SparseTargets.from_picks(self.signal.picks(self, batch))  # (B, T, 1): KD is CE on the picks
            parts = self.student_loss(batch["input_ids"], batch["labels"], picks, ce_weight=self.ce_weight)
        else:
            sequences, targets = self.teacher_sequences(batch)  # (B, P + N) each
            parts = self.student_loss(sequences, targets, ce_weight=1.0)
            parts = {"loss": parts["loss"], "kd": parts["ce"], "tokens": parts["tokens"]}
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

    def teacher_sequences(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Prompt (each block's first ``prompt_tokens``) + the teacher's continuation, and the targets: see
        :func:`lightning_distill.generation.training_sequences`."""
        continuations = self.signal.continuations(self, batch, self.prompt_tokens, self.generation)  # (B, N)
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return generation.training_sequences(prompts, continuations, eos, pad)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal for the label writer: ``top1`` as every method (logits); ``generate``:
        ``{"block_idx": (B,), "continuations": (B, N)}`` of each block's prompt, freshly generated."""
        if self.mode == "top1":
            return super().predict_step(batch, batch_idx, dataloader_idx)
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        new = generation.generate(self.teacher, prompts, self.generation, self.tokenizer.eos_token_id)
        return {"block_idx": batch["block_idx"], "continuations": new}

    def label_settings(self) -> dict[str, Any]:
        """The teacher, and in ``generate`` mode the generation settings a store records."""
        settings = super().label_settings()
        if self.mode == "generate":
            settings["generation"] = {"prompt_tokens": self.prompt_tokens, **vars(self.generation)}
        return settings
