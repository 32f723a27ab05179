"""HardDistill on tiny random models: top-1 picks and stored teacher generations."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer

from lightning_distill import HardDistill


def test_top1_trains_on_teacher_picks(tiny_teacher_dir, tmp_path):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1")
    model.configure_model()
    ids = torch.randint(0, 300, (2, 16))
    picks = model.teacher_logits(ids).argmax(-1)
    parts = model.student_loss(ids, ids, picks, ce_weight=0.0)
    # the same as CE against the teacher's next-token picks, computed by transformers
    targets = torch.cat([ids[:, :1], picks[:, :-1]], 1)
    torch.testing.assert_close(parts["loss"], model.student(input_ids=ids, labels=targets).loss)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_generate_masks_prompt_and_reuses_stored_generations(tiny_teacher_dir, tmp_path, monkeypatch):
    store = tmp_path / "gens"
    kwargs = {"teacher": tiny_teacher_dir, "student": TINY_STUDENT, "mode": "generate", "prompt_tokens": 8,
              "max_new_tokens": 6, "generations_dir": str(store)}
    model = HardDistill(**kwargs)
    model.configure_model()
    ids = torch.randint(3, 300, (3, 16))
    sequences, targets = model.teacher_sequences(ids)
    assert sequences.shape == targets.shape == (3, 14)
    assert torch.equal(sequences[:, :8], ids[:, :8])
    assert (targets[:, :8] == -100).all()
    assert len(model.cache) == 3

    again = HardDistill(**kwargs)  # a new run: continuations come from disk, the teacher is not asked
    again.configure_model()
    monkeypatch.setattr(again, "generate_ids", lambda prompts: pytest.fail("regenerated a stored continuation"))
    sequences2, targets2 = again.teacher_sequences(ids)
    assert torch.equal(sequences, sequences2) and torch.equal(targets, targets2)


def test_generate_masks_after_eos(tiny_teacher_dir, tmp_path, monkeypatch):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate", prompt_tokens=4,
                        max_new_tokens=5, generations_dir=str(tmp_path))
    model.configure_model()
    eos = model.tokenizer.eos_token_id
    monkeypatch.setattr(model, "generate_ids", lambda p: torch.tensor([[7, eos, 9, 9, 9]] * p.shape[0]))
    _, targets = model.teacher_sequences(torch.randint(3, 300, (1, 10)))
    assert targets[0, 4:].tolist() == [7, eos, -100, -100, -100]


def test_generate_fit(tiny_teacher_dir, tmp_path):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate", prompt_tokens=8,
                        max_new_tokens=8, generations_dir=str(tmp_path / "g"))
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert torch.isfinite(trainer.callback_metrics["train/kd"])


@pytest.mark.parametrize(("kwargs", "name"), [({"mode": "soft"}, "mode"), ({"prompt_tokens": 0}, "prompt_tokens"),
                                              ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_arguments(tiny_teacher_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        HardDistill(teacher=tiny_teacher_dir, **kwargs)
