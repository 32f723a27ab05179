"""StoredLabels: the one place a label store is opened, checked against the method and the data, and joined with
the batches by block_idx (the data module knows nothing of it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, small_data, tiny_trainer, write_labels

from lightning_distill import SoftDistill
from lightning_distill.signals import StoredLabels
from lightning_distill.store import LabelStore


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory):
    """A top-k store (k = 4) of small_data(), written by the tiny teacher through trainer.predict."""
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    return Path(write_labels(model, tmp_path_factory.mktemp("labels") / "topk", k=4))


def reader(tiny_teacher_dir, store, **kwargs) -> SoftDistill:
    return SoftDistill(teacher=None, student=tiny_teacher_dir, labels=str(store), **kwargs)


def test_records_are_joined_by_block_idx(tiny_teacher_dir, store):
    model = reader(tiny_teacher_dir, store)
    data = small_data()
    data.set_tokenizer(model.tokenizer)
    data.setup()
    with pytest.warns(UserWarning, match="no DistillDataModule"):
        model.setup("fit")
    stored = LabelStore(store)
    for loader, split in ((data.train_dataloader(), "train"), (data.val_dataloader(), "validation")):
        batch = next(iter(loader))
        assert "teacher" not in batch  # the data module carries no labels
        records = model.signal.records(batch, split)
        assert records["topk_ids"].shape == (4, 32, 4) and records["topk_logprobs"].dtype == torch.float32
        for row, block in enumerate(batch["block_idx"].tolist()):
            assert torch.equal(records["topk_ids"][row], stored.split(split)[block]["topk_ids"])
        targets = model.signal.distribution(model.run, batch, split)
        assert torch.equal(targets.ids, records["topk_ids"]) and targets.kind == "topk"
        assert torch.equal(model.signal.picks(model.run, batch, split), records["argmax"])
    with pytest.raises(ValueError, match="holds no continuations"):
        model.signal.continuations(model.run, batch, 8, None)


def fit(model, data, tmp_path):
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, data)


def test_a_store_for_other_data_is_refused_saying_why(tiny_teacher_dir, store, tmp_path):
    for data, message in [(small_data(block_size=16), "block_size=32, the data module makes block_size=16"),
                          (small_data(seed=1), "another corpus or split"),
                          (small_data(max_documents=3), "another corpus or split")]:
        with pytest.raises(ValueError, match=message):
            fit(reader(tiny_teacher_dir, store), data, tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in store.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="another tokenizer"):
        fit(reader(tiny_teacher_dir, copy), small_data(), tmp_path)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = copy / "train-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match=r"train-00001\.npy fails its checksum"):
        fit(reader(tiny_teacher_dir, copy), small_data(), tmp_path)
    (copy / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        fit(reader(tiny_teacher_dir, copy), small_data(), tmp_path)
    with pytest.raises(ValueError, match="not a label store"):
        fit(reader(tiny_teacher_dir, tmp_path / "missing"), small_data(), tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="labels must be the folder of a label store"):
        StoredLabels("")
    with pytest.raises(ValueError, match="tail must be one of"):
        StoredLabels("x", tail="drop")
