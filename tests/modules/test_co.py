"""CoDistill on tiny random models: both models train, schedules, mutual learning, stale teacher, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer

from lightning_distill import CoDistill, Schedule


def test_teacher_and_student_both_train_and_are_checkpointed(tiny_teacher_dir, tmp_path):
    model = CoDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, schedule=Schedule(kind="constant"),
                      kd_weight=0.5, mutual_weight=0.1, teacher_learning_rate=1e-4)
    model.configure_model()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert any(not torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())
    lrs = sorted({g["lr"] for g in trainer.optimizers[0].param_groups})
    assert len(lrs) == 2  # separate learning rates for teacher and student
    path = tmp_path / "co.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    loaded = CoDistill.load_from_checkpoint(path)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, loaded.teacher.state_dict()[key]), key
    assert float(loaded.teacher_ce_ema) == pytest.approx(float(model.teacher_ce_ema))
    # resume: fit continues from the saved step with both optimizers' states
    resumed = CoDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, schedule=Schedule(kind="constant"))
    trainer2 = tiny_trainer(tmp_path, max_steps=3)
    trainer2.fit(resumed, tiny_data(), ckpt_path=str(path))
    assert trainer2.global_step == 3


def test_schedules(tiny_teacher_dir):
    constant = CoDistill(teacher=tiny_teacher_dir, schedule=Schedule(kind="constant"), kd_weight=0.7)
    assert constant.kd_weight_at(0) == constant.kd_weight_at(500) == 0.7
    linear = CoDistill(teacher=tiny_teacher_dir, schedule=Schedule(kind="linear", ramp_steps=100), kd_weight=0.8)
    assert [linear.kd_weight_at(s) for s in (0, 50, 100, 200)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    gated = CoDistill(teacher=tiny_teacher_dir, schedule=Schedule(kind="gated", gate_threshold=3.0, gate_ema=0.5),
                      kd_weight=0.6)
    assert gated.kd_weight_at(0) == 0.0  # no teacher loss seen yet
    gated._update_ema(torch.tensor(5.0))
    assert gated.kd_weight_at(1) == 0.0
    gated._update_ema(torch.tensor(1.0))  # EMA 3.0: not below the threshold yet
    assert gated.kd_weight_at(2) == 0.0
    gated._update_ema(torch.tensor(1.0))  # EMA 2.0
    assert gated.kd_weight_at(3) == 0.6


def test_fresh_teacher_and_stale_copy(tiny_teacher_dir, tmp_path):
    fresh = {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2}}
    model = CoDistill(teacher=fresh, student=fresh, tokenizer=tiny_teacher_dir,
                      stale_every=2, schedule=Schedule(kind="constant"))
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(model, tiny_data())
    stale = model.signal.stale
    assert stale is not None and model.signal._stale_step == 2
    assert all(not p.requires_grad for p in stale.parameters())
    assert not any(m is stale for m in model.modules())  # never optimized, synced or checkpointed


# The schedule is checked where its group is made (``Schedule(kind="cosine")``), so the arguments are built inside
# ``pytest.raises``.
@pytest.mark.parametrize(("kwargs", "name"), [(lambda: {"schedule": Schedule(kind="cosine")}, "schedule.kind"),
                                              (lambda: {"kd_weight": 2}, "kd_weight"),
                                              (lambda: {"stale_every": -1}, "stale_every"),
                                              (lambda: {"teacher": None}, "teacher"),
                                              (lambda: {"schedule": Schedule(gate_ema=1.0)}, "schedule.gate_ema")])
def test_bad_arguments(tiny_teacher_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        CoDistill(**{"teacher": tiny_teacher_dir, **kwargs()})
