"""Sequence-level hard distillation, HardDistill's ``mode="generate"`` (Kim & Rush 2016, "Sequence-Level Knowledge
Distillation"; the DeepSeek-R1 distillation recipe): the teacher continues a prompt taken from each block of the
corpus, and the student is trained on the teacher's tokens only (prompt positions and everything after the
teacher's EOS masked, :func:`lightning_distill.generation.training_sequences`).

What this mode adds to a method, kept apart from the token-level ``top1`` path: the checks that a prompt fits a
block and prompt + continuation the models' positions, the store it trains from, the training sequences, the
continuations it writes when labelling, and the settings a store records.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_distill import generation
from lightning_distill.backbone import Run
from lightning_distill.options import Generation
from lightning_distill.signals import TeacherSignal


class TeacherSequences:
    """The teacher's continuations of prompts, and what a method does with them.

    Args:
        options: prompt length, continuation length and decoding (:class:`~lightning_distill.options.Generation`).
    """

    def __init__(self, options: Generation) -> None:
        self.prompt_tokens = options.prompt_tokens
        self.settings = generation.GenerationSettings(options.max_new_tokens, options.do_sample, options.temperature,
                                                      options.top_p)

    def check_store(self, manifest: dict[str, Any]) -> None:
        """A ``generate`` store must have been written with this prompt length and continuation length."""
        stored = manifest.get("generation") or {}
        ours = {"prompt_tokens": self.prompt_tokens, "max_new_tokens": self.settings.max_new_tokens}
        for name, value in ours.items():
            if stored.get(name) != value:
                raise ValueError(f"generation.{name}={value} differs from the store's {stored.get(name)}: set "
                                 f"generation.{name}={stored.get(name)}")

    def check_fit(self, max_positions: int | None, data: Any = None) -> None:
        """Before any work: the prompt is each block's first ``prompt_tokens``, so it must fit in a block of the data
        module ``data``, and prompt + continuation in the models' ``max_positions``."""
        block = getattr(getattr(data, "hparams", None), "block_size", None)
        if isinstance(block, int) and self.prompt_tokens > block:
            raise ValueError(f"generation.prompt_tokens={self.prompt_tokens} is longer than the data's block_size="
                             f"{block} (a prompt is a block's first prompt_tokens): use prompt_tokens <= {block}")
        total = self.prompt_tokens + self.settings.max_new_tokens
        if max_positions is not None and total > max_positions:
            raise ValueError(f"generation.prompt_tokens + max_new_tokens = {total} is more than the models' "
                             f"{max_positions} positions: use max_new_tokens <= {max_positions - self.prompt_tokens}")

    def training_batch(self, signal: TeacherSignal, run: Run, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Prompt + the teacher's continuation (B, P + N) from the signal, and the targets (B, P + N)."""
        continuations = signal.continuations(run, batch, self.prompt_tokens, self.settings)  # (B, N)
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
        return generation.training_sequences(prompts, continuations, eos, pad)

    def predict(self, run: Run, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a label writer stores: ``{"block_idx": (B,), "continuations": (B, N)}``, freshly generated."""
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        new = generation.generate(run.teacher, prompts, self.settings, run.tokenizer.eos_token_id)
        return {"block_idx": batch["block_idx"], "continuations": new}

    def label_settings(self) -> dict[str, Any]:
        """The generation settings a ``generate`` store records."""
        return {"generation": {"prompt_tokens": self.prompt_tokens, **vars(self.settings)}}
