"""SoftDistill on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer

from lightning_distill import SoftDistill, losses


@pytest.mark.parametrize("loss", sorted(losses.DIVERGENCES))
def test_fit_each_divergence(tiny_teacher_dir, tmp_path, loss):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, loss=loss, ce_weight=0.0, temperature=2.0)
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, tiny_data())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/kd"])
    for name in ("val/ppl", "val/ce", "val/kl", "val/agreement", "val/teacher_ppl"):
        assert torch.isfinite(metrics[name]), name
    assert 0 <= metrics["val/agreement"] <= 1


def test_training_reduces_kl_to_teacher(tiny_teacher_dir, tmp_path):
    """A few dozen steps of pure distillation move the student towards the teacher."""
    torch.manual_seed(0)
    student = {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "num_key_value_heads": 2}}
    model = SoftDistill(teacher=tiny_teacher_dir, student=student, ce_weight=0.0, learning_rate=1e-2, warmup_steps=0)
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, max_steps=40)
    trainer.validate(model, data, verbose=False)
    before = float(trainer.callback_metrics["val/kl"])
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    assert float(trainer.callback_metrics["val/kl"]) < 0.5 * before


def test_chunked_loss_matches_unchunked(tiny_teacher_dir):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 24))
    results = []
    for chunk_size in (0, 7):
        model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, chunk_size=chunk_size, ce_weight=0.3)
        model.configure_model()
        parts = model.student_loss(ids, ids, model.teacher_logits(ids), ce_weight=0.3)
        parts["loss"].backward()
        results.append((parts, model.student.model.embed_tokens.weight.grad.clone()))
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(results[0][0][key], results[1][0][key])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_ce_only_ignores_the_teacher(tiny_teacher_dir):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    model.configure_model()
    ids = torch.randint(0, 300, (2, 16))
    parts = model.student_loss(ids, ids, None, ce_weight=1.0)
    torch.testing.assert_close(parts["loss"], parts["ce"])
    hf_loss = model.student(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(parts["ce"], hf_loss)


@pytest.mark.parametrize(("kwargs", "name"), [({"loss": "kl"}, "loss"), ({"beta": 2}, "beta"),
                                              ({"temperature": 0}, "temperature"), ({"ce_weight": -1}, "ce_weight"),
                                              ({"alpha": 1.5}, "alpha")])
def test_bad_arguments(tiny_teacher_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftDistill(teacher=tiny_teacher_dir, **kwargs)
