"""Token-exact gradient accumulation: the accumulated gradient is the mean over every valid target token of the
whole accumulation window and of all ranks, not a mean of per-micro-batch means (DESIGN.md §4)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


class TokenWindow:
    """Counts valid tokens over an accumulation window and rescales the gradients before the optimizer step.

    Each micro-batch backpropagates ``sum_i / scale`` (:meth:`backward_value`, ``scale`` being the first
    micro-batch's token count, a constant); Lightning divides by N = ``accumulate_grad_batches`` and DDP averages
    over W ranks, so the gradient is ``sum / (N * W * scale)``. :meth:`rescale` multiplies it by
    ``N * W * scale / total_tokens``, which gives exactly ``sum / total_tokens``.
    """

    def __init__(self) -> None:
        self.tokens = 0.0  # valid target tokens since the last optimizer step
        self.scale: float | None = None

    def backward_value(self, loss: Tensor, tokens: Tensor) -> Tensor:
        """The value to backpropagate for a micro-batch whose mean loss over ``tokens`` valid tokens is ``loss``."""
        if self.scale is None:
            self.scale = max(float(tokens), 1.0)
        self.tokens += float(tokens)
        return loss * tokens / self.scale

    def rescale(self, optimizer: torch.optim.Optimizer, trainer: L.Trainer | None, device: torch.device) -> None:
        """Turn the accumulated gradients into the mean over the window's valid tokens (all ranks)."""
        if self.scale is None:
            return
        total = torch.tensor(self.tokens, device=device, dtype=torch.float64)
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        factor = accumulate * world * self.scale / max(float(total), 1.0)
        self.tokens = 0.0
        if factor != 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)
