"""A new method is a small addition: a complete one, as a newcomer would write it, trains, checkpoints and exports.

``AnnealedDistill`` (a KD variant with the temperature annealed from ``start_temperature`` down to 1 over training)
asks the signal seam for the teacher's distribution, hands it to ``student_loss`` with its divergence, and returns
what ``backward_loss`` gives: the base class does the rest (teacher hygiene, token-exact accumulation, validation
metrics, optimizer, checkpoints, export).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer
from torch import Tensor
from transformers import AutoModelForCausalLM

from lightning_distill import checks
from lightning_distill.backbone import DEFAULT_TEACHER
from lightning_distill.losses import Divergence, get_divergence
from lightning_distill.modules import DistillModule


class AnnealedDistill(DistillModule):
    """KD with its temperature annealed linearly from ``start_temperature`` to 1 over ``anneal_steps``.

    Args:
        teacher: teacher model name (see :class:`DistillModule`).
        student: student spec (see :class:`DistillModule`).
        loss: any divergence name or object.
        start_temperature: the temperature of the first step, >= 1.
        anneal_steps: steps to reach temperature 1, >= 1.
        **kwargs: :class:`DistillModule` arguments (``optimization``, ``performance``, ...).
    """

    def __init__(self, teacher: str | None = DEFAULT_TEACHER, student: str | dict[str, Any] | None = None,
                 loss: str | Divergence = "forward_kl", start_temperature: float = 4.0, anneal_steps: int = 100,
                 **kwargs: Any) -> None:
        checks.number("start_temperature", start_temperature, ">= 1", lambda v: v >= 1, "4.0")
        checks.integer("anneal_steps", anneal_steps, ">= 1", lambda v: v >= 1, "100")
        super().__init__(teacher=teacher, student=student, **kwargs)  # saves every argument as self.hparams
        self.divergence = get_divergence(loss)

    def temperature(self) -> float:
        done = min(self.global_step / self.hparams.anneal_steps, 1.0)
        return self.hparams.start_temperature + (1.0 - self.hparams.start_temperature) * done

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher = self.signal.distribution(self.run, batch)  # live, stored or trained: the method does not care
        parts = self.student_loss(batch["input_ids"], batch["labels"], teacher, divergence=self.divergence,
                                  ce_weight=0.0, temperature=self.temperature())
        self.log_train(parts, batch["input_ids"].shape[0])
        return self.backward_loss(parts["loss"], parts["tokens"])


def test_a_new_method_is_one_small_class(tiny_teacher_dir, tmp_path):
    source = inspect.getsource(AnnealedDistill)
    assert len(source.splitlines()) < 120
    tree = ast.parse(Path(__file__).read_text())
    used = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("lightning_distill") for alias in node.names]
    assert used and not any(name.startswith("_") for module, name in used)  # only public names of the package
    model = AnnealedDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, loss="reverse_kl", start_temperature=3.0,
                            anneal_steps=2)
    trainer = tiny_trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(model, tiny_data())
    metrics = trainer.callback_metrics
    assert model.temperature() == 1.0 and torch.isfinite(metrics["train/kd"]) and torch.isfinite(metrics["val/kl"])
    trainer.save_checkpoint(tmp_path / "annealed.ckpt")
    checkpoint = torch.load(tmp_path / "annealed.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])  # the base class keeps it out
    restored = AnnealedDistill.load_from_checkpoint(str(tmp_path / "annealed.ckpt"))
    exported = restored.export(str(tmp_path / "student"))
    assert AutoModelForCausalLM.from_pretrained(exported).config.num_hidden_layers == 2
