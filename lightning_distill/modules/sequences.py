"""Sequence-level hard distillation, HardDistill's ``mode="generate"`` (Kim & Rush 2016, "Sequence-Level Knowledge
Distillation"; the DeepSeek-R1 distillation recipe): the teacher continues a prompt taken from each block of the
corpus, and the student is trained on the teacher's tokens only (prompt positions and everything after the
teacher's EOS masked, :func:`lightning_distill.generation.training_sequences`).

What this mode adds to a method, kept apart from the token-level ``top1`` path: the checks that a prompt fits a
block and prompt + continuation the models' positions, the store it trains from, the training sequences, the
continuations it writes when labelling, and the settings a store records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_distill import generation

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule


@dataclass
class TeacherSequences:
    """Prompt length and generation settings of the teacher's continuations, and what a method does with them."""

    prompt_tokens: int
    settings: generation.GenerationSettings

    def check_store(self, manifest: dict[str, Any]) -> None:
        """A ``generate`` store must have been written with this prompt length and continuation length."""
        stored = manifest.get("generation") or {}
        ours = {"prompt_tokens": self.prompt_tokens, "max_new_tokens": self.settings.max_new_tokens}
        for name, value in ours.items():
            if stored.get(name) != value:
                raise ValueError(f"{name}={value} differs from the store's {stored.get(name)}: set "
                                 f"{name}={stored.get(name)}")

    def check_fit(self, module: DistillModule) -> None:
        """Before any work: the prompt is each block's first ``prompt_tokens``, so it must fit in a block, and
        prompt + continuation in the models' positions."""
        data = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
        block = getattr(getattr(data, "hparams", None), "block_size", None)
        if isinstance(block, int) and self.prompt_tokens > block:
            raise ValueError(f"prompt_tokens={self.prompt_tokens} is longer than the data's block_size={block} "
                             f"(a prompt is a block's first prompt_tokens): use prompt_tokens <= {block}")
        total, limit = self.prompt_tokens + self.settings.max_new_tokens, module.max_positions
        if limit is not None and total > limit:
            raise ValueError(f"prompt_tokens + max_new_tokens = {total} is more than the models' {limit} "
                             f"positions: use max_new_tokens <= {limit - self.prompt_tokens}")

    def training_batch(self, module: DistillModule, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Prompt + the teacher's continuation (B, P + N) from the module's signal, and the targets (B, P + N)."""
        continuations = module.signal.continuations(module, batch, self.prompt_tokens, self.settings)  # (B, N)
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
        return generation.training_sequences(prompts, continuations, eos, pad)

    def predict(self, module: DistillModule, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a label writer stores: ``{"block_idx": (B,), "continuations": (B, N)}``, freshly generated."""
        prompts = batch["input_ids"][:, : self.prompt_tokens]  # (B, P)
        new = generation.generate(module.teacher, prompts, self.settings, module.tokenizer.eos_token_id)
        return {"block_idx": batch["block_idx"], "continuations": new}

    def label_settings(self) -> dict[str, Any]:
        """The generation settings a ``generate`` store records."""
        return {"generation": {"prompt_tokens": self.prompt_tokens, **vars(self.settings)}}
