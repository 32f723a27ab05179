"""A frozen teacher run live: under ``no_grad``, in ``eval()``, in its own dtype, beside the student.

For soft methods it runs to its final hidden states and hands them over with its output head
(:class:`~lightning_distill.losses.TeacherHidden`), so the loss makes the teacher's logits chunk by chunk.
Its picks are its arg-max; its continuations are generated with the KV cache and kept on disk
(:class:`~lightning_distill.generation.GenerationCache`), so later epochs and runs reuse them.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from lightning_distill import generation, metrics
from lightning_distill.backbone import Run, final_hidden
from lightning_distill.losses import TeacherHidden
from lightning_distill.signals.base import Batch, TeacherSignal


class LiveTeacher(TeacherSignal):
    """The run's frozen teacher, asked live.

    Args:
        cache_dir: folder of stored continuations (``continuations``); default under the cache directory, in a
            subfolder keyed by teacher, generation settings and tokenizer.
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._caches: dict[str, generation.GenerationCache] = {}

    @torch.no_grad()
    def distribution(self, run: Run, batch: Batch, split: str = "train") -> TeacherHidden:
        """The teacher's final hidden states (B, T, H_t) and its output head."""
        teacher = _teacher(run)
        hidden = final_hidden(teacher, batch["input_ids"], **padding_of(batch))  # (B, T, H_t)
        return TeacherHidden(hidden, teacher.get_output_embeddings())

    @staticmethod
    @torch.no_grad()
    def logits(run: Run, batch: Batch) -> Tensor:
        """The teacher's logits (B, T, V) in its dtype."""
        return _teacher(run)(input_ids=batch["input_ids"], **padding_of(batch)).logits

    @torch.no_grad()
    def token_logprobs(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        logits = self.logits(run, batch)  # (B, T, V)
        following = batch["input_ids"].roll(-1, dims=1).unsqueeze(-1)  # (B, T, 1): the token at t + 1
        return torch.log_softmax(logits.float(), -1).gather(-1, following).squeeze(-1)  # (B, T)

    def picks(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        return self.logits(run, batch).argmax(-1)  # (B, T): the teacher's next token at t

    def continuations(self, run: Run, batch: Batch, prompt_tokens: int, settings: generation.GenerationSettings,
                      split: str = "train") -> Tensor:
        """From the generation cache, generating (and caching) only the prompts not there yet."""
        prompts = batch["input_ids"][:, :prompt_tokens]  # (B, P), equal lengths: no padding needed
        cache = self.cache(run, prompt_tokens, settings)
        found = cache.get_many(prompts)
        missing = [i for i, seq in enumerate(found) if seq is None]
        if missing:
            new = generation.generate(_teacher(run), prompts[missing], settings, run.tokenizer.eos_token_id)  # (M, N)
            cache.put_many(prompts[missing], new)
            for row, i in enumerate(missing):
                found[i] = new[row]
        return torch.stack([seq.to(prompts.device) for seq in found])  # (B, N)

    def cache(self, run: Run, prompt_tokens: int,
              settings: generation.GenerationSettings) -> generation.GenerationCache:
        """The on-disk store of this teacher's continuations for these settings."""
        key = {"teacher": run.teacher_name, "prompt_tokens": prompt_tokens, **vars(settings)}
        name = json.dumps(key, sort_keys=True, default=str)
        if name not in self._caches:
            self._caches[name] = generation.GenerationCache.for_settings(key, run.tokenizer, self.cache_dir)
        return self._caches[name]

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        return metrics.against_logits(student_logits, self.logits(run, batch)[:, :-1], labels)


def _teacher(run: Run) -> nn.Module:
    """The run's teacher model, in eval mode; a clear error when it keeps none."""
    if run.teacher is None:
        raise RuntimeError("this run keeps no teacher model (stored labels are used), or configure_model() has not "
                           "run yet (the Trainer runs it)")
    return run.teacher.eval()


def padding_of(batch: Batch) -> dict[str, Tensor]:
    """The ``attention_mask`` and ``position_ids`` of a batch of left-padded sequences (empty when unpadded)."""
    return {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
