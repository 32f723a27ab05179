"""SoftDistill on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STUDENT, small_data, tiny_data, tiny_trainer, write_labels

from lightning_distill import Optimization, Performance, SoftDistill, losses
from lightning_distill.losses import GeneralizedJSD, SkewKL, SparseTargets, TeacherHidden
from lightning_distill.modules import building
from lightning_distill.signals import LiveTeacher


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
    model = SoftDistill(teacher=tiny_teacher_dir, student=student, ce_weight=0.0,
                        optimization=Optimization(learning_rate=1e-2, warmup_steps=0))
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
        model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=0.3,
                            performance=Performance(chunk_size=chunk_size))
        model.configure_model()
        parts = model.student_loss(ids, ids, model.signal.distribution(model.run, {"input_ids": ids}), ce_weight=0.3)
        parts["loss"].backward()
        results.append((parts, model.student.model.embed_tokens.weight.grad.clone()))
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(results[0][0][key], results[1][0][key])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_default_chunking_never_makes_the_live_teachers_logits(tiny_teacher_dir, monkeypatch):
    """performance.chunk_size=None: a live teacher's hidden states go through the fused chunks (its (B, T, V) logits
    are never made), equal to the unchunked loss; CE-only, stored and given logits take one pass on CPU, chunks on
    CUDA."""
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 24))
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=0.3)
    model.configure_model()
    teacher = model.signal.distribution(model.run, {"input_ids": ids})
    assert isinstance(teacher, TeacherHidden)
    explicit = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=0.3,
                           performance=Performance(chunk_size=0))
    explicit.student, explicit.teacher = model.student, model.teacher
    expected = explicit.student_loss(ids, ids, teacher, ce_weight=0.3)
    monkeypatch.setattr(TeacherHidden, "logits", lambda self: pytest.fail("the teacher's full logits were made"))
    parts = model.student_loss(ids, ids, teacher, ce_weight=0.3)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(parts[key], expected[key])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.loss_chunk_size(teacher, cpu) == losses.DEFAULT_CHUNK_SIZE
    assert model.loss_chunk_size(None, cpu) == model.loss_chunk_size(torch.zeros(1), cpu) == 0
    assert model.loss_chunk_size(None, cuda) == losses.DEFAULT_CHUNK_SIZE
    assert explicit.loss_chunk_size(teacher, cuda) == 0


def test_ce_only_ignores_the_teacher(tiny_teacher_dir):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    model.configure_model()
    ids = torch.randint(0, 300, (2, 16))
    parts = model.student_loss(ids, ids, None, ce_weight=1.0)
    torch.testing.assert_close(parts["loss"], parts["ce"])
    hf_loss = model.student(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(parts["ce"], hf_loss)


# A divergence's parameter is checked where the divergence is made (``GeneralizedJSD(beta=2)``), so those cases
# build their arguments inside ``pytest.raises``.
@pytest.mark.parametrize(("kwargs", "name"), [(lambda: {"loss": "kl"}, "loss"),
                                              (lambda: {"loss": GeneralizedJSD(beta=2)}, "beta"),
                                              (lambda: {"temperature": 0}, "temperature"),
                                              (lambda: {"ce_weight": -1}, "ce_weight"),
                                              (lambda: {"loss": SkewKL(alpha=1.5)}, "alpha")])
def test_bad_arguments(tiny_teacher_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftDistill(teacher=tiny_teacher_dir, **kwargs())


# ----------------------------------------------------------------------------------------------- stored labels
@pytest.fixture(scope="module")
def stores(tiny_teacher_dir, tmp_path_factory):
    """Stores of the tiny teacher's signal: top-k (k = V, float32), top-k (k = 8), sampled (6 draws), top-1."""
    root = tmp_path_factory.mktemp("soft_labels")
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    vocab = len(model.tokenizer)
    return {"full": write_labels(model, root / "full", k=vocab, value_dtype="float32"),
            "topk": write_labels(model, root / "topk", k=8),
            "sampled": write_labels(model, root / "sampled", kind="sampled", num_samples=6),
            "top1": write_labels(model, root / "top1", kind="top1")}


