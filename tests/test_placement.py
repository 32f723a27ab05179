"""A CE-only run keeps its teacher off the accelerator while it trains (:mod:`lightning_distill.placement`)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY_STUDENT, requires_gpu, tiny_data, tiny_trainer

from lightning_distill import HardDistill, SoftDistill, placement

IDLE = torch.device("meta")  # on a CPU-only machine the idle place is told apart from the device by a spy


class Probe(L.Callback):
    """Where the spied teacher was last sent, seen at each training and validation batch."""

    def __init__(self, moves: list[torch.device]) -> None:
        self.moves, self.seen = moves, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("train", self.moves[-1] if self.moves else None))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("validation", self.moves[-1] if self.moves else None))


def fit_with_spy(model: SoftDistill, tmp_path, monkeypatch) -> tuple[list[torch.device], Probe]:
    monkeypatch.setattr(placement, "IDLE_DEVICE", IDLE)
    model.configure_model()  # the Trainer's call is then a no-op: the spy stays on this teacher
    moves: list[torch.device] = []
    monkeypatch.setattr(model.teacher, "to", lambda device: moves.append(torch.device(device)) or model.teacher)
    probe = Probe(moves)
    tiny_trainer(tmp_path, max_steps=2, val_check_interval=1, limit_val_batches=1, callbacks=[probe]).fit(
        model, tiny_data())
    return moves, probe


def test_a_ce_only_run_trains_with_its_teacher_off_the_device(tiny_teacher_dir, tmp_path, monkeypatch):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    moves, probe = fit_with_spy(model, tmp_path, monkeypatch)
    cpu = torch.device("cpu")
    assert probe.seen == [("train", IDLE), ("validation", cpu), ("train", IDLE), ("validation", cpu)]
    assert moves[-1] == cpu  # back where it was when the fit ends
    assert model.teacher is not None  # still there for validation and generation


@pytest.mark.parametrize("kwargs", [{"ce_weight": 0.5}, {"ce_weight": 1.0, "feature_weight": 1.0}])
def test_a_run_that_asks_its_teacher_keeps_it_in_place(tiny_teacher_dir, tmp_path, monkeypatch, kwargs):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, **kwargs)
    moves, probe = fit_with_spy(model, tmp_path, monkeypatch)
    assert moves == [] and len(probe.seen) == 4


def test_the_decision(tiny_teacher_dir):
    ce_only = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    assert not placement.teacher_idle_in_training(ce_only)  # no models yet
    ce_only.configure_model()
    assert placement.teacher_idle_in_training(ce_only)
    on_policy = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0, lmbda=0.5)
    on_policy.configure_model()
    assert not placement.teacher_idle_in_training(on_policy)
    top1 = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1")
    top1.configure_model()
    assert not placement.teacher_idle_in_training(top1)  # its steps ask the teacher (a method that does not say)


@requires_gpu
def test_on_cuda_the_teacher_is_on_the_cpu_during_training_steps(tiny_teacher_dir, tmp_path):
    class Where(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(("train", next(pl_module.teacher.parameters()).device.type))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.seen.append(("validation", next(pl_module.teacher.parameters()).device.type))

    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    where = Where()
    L.Trainer(accelerator="cuda", devices=1, max_steps=2, val_check_interval=1, limit_val_batches=1, logger=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path), callbacks=[where]).fit(model, tiny_data())
    assert where.seen == [("train", "cpu"), ("validation", "cuda"), ("train", "cpu"), ("validation", "cuda")]
    assert next(model.teacher.parameters()).device.type == "cuda"
