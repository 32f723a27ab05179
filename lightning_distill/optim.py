"""The optimizer every method uses: AdamW with decay on matrices only, linear warmup, then cosine decay."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(step: int, total: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` of ``total``: linear warmup over ``warmup_steps``, then
    cosine decay to ``min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(models: list[tuple[torch.nn.Module, float]], weight_decay: float, warmup_steps: int,
                        min_lr_ratio: float, total_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: one AdamW with two parameter groups per (model, peak lr) pair
    (decay on matrices, none on biases and norms) and the schedule of :func:`lr_factor`, stepped every step.

    One AdamW with per-model groups is equivalent to one AdamW per model (its state is per parameter) and keeps
    Lightning's automatic optimization, gradient accumulation and every strategy.
    """
    groups = []
    for model, lr in models:
        params = [p for p in model.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