def test_trains_from_a_store_without_loading_the_teacher(tiny_teacher_dir, stores, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(building, "load_model", lambda *args, **kwargs: loaded.append(args))  # a teacher load fails
    model = SoftDistill(teacher=None, student=tiny_teacher_dir, labels=stores["topk"], ce_weight=0.0)
    assert not model.needs_teacher()
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, small_data())
    assert loaded == [] and model.teacher is None
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/kd"]) and metrics["train/kd"] > 0
    for name in ("val/ce", "val/kl", "val/agreement"):  # from the stored validation labels
        assert torch.isfinite(metrics[name]), name
    assert "val/teacher_ppl" not in metrics


def test_from_teacher_student_loads_the_teacher_only_to_build_it(tiny_teacher_dir, stores, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, labels=stores["sampled"])
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2, enable_checkpointing=True)
    trainer.fit(model, small_data())
    assert model.teacher is None and model.student.config.num_hidden_layers == 2
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    assert torch.isfinite(trainer.callback_metrics["val/kl"])  # the sampled estimate, entropy subtracted


def stored_batch(model: SoftDistill) -> dict:
    """A train batch of small_data(), with the model's label store opened (no trainer: no data check)."""
    data = small_data()
    data.set_tokenizer(model.tokenizer)
    data.setup()
    with pytest.warns(UserWarning, match="no DistillDataModule to check the store against"):
        model.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("chunk_size", [0, 7])
@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd", "reverse_kl"])
def test_stored_top_k_with_k_equal_v_gives_the_online_loss(tiny_teacher_dir, stores, loss, chunk_size):
    torch.manual_seed(0)
    performance = Performance(chunk_size=chunk_size)
    online = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, loss=loss, ce_weight=0.3,
                         performance=performance)
    online.configure_model()
    stored = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, loss=loss, ce_weight=0.3,
                         performance=performance, labels=stores["full"])
    stored.configure_model()
    stored.student.load_state_dict(online.student.state_dict())
    batch = stored_batch(stored)
    ids = batch["input_ids"]
    targets = stored.signal.distribution(stored.run, batch)
    assert isinstance(targets, SparseTargets) and targets.tail == "bucket"
    got = stored.student_loss(ids, ids, targets, divergence=loss, ce_weight=0.3)
    want = online.student_loss(ids, ids, LiveTeacher.logits(online.run, {"input_ids": ids}), divergence=loss,
                               ce_weight=0.3)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    # and the real training step reads the same targets by the batch's block_idx
    with pytest.warns(UserWarning, match="self.log"):
        torch.testing.assert_close(stored.training_step(batch, 0), online.training_step(batch, 0), atol=1e-5,
                                   rtol=1e-5)


def test_a_store_that_cannot_feed_the_model_is_refused(tiny_teacher_dir, stores, tmp_path):
    cases = [({"labels": stores["top1"]}, "use HardDistill"),
             ({"labels": stores["topk"], "temperature": 2.0}, "set temperature=1.0"),
             ({"labels": stores["sampled"], "loss": "reverse_kl"}, "loss='reverse_kl' has no unbiased estimate")]
    for kwargs, message in cases:
        model = SoftDistill(teacher=None, student=tiny_teacher_dir, **kwargs)
        with pytest.raises(ValueError, match=message):
            tiny_trainer(tmp_path, max_steps=1).fit(model, small_data())
    with pytest.raises(ValueError, match="tail="):
        SoftDistill(teacher=tiny_teacher_dir, loss="tvd", tail="renorm")
    with pytest.raises(ValueError, match="tail"):
        SoftDistill(teacher=tiny_teacher_dir, tail="drop")
    with pytest.raises(ValueError, match="labels must be"):
        SoftDistill(teacher=tiny_teacher_dir, labels="")
