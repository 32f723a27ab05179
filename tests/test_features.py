"""features.py: the feature (hidden-state) loss, pure torch, and SoftDistill's feature term on tiny models: off it
changes nothing, on it is 0 for a student equal to its teacher, its gradients reach only the student and the
projection, the projection trains, is checkpointed and stays out of the exported student."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer

from lightning_distill import Features, Performance, SoftDistill
from lightning_distill.backbone import final_hidden
from lightning_distill.features import (
    FeatureMatcher,
    feature_loss,
    token_feature_loss,
    valid_positions,
)
from lightning_distill.pruning import decoder_layers

NARROW = {"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1}}  # half the tiny teacher's width: needs the projection


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_identical_states_give_zero_and_scale_does_not_matter(kind):
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    torch.testing.assert_close(token_feature_loss(h, h.clone(), kind), torch.zeros(2, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(token_feature_loss(3.0 * h, h, kind), torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert (token_feature_loss(h, torch.randn(2, 5, 8), kind) > 0).all()


def test_cosine_of_orthogonal_and_opposite_states():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(token_feature_loss(a, b, "cosine"), torch.tensor([1.0]))
    torch.testing.assert_close(token_feature_loss(a, -a, "cosine"), torch.tensor([2.0]))


def test_mask_and_normalization():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    garbage = student.clone()
    garbage[~mask] = 1e6  # masked positions do not count
    want = token_feature_loss(student, teacher)[mask].mean()
    torch.testing.assert_close(feature_loss(garbage, teacher, mask), want)
    assert feature_loss(student, teacher, torch.zeros_like(mask)) == 0  # nothing valid: 0, not nan


def test_gradients_reach_the_student_not_the_teacher():
    student = torch.randn(2, 3, 8, requires_grad=True)
    teacher = torch.randn(2, 3, 8, requires_grad=True)  # as a trained teacher's states would
    feature_loss(student, teacher, torch.ones(2, 3, dtype=torch.bool), "mse").backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_valid_positions_follow_the_shifted_labels_and_padding():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, 3, 4]])
    assert valid_positions(labels).tolist() == [[True, True, False], [True, True, True]]
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    assert valid_positions(labels, mask).tolist() == [[True, True, False], [False, True, True]]


@pytest.mark.parametrize(("args", "message"), [
    ((-1.0, "cosine", None), r"features.weight must be a number > 0"),
    ((0.0, "cosine", None), r"features.weight must be a number > 0 \(features=None turns the term off\)"),
    (("1", "cosine", None), r"features.weight must be a number > 0.*got the string '1'"),
    ((1.0, "l1", None), r"features.loss must be one of 'cosine', 'mse', got 'l1'"),
    ((1.0, "cosine", [0, 1]), r"features.layers must be a map of student layer indices to teacher layer indices"),
    ((1.0, "cosine", {0: -1}), r"features.layers must be a map"),
    ((1.0, "cosine", {}), r"features.layers must be a map"),
])
def test_bad_arguments_name_themselves(args, message):
    with pytest.raises(ValueError, match=message):
        Features(*args)


# ------------------------------------------------------------------------------------------ in SoftDistill
def batch_of(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 16), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    return {"input_ids": ids, "labels": labels}


def step_parts(model: SoftDistill, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step outside a Trainer: (the value it backpropagates, the loss parts it logs)."""
    parts: dict[str, torch.Tensor] = {}
    model.log_train = lambda found, batch_size: parts.update(found)
    return model.training_step(batch, 0), parts


def soft(teacher: str, chunk_size: int | None = None, **kwargs) -> SoftDistill:
    performance = Performance(chunk_size=chunk_size, teacher_dtype=None)
    model = SoftDistill(**{"teacher": teacher, "student": TINY_STUDENT, "performance": performance, **kwargs})
    model.configure_model()
    return model


