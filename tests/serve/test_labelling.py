"""``lightning-distill predict`` from a served teacher: the label store it writes equals one written by the teacher
itself (the server encodes the records with the label writer's own code, seeded alike)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_STUDENT, write_labels

from lightning_distill import Performance, SoftDistill


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_a_store_written_from_the_server_equals_one_written_locally(served_tiny_teacher, tiny_teacher_dir,
                                                                   tmp_path, kind):
    settings = {"kind": kind, "k": 8, "num_samples": 6, "seed": 3, "splits": ["validation"]}  # 10 blocks
    local = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT,
                        performance=Performance(teacher_dtype="float32"))
    served = SoftDistill(teacher=served_tiny_teacher.url, tokenizer=tiny_teacher_dir, student=TINY_STUDENT)
    here = Path(write_labels(local, tmp_path / "local", **settings))
    there = Path(write_labels(served, tmp_path / "served", **settings))
    mine, theirs = (json.loads((p / "manifest.json").read_text()) for p in (here, there))
    assert theirs["complete"] and theirs["teacher"] == served_tiny_teacher.url
    for key in ("tokenizer", "vocab_size", "corpus", "record", "splits", "k", "num_samples", "temperature"):
        assert mine[key] == theirs[key], key  # the shards' checksums included: the same bytes
    assert sorted(p.name for p in here.glob("*.npy")) == sorted(p.name for p in there.glob("*.npy"))


def test_a_served_teacher_labels_only_what_it_serves(served_tiny_teacher, tiny_teacher_dir, tmp_path):
    served = SoftDistill(teacher=served_tiny_teacher.url, tokenizer=tiny_teacher_dir, student=TINY_STUDENT)
    with pytest.raises(ValueError, match="kind='top1': a served teacher labels 'topk' and 'sampled' stores"):
        write_labels(served, tmp_path / "store", kind="top1")
