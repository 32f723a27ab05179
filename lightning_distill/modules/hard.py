"""HardDistill: the teacher contributes only its chosen tokens.

Two modes:

- ``top1``: at every position of the real text the student is trained with cross-entropy on the teacher's arg-max
  next token (optionally mixed with CE on the real token via ``ce_weight``).
- ``generate``: sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"; the DeepSeek-R1
  distillation recipe): the teacher continues a prompt taken from each block of the corpus, and the student is
  trained on the teacher's tokens only (prompt positions masked). Generations are kept on disk
  (:class:`~lightning_distill.labels.GenerationCache`) and reused across epochs and runs, never regenerated.

With ``labels=PATH`` the teacher's tokens come from a label store written once by ``lightning-distill predict``
(:mod:`lightning_distill.labels`) and the teacher is never kept in memory: ``top1`` reads the teacher's arg-max
from a ``top1``, ``topk`` or ``sampled`` store; ``generate`` reads the continuation of each block from a
``generate`` store (the offline form of the generation cache, written by this class's :meth:`predict_step`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.labels import GenerationCache
from lightning_distill.modules.base import IGNORE_INDEX, DistillModule

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
            ``mode="generate"``. The data module attaches it (and takes it from here).
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
        if not 0 <= ce_weight <= 1:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if labels is not None and (not isinstance(labels, str) or not labels):
            raise ValueError(f"labels must be the folder of a label store, or None for a live teacher, got {labels!r}")
        super().__init__(teacher=teacher, student=student, **kwargs)
        self.save_hyperparameters()
        self.mode = mode
        self.ce_weight = ce_weight
        self.prompt_tokens = prompt_tokens
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                           "temperature": temperature, "top_p": top_p}
        self.generations_dir = generations_dir
        self.labels = labels
        self._cache: GenerationCache | None = None

    def check_labels(self, manifest: dict[str, Any]) -> None:
        """``top1`` trains from any per-position store; ``generate`` from a generate store of equal settings."""
        kind = manifest["kind"]
        if (kind == "generate") != (self.mode == "generate"):
            raise ValueError(f"labels={self.labels!r} is a {kind!r} store, which mode={self.mode!r} cannot use: "
                             f"set mode={'generate' if kind == 'generate' else 'top1'!r}")
        stored = manifest.get("generation") or {}
        ours = {"prompt_tokens": self.prompt_tokens, "max_new_tokens": self.generation["max_new_tokens"]}
        for name, value in ours.items():
            if kind == "generate" and stored.get(name) != value:
                raise ValueError(f"{name}={value} differs from the store's {stored.get(name)}: set "
                                 f"{name}={stored.get(name)}")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.mode == "top1":
            if self.labels is not None:
                picks = self.stored_signal(batch)["argmax"]  # (B, T)
            else:
                picks = self.teacher_logits(batch["input_ids"]).argmax(-1)  # (B, T): teacher's next token at t
            parts = self.student_loss(batch["input_ids"], batch["labels"], picks, ce_weight=self.ce_weight)
        else:
            if self.labels is not None:
                prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
                sequences, targets = self.sequences(prompts, self.stored_signal(batch)["continuation"])
            else:
                sequences, targets = self.teacher_sequences(batch["input_ids"])  # (B, P + N) each
            parts = self.student_loss(sequences, targets, ce_weight=1.0)
            parts = {"loss": parts["loss"], "kd": parts["ce"], "tokens": parts["tokens"]}
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])

    @property
    def cache(self) -> GenerationCache:
        """The on-disk store of teacher continuations for this teacher and these settings."""
        if self._cache is None:
            key = {"teacher": self.teacher_name, "prompt_tokens": self.prompt_tokens, **self.generation}
            self._cache = GenerationCache.for_settings(key, self.tokenizer, self.generations_dir)
        return self._cache

    def teacher_sequences(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Prompt + teacher continuation for each block, generating only those not yet on disk.

        Args:
            input_ids: (B, T) blocks of real text; the first ``prompt_tokens`` of each are the prompt.

        Returns:
            As :meth:`sequences`.
        """
        prompts = input_ids[:, : self.prompt_tokens]  # (B, P), equal lengths: no padding needed
        return self.sequences(prompts, self.continuations(prompts))

    def continuations(self, prompts: Tensor) -> Tensor:
        """The teacher's continuations (B, N) of prompts (B, P): from the generation cache, generating (and
        caching) only those not there yet."""
        found = self.cache.get_many(prompts)
        missing = [i for i, seq in enumerate(found) if seq is None]
        if missing:
            generated = self.generate_ids(prompts[missing])  # (M, N)
            self.cache.put_many(prompts[missing], generated)
            for row, i in enumerate(missing):
                found[i] = generated[row]
        return torch.stack([seq.to(prompts.device) for seq in found])  # (B, N)

    def sequences(self, prompts: Tensor, continuations: Tensor) -> tuple[Tensor, Tensor]:
        """Training sequences from prompts (B, P) and teacher continuations (B, N), live or stored.

        Returns:
            ``sequences`` (B, P + N) token ids and ``targets`` (B, P + N): the teacher's tokens up to and including
            its first EOS, -100 on the prompt and after the EOS.
        """
        eos = self.tokenizer.eos_token_id
        after_eos = (continuations == eos).long().cumsum(-1) - (continuations == eos).long() > 0  # past first EOS
        targets = continuations.masked_fill(after_eos, IGNORE_INDEX)
        targets = torch.cat([torch.full_like(prompts, IGNORE_INDEX), targets], 1)
        pad = self.tokenizer.pad_token_id
        return torch.cat([prompts, continuations.masked_fill(after_eos, pad)], 1), targets

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The teacher's signal for the label writer: ``top1`` as every method (logits); ``generate``:
        ``{"block_idx": (B,), "continuations": (B, N)}`` of each block's prompt, freshly generated."""
        if self.mode == "top1":
            return super().predict_step(batch, batch_idx, dataloader_idx)
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        return {"block_idx": batch["block_idx"], "continuations": self.generate_ids(prompts)}

    def label_settings(self) -> dict[str, Any]:
        """The teacher, and in ``generate`` mode the generation settings a store records."""
        settings = super().label_settings()
        if self.mode == "generate":
            settings["generation"] = {"prompt_tokens": self.prompt_tokens, **self.generation}
        return settings

    @torch.no_grad()
    def generate_ids(self, prompts: Tensor) -> Tensor:
        """Teacher continuations of equal-length prompts (M, P) -> (M, max_new_tokens), EOS-padded."""
        self.teacher.eval()
        sample = self.generation["do_sample"]
        out = self.teacher.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=self.generation["max_new_tokens"],
            do_sample=sample,
            temperature=self.generation["temperature"] if sample else None,
            top_p=self.generation["top_p"] if sample else None, pad_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, prompts.shape[1]:]
        width = self.generation["max_new_tokens"]
        if new.shape[1] < width:  # every row stopped early
            new = torch.cat([new, new.new_full((new.shape[0], width - new.shape[1]), self.tokenizer.eos_token_id)], 1)
        return new.cpu()
