"""lightning_distill: knowledge distillation of LLMs (soft, hard and co-distillation) as Lightning modules."""

from lightning_distill.backbone import build_student, check_tokenizers, load_teacher, load_tokenizer
from lightning_distill.data import DistillDataModule
from lightning_distill.modules import CoDistill, DistillModule, HardDistill, SoftDistill
from lightning_distill.options import (
    Features,
    Generation,
    OnPolicy,
    Optimization,
    Performance,
    Schedule,
    Served,
    Teachers,
    Validation,
)

__version__ = "0.1.0"

__all__ = [
    "CoDistill",
    "DistillDataModule",
    "DistillModule",
    "Features",
    "Generation",
    "HardDistill",
    "OnPolicy",
    "Optimization",
    "Performance",
    "Schedule",
    "Served",
    "SoftDistill",
    "Teachers",
    "Validation",
    "build_student",
    "check_tokenizers",
    "load_teacher",
    "load_tokenizer",
]
