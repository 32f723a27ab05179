"""Training throughput, logged every step: ``train/tokens_per_sec`` (all ranks), and on an on-policy step the
student's sampling speed ``train/generated_tokens_per_sec`` and ``train/generation_share`` of the step's time.

:class:`Throughput` is one of the callbacks every method adds to its Trainer
(:meth:`~lightning_distill.modules.base.DistillModule.configure_callbacks`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule


class Throughput(L.Callback):
    """Times each training batch (data loading excluded) and logs tokens per second."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: DistillModule, batch: Any, batch_idx: int) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DistillModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens, size = batch["input_ids"].numel() * trainer.world_size, batch["input_ids"].shape[0]
        pl_module.log("train/tokens_per_sec", tokens / elapsed, batch_size=size)
        signal = pl_module.signal
        generated = getattr(signal, "seconds", 0.0)
        if generated:  # an on-policy step: the student's sampling speed and its share of the step
            pl_module.log("train/generated_tokens_per_sec", signal.generated / max(generated, 1e-9), batch_size=size)
            pl_module.log("train/generation_share", generated / elapsed, batch_size=size)
            signal.seconds = 0.0
