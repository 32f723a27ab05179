"""HardDistill on tiny random models: top-1 picks and stored teacher generations."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STUDENT, small_data, tiny_data, tiny_trainer, write_labels

from lightning_distill import Generation, HardDistill, generation
from lightning_distill.losses import SparseTargets
from lightning_distill.modules import building


def teacher_sequences(model: HardDistill, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + the teacher's continuation and the targets of a batch, as ``mode="generate"`` trains on them."""
    return model.sequences.training_batch(model.signal, model.run, batch)


def test_top1_trains_on_teacher_picks(tiny_teacher_dir, tmp_path):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1")
    model.configure_model()
    ids = torch.randint(0, 300, (2, 16))
    picks = model.signal.picks(model.run, {"input_ids": ids})
    parts = model.student_loss(ids, ids, SparseTargets.from_picks(picks), ce_weight=0.0)
    # the same as CE against the teacher's next-token picks, computed by transformers
    targets = torch.cat([ids[:, :1], picks[:, :-1]], 1)
    torch.testing.assert_close(parts["loss"], model.student(input_ids=ids, labels=targets).loss)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_generate_masks_prompt_and_reuses_stored_generations(tiny_teacher_dir, tmp_path, monkeypatch):
    store = tmp_path / "gens"
    kwargs = {"teacher": tiny_teacher_dir, "student": TINY_STUDENT, "mode": "generate",
              "generation": Generation(prompt_tokens=8, max_new_tokens=6, cache_dir=str(store))}
    model = HardDistill(**kwargs)
    model.configure_model()
    ids = torch.randint(3, 300, (3, 16))
    sequences, targets = teacher_sequences(model, {"input_ids": ids})
    assert sequences.shape == targets.shape == (3, 14)
    assert torch.equal(sequences[:, :8], ids[:, :8])
    assert (targets[:, :8] == -100).all()
    assert len(model.signal.cache(model.run, 8, model.sequences.settings)) == 3

    again = HardDistill(**kwargs)  # a new run: continuations come from disk, the teacher is not asked
    again.configure_model()
    monkeypatch.setattr(generation, "generate", lambda *a: pytest.fail("regenerated a stored continuation"))
    sequences2, targets2 = teacher_sequences(again, {"input_ids": ids})
    assert torch.equal(sequences, sequences2) and torch.equal(targets, targets2)


def test_generate_masks_after_eos(tiny_teacher_dir, tmp_path, monkeypatch):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate",
                        generation=Generation(prompt_tokens=4, max_new_tokens=5, cache_dir=str(tmp_path)))
    model.configure_model()
    eos = model.tokenizer.eos_token_id
    monkeypatch.setattr(generation, "generate", lambda model, p, *a: torch.tensor([[7, eos, 9, 9, 9]] * p.shape[0]))
    _, targets = teacher_sequences(model, {"input_ids": torch.randint(3, 300, (1, 10))})
    assert targets[0, 4:].tolist() == [7, eos, -100, -100, -100]


def test_generate_fit(tiny_teacher_dir, tmp_path):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate",
                        generation=Generation(prompt_tokens=8, max_new_tokens=8, cache_dir=str(tmp_path / "g")))
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert torch.isfinite(trainer.callback_metrics["train/kd"])


# The generation settings are checked where their group is made (``Generation(prompt_tokens=0)``), so the
# arguments are built inside ``pytest.raises``.
@pytest.mark.parametrize(("kwargs", "name"), [(lambda: {"mode": "soft"}, "mode"),
                                              (lambda: {"generation": Generation(prompt_tokens=0)},
                                               "generation.prompt_tokens"),
                                              (lambda: {"generation": Generation(top_p=0)}, "generation.top_p"),
                                              (lambda: {"generation": Generation(max_new_tokens=0)},
                                               "generation.max_new_tokens")])
def test_bad_arguments(tiny_teacher_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        HardDistill(teacher=tiny_teacher_dir, **kwargs())


# ----------------------------------------------------------------------------------------------- stored labels
def batch_with_labels(model, store=None):
    """A train batch of small_data(); a model reading a store opens it (no trainer: no data check)."""
    data = small_data()
    data.set_tokenizer(model.tokenizer)
    data.setup()
    if not model.needs_teacher():
        with pytest.warns(UserWarning, match="no DistillDataModule"):
            model.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("kind", ["top1", "topk", "sampled"])
def test_top1_from_any_per_position_store_equals_the_live_teacher(tiny_teacher_dir, tmp_path, kind):
    store = write_labels(HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tmp_path / kind, kind=kind, k=4,
                         num_samples=3)
    live = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1", ce_weight=0.25)
    live.configure_model()
    stored = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1", ce_weight=0.25, labels=store)
    stored.configure_model()
    assert stored.teacher is None
    stored.student.load_state_dict(live.student.state_dict())
    batch = batch_with_labels(live)
    batch_with_labels(stored)
    with pytest.warns(UserWarning, match="self.log"):  # the real training step, called without a trainer
        torch.testing.assert_close(stored.training_step(batch, 0), live.training_step(batch, 0))


def test_generate_store_trains_without_the_teacher(tiny_teacher_dir, tmp_path, monkeypatch):
    kwargs = {"student": TINY_STUDENT, "mode": "generate", "generation": Generation(prompt_tokens=8, max_new_tokens=6)}
    writer = HardDistill(teacher=tiny_teacher_dir, **{**kwargs, "generation": Generation(
        prompt_tokens=8, max_new_tokens=6, cache_dir=str(tmp_path / "cache"))})
    writer.configure_model()
    store = write_labels(writer, tmp_path / "generate", kind="generate")
    batch = batch_with_labels(writer)
    reader = HardDistill(teacher=None, labels=store, **{**kwargs, "student": tiny_teacher_dir})
    batch_with_labels(reader)
    # the stored continuation of a block is the live mode's, and both modes train on the same sequences
    for live, stored in zip(teacher_sequences(writer, batch), teacher_sequences(reader, batch), strict=True):
        assert torch.equal(live, stored)

    monkeypatch.setattr(building, "load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    model = HardDistill(teacher=None, labels=store, **{**kwargs, "student": tiny_teacher_dir})
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, small_data())
    assert model.teacher is None and torch.isfinite(trainer.callback_metrics["train/kd"])


def test_a_store_that_cannot_feed_the_mode_is_refused(tiny_teacher_dir, tmp_path):
    model = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate",
                        generation=Generation(prompt_tokens=8, max_new_tokens=4))
    generate = write_labels(model, tmp_path / "generate", kind="generate", splits=["validation"])
    top1 = write_labels(model.__class__(teacher=tiny_teacher_dir, student=TINY_STUDENT), tmp_path / "top1",
                        kind="top1", splits=["validation"])
    cases = [({"mode": "top1", "labels": generate}, "set mode='generate'"),
             ({"mode": "generate", "labels": top1}, "set mode='top1'"),
             ({"mode": "generate", "labels": generate, "generation": Generation(prompt_tokens=4, max_new_tokens=4)},
              "generation.prompt_tokens=4 differs from the store's 8"),
             ({"mode": "generate", "labels": generate, "generation": Generation(prompt_tokens=8)},
              "generation.max_new_tokens=64 differs")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            HardDistill(teacher=None, student=tiny_teacher_dir, **kwargs).setup("fit")
