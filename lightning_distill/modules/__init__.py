"""The three distillation methods, sharing :class:`DistillModule`."""

from lightning_distill.modules.base import DistillModule
from lightning_distill.modules.co import CoDistill
from lightning_distill.modules.hard import HardDistill
from lightning_distill.modules.soft import SoftDistill

__all__ = ["CoDistill", "DistillModule", "HardDistill", "SoftDistill"]
