"""pruning.py: which teacher layers a from_teacher student keeps (evenly, by Block Influence, or listed), the record
of them in the student's config, and the teacher layer each student layer stands for (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_STUDENT

from lightning_distill import SoftDistill, pruning
from lightning_distill.backbone import build_student, load_teacher
from lightning_distill.pruning import (
    TEACHER_LAYERS,
    block_influence,
    calibration_blocks,
    counterparts,
    evenly_spaced,
    select_layers,
)


@pytest.fixture(scope="module")
def teacher_and_tokenizer(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def layers_of(student, teacher, kept):
    """Whether each student layer holds the weights of teacher layer ``kept[i]``."""
    pairs = zip(student.model.layers, (teacher.model.layers[i] for i in kept), strict=True)
    return all(torch.equal(a, b) for s, t in pairs for a, b in zip(s.parameters(), t.parameters(), strict=True))


def test_importance_is_the_default_and_evenly_is_asked_for(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    default = build_student(TINY_STUDENT, teacher, tokenizer)
    importance = build_student({"from_teacher": {"layers": 2, "select": "importance"}}, teacher, tokenizer)
    assert getattr(default.config, TEACHER_LAYERS) == getattr(importance.config, TEACHER_LAYERS)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), importance.state_dict().values(),
                                                 strict=True))
    evenly = build_student({"from_teacher": {"layers": 2, "select": "evenly"}}, teacher)  # no calibration pass
    assert getattr(evenly.config, TEACHER_LAYERS) == [0, 3] == evenly_spaced(4, 2)
    assert layers_of(evenly, teacher, [0, 3])
    with pytest.raises(ValueError, match=r"select='importance' \(the default\) measures the teacher.*select='evenly'"):
        build_student(TINY_STUDENT, teacher)  # the default needs the teacher's tokenizer


def test_calibration_blocks_are_fixed_corpus_text(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    blocks = calibration_blocks(tokenizer, teacher)
    assert blocks.shape == (pruning.CALIBRATION_BLOCKS, pruning.CALIBRATION_BLOCK_SIZE)
    assert torch.equal(blocks, calibration_blocks(tokenizer, teacher))
    assert len({tuple(row[:8].tolist()) for row in blocks}) == len(blocks)  # each block starts somewhere else
    assert "the" in tokenizer.decode(blocks[0]).lower()


def test_block_influence_is_zero_for_a_layer_that_changes_nothing(tiny_teacher_dir):
    teacher, tokenizer = load_teacher(tiny_teacher_dir)
    for weight in (teacher.model.layers[1].self_attn.o_proj.weight, teacher.model.layers[1].mlp.down_proj.weight):
        weight.data.zero_()  # both residual branches add 0: the layer's output is its input
    influence = block_influence(teacher, calibration_blocks(tokenizer, teacher))
    assert len(influence) == 4 and abs(influence[1]) < 1e-6
    assert all(value > 1e-4 for i, value in enumerate(influence) if i != 1)
    kept = select_layers(teacher, 3, "importance", tokenizer)
    assert kept == [0, 2, 3]


def test_importance_selection_is_deterministic_and_recorded(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    spec = {"from_teacher": {"layers": 2, "select": "importance"}}
    first, second = build_student(spec, teacher, tokenizer), build_student(spec, teacher, tokenizer)
    kept = getattr(first.config, TEACHER_LAYERS)
    assert kept == getattr(second.config, TEACHER_LAYERS)
    influence = block_influence(teacher, calibration_blocks(tokenizer, teacher))
    assert kept == sorted(sorted(range(4), key=lambda i: -influence[i])[:2])
    assert layers_of(first, teacher, kept)


def test_explicit_layer_list(teacher_and_tokenizer):
    teacher, _ = teacher_and_tokenizer
    student = build_student({"from_teacher": {"layers": [1, 2]}}, teacher)
    assert student.config.num_hidden_layers == 2 and getattr(student.config, TEACHER_LAYERS) == [1, 2]
    assert layers_of(student, teacher, [1, 2])


@pytest.mark.parametrize(("options", "message"), [
    ({"layers": 5, "select": "importance"}, r"layers must be between 1 and the teacher's 4 layers, got 5"),
    ({"layers": 2, "select": "best"}, r"student.from_teacher.select must be one of 'evenly', 'importance'"),
    ({"layers": [0, 0]}, r"student.from_teacher.layers must be a list of distinct teacher layers, got \[0, 0\]"),
    ({"layers": [0, 4]}, r"student.from_teacher.layers must be a list of teacher layer indices in \[0, 3\], "
                         r"got \[0, 4\]"),
    ({"layers": [2, 1]}, r"student.from_teacher.layers must be in increasing order.*write \[1, 2\]"),
    ({"layers": []}, r"student.from_teacher.layers must be a list of teacher layer indices"),
    ({"layers": [0, 2], "select": "importance"}, r"select='importance' chooses among a number of layers"),
    ({"layers": 2, "order": 1}, r"accepts only 'layers', 'select' and 'tokenizer', got extra keys \['order'\]"),
])
def test_bad_selection_names_the_argument(teacher_and_tokenizer, options, message):
    teacher, tokenizer = teacher_and_tokenizer
    with pytest.raises(ValueError, match=message):
        build_student({"from_teacher": options}, teacher, tokenizer)


def test_importance_needs_the_tokenizer(teacher_and_tokenizer):
    teacher, _ = teacher_and_tokenizer
    with pytest.raises(ValueError, match=r"select='importance' \(the default\) measures the teacher on calibration"):
        build_student({"from_teacher": {"layers": 2, "select": "importance"}}, teacher)


def test_exported_config_holds_the_kept_layers(tiny_teacher_dir, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student={"from_teacher": {"layers": 3, "select": "importance"}})
    model.configure_model()
    kept = getattr(model.student.config, TEACHER_LAYERS)
    assert len(kept) == 3 and kept == sorted(set(kept))
    model.export(str(tmp_path / "student"))
    assert json.loads((tmp_path / "student" / "config.json").read_text())[TEACHER_LAYERS] == kept


def test_counterparts_follow_the_record_else_are_evenly_spaced(teacher_and_tokenizer):
    teacher, _ = teacher_and_tokenizer
    assert counterparts(build_student({"from_teacher": {"layers": [1, 2]}}, teacher).config, 4) == [1, 2]
    fresh = build_student({"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 2}}, teacher)
    assert counterparts(fresh.config, 4) == [0, 3]
    assert counterparts(build_student({"from_teacher": {"layers": [1, 2]}}, teacher).config, 2) == [0, 1]
    with pytest.raises(ValueError, match=r"the student has 2 layers, the teacher 1.*features.layers"):
        counterparts(fresh.config, 1)


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(4, 2) == [0, 3]
    with pytest.raises(ValueError, match="layers must be between 1 and"):
        evenly_spaced(4, 5)
