"""A frozen teacher run live: under ``no_grad``, in ``eval()``, in its own dtype, beside the student.

For soft methods it runs to its final hidden states and hands them over with its output head
(:class:`~lightning_distill.signals.base.TeacherHidden`), so the loss makes the teacher's logits chunk by chunk.
Its picks are its arg-max; its continuations are generated with the KV cache and kept on disk
(:class:`~lightning_distill.generation.GenerationCache`), so later epochs and runs reuse them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_distill import generation, metrics, sharding
from lightning_distill.signals.base import Batch, TeacherHidden, TeacherSignal, padding_of

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule


class LiveTeacher(TeacherSignal):
    """The module's frozen teacher, asked live.

    Args:
        generations_dir: folder of stored continuations (``continuations``); default under the cache directory,
            in a subfolder keyed by teacher, generation settings and tokenizer.
    """

    def __init__(self, generations_dir: str | None = None) -> None:
        self.generations_dir = generations_dir
        self._caches: dict[str, generation.GenerationCache] = {}

    @staticmethod
    def teacher(module: DistillModule) -> torch.nn.Module:
        """The module's teacher model, in eval mode; a clear error when it has none."""
        if module.teacher is None:
            raise RuntimeError("this module has no live teacher: call configure_model() first (the Trainer does)")
        return module.teacher.eval()

    @torch.no_grad()
    def hidden(self, module: DistillModule, input_ids: Tensor, **padding: Tensor | None) -> TeacherHidden:
        """The teacher's final hidden states (B, T, H_t) and its output head (``padding``: the
        ``attention_mask`` and ``position_ids`` of left-padded sequences)."""
        teacher = self.teacher(module)
        hidden = sharding.final_hidden(teacher, input_ids, **padding)  # (B, T, H_t)
        return TeacherHidden(hidden, teacher.get_output_embeddings())

    @torch.no_grad()
    def logits(self, module: DistillModule, input_ids: Tensor) -> Tensor:
        """The teacher's logits (B, T, V) in its dtype."""
        return self.teacher(module)(input_ids=input_ids).logits

    def distribution(self, module: DistillModule, batch: Batch, split: str = "train") -> TeacherHidden:
        return self.hidden(module, batch["input_ids"], **padding_of(batch))

    @torch.no_grad()
    def token_logprobs(self, module: DistillModule, batch: Batch, split: str = "train") -> Tensor:
        logits = self.teacher(module)(input_ids=batch["input_ids"], **padding_of(batch)).logits  # (B, T, V)
        following = batch["input_ids"].roll(-1, dims=1).unsqueeze(-1)  # (B, T, 1): the token at t + 1
        return torch.log_softmax(logits.float(), -1).gather(-1, following).squeeze(-1)  # (B, T)

    def picks(self, module: DistillModule, batch: Batch, split: str = "train") -> Tensor:
        return self.logits(module, batch["input_ids"]).argmax(-1)  # (B, T): the teacher's next token at t

    def continuations(self, module: DistillModule, batch: Batch, prompt_tokens: int,
                      settings: generation.GenerationSettings, split: str = "train") -> Tensor:
        """From the generation cache, generating (and caching) only the prompts not there yet."""
        prompts = batch["input_ids"][:, :prompt_tokens]  # (B, P), equal lengths: no padding needed
        cache = self.cache(module, prompt_tokens, settings)
        found = cache.get_many(prompts)
        missing = [i for i, seq in enumerate(found) if seq is None]
        if missing:
            new = generation.generate(self.teacher(module), prompts[missing], settings,
                                      module.tokenizer.eos_token_id)  # (M, N)
            cache.put_many(prompts[missing], new)
            for row, i in enumerate(missing):
                found[i] = new[row]
        return torch.stack([seq.to(prompts.device) for seq in found])  # (B, N)

    def cache(self, module: DistillModule, prompt_tokens: int,
              settings: generation.GenerationSettings) -> generation.GenerationCache:
        """The on-disk store of this teacher's continuations for these settings."""
        key = {"teacher": module.teacher_name, "prompt_tokens": prompt_tokens, **vars(settings)}
        name = json.dumps(key, sort_keys=True, default=str)
        if name not in self._caches:
            self._caches[name] = generation.GenerationCache.for_settings(key, module.tokenizer, self.generations_dir)
        return self._caches[name]

    def validation_metrics(self, module: DistillModule, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        return metrics.against_logits(student_logits, self.logits(module, batch["input_ids"])[:, :-1], labels)