def hooks_on(model: SoftDistill) -> int:
    layers = [*decoder_layers(model.student), *decoder_layers(model.teacher)]
    return sum(len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layers)


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_off_reproduces_the_loss_exactly(tiny_teacher_dir, chunk_size):
    batch = batch_of()
    before = soft(tiny_teacher_dir, chunk_size=chunk_size, ce_weight=0.3)
    off = soft(tiny_teacher_dir, chunk_size=chunk_size, ce_weight=0.3, features=None)
    want = before.student_loss(batch["input_ids"], batch["labels"], before.signal.distribution(before.run, batch),
                               ce_weight=0.3)  # the step as it was before the feature term existed
    (loss_a, parts_a), (loss_b, parts_b) = step_parts(before, batch), step_parts(off, batch)
    assert torch.equal(loss_a, loss_b) and torch.equal(parts_a["loss"], want["loss"])
    assert set(parts_b) == {"loss", "kd", "ce", "tokens"}  # no feature term, nothing logged for it
    assert off.features is None and not any(k.startswith("features") for k in off.state_dict())
    assert hooks_on(off) == 0


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_zero_for_a_student_equal_to_its_teacher(tiny_teacher_dir, kind):
    model = soft(tiny_teacher_dir, student={"from_teacher": {"layers": 4}}, features=Features(weight=1.0, loss=kind))
    assert model.features.layer_map == {0: 0, 1: 1, 2: 2, 3: 3}
    _, parts = step_parts(model, batch_of())
    assert float(parts["feature_loss"].detach()) < 1e-6
    assert hooks_on(model) == 0  # the recording hooks are gone after the step
    shifted = soft(tiny_teacher_dir, student={"from_teacher": {"layers": 4}},
                   features=Features(weight=1.0, loss=kind, layers={0: 1, 3: 3}))
    _, parts = step_parts(shifted, batch_of())
    assert float(parts["feature_loss"].detach()) > 1e-4  # student layer 0 against teacher layer 1 differs


def test_on_adds_the_weighted_term_and_maps_copied_layers(tiny_teacher_dir):
    batch = batch_of()
    _, off = step_parts(soft(tiny_teacher_dir), batch)
    model = soft(tiny_teacher_dir, features=Features(weight=0.5))
    kept = model.student.config.distill_teacher_layers  # the tiny teacher's 2 most important of 4 layers
    assert model.features.layer_map == {0: kept[0], 1: kept[1]}  # the teacher layers the student was copied from
    _, on = step_parts(model, batch)
    assert torch.equal(on["kd"], off["kd"]) and torch.equal(on["ce"], off["ce"])
    torch.testing.assert_close(on["loss"], off["loss"] + 0.5 * on["feature_loss"])
    ce_only = soft(tiny_teacher_dir, ce_weight=1.0, features=Features(weight=1.0))  # the teacher runs for the term
    _, parts = step_parts(ce_only, batch)
    assert float(parts["feature_loss"].detach()) > 0


def test_gradients_reach_only_the_student_and_the_projection(tiny_teacher_dir):
    model = soft(tiny_teacher_dir, student=NARROW, features=Features(weight=1.0))
    assert model.features.layer_map == {0: 0, 1: 3} and model.features.projection.weight.shape == (32, 16)
    batch = batch_of()
    mask = valid_positions(batch["labels"])
    with model.feature_recording() as record:  # the feature term alone
        model.signal.distribution(model.run, batch)
        final_hidden(model.student, batch["input_ids"])
    model.features(record, mask).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for layer in decoder_layers(model.student):
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.features.projection.weight.grad.abs().sum() > 0
    trained = {id(p) for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(model.features.projection.weight) in trained
    assert not trained & {id(p) for p in model.teacher.parameters()}


def test_projection_trains_is_checkpointed_and_is_not_exported(tiny_teacher_dir, tmp_path):
    torch.manual_seed(0)
    model = SoftDistill(teacher=tiny_teacher_dir, student=NARROW, features=Features(weight=1.0, loss="mse"))
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    model.configure_model()
    start = model.features.projection.weight.detach().clone()
    trainer.fit(model, tiny_data())
    assert torch.isfinite(trainer.callback_metrics["train/feature_loss"])
    trained = model.features.projection.weight.detach().clone()
    assert not torch.equal(start, trained)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = SoftDistill.load_from_checkpoint(tmp_path / "last.ckpt")
    torch.testing.assert_close(loaded.features.projection.weight, trained)
    without = SoftDistill.load_from_checkpoint(tmp_path / "last.ckpt", teacher=str(tmp_path / "gone"))
    assert without.teacher is None  # exporting needs no teacher: the projection is rebuilt from its weight
    torch.testing.assert_close(without.features.projection.weight, trained)
    folder = without.export(str(tmp_path / "student"))
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["hidden_size"] == 16
    from safetensors.torch import load_file

    assert not [k for k in load_file(f"{folder}/model.safetensors") if "projection" in k or "features" in k]


def test_bad_layer_map_is_refused_when_the_models_are_built(tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"features.layers=\{0: 9\} maps \{0: 9\} outside the models"):
        soft(tiny_teacher_dir, features=Features(weight=1.0, layers={0: 9}))


def test_matcher_needs_a_recording():
    matcher = FeatureMatcher(Features())
    with pytest.raises(RuntimeError, match="no hidden states were recorded"):
        matcher(None, torch.ones(1, 1, dtype=torch.bool))
