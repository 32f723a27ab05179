"""LabelWriter under trainer.predict: both splits with a full manifest, resume without rewriting, every kind,
argument checks, two DDP ranks writing disjoint shares, a prepared (streamed) corpus (shards aligned with its chunks,
a resumed labelling, a student trained from the store, two DDP ranks), the tiny CLI configs, and the embedded teacher
end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_STUDENT,
    prepared_corpus,
    requires_builtin,
    requires_litdata,
    small_data,
    tiny_trainer,
    write_labels,
)

from lightning_distill import DistillDataModule, Generation, HardDistill, SoftDistill, generation
from lightning_distill.backbone import tokenizer_fingerprint
from lightning_distill.losses import topk_teacher
from lightning_distill.signals import LiveTeacher
from lightning_distill.store import LabelStore, LabelWriter

REPO = Path(__file__).resolve().parents[2]


def teacher_logits(model: SoftDistill, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's live teacher's logits (B, T, V), as the label writer receives them."""
    return LiveTeacher.logits(model.run, {"input_ids": input_ids})


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def soft_teacher(tiny_teacher_dir):
    return SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)


def test_label_writer_stores_both_splits_with_a_full_manifest(soft_teacher, tmp_path):
    path = tmp_path / "topk"
    write_labels(soft_teacher, path, k=8, value_dtype="float32")
    data = small_data()
    data.set_tokenizer(soft_teacher.tokenizer)
    data.setup()
    found = manifest(path)
    assert found["complete"] and found["kind"] == "topk" and found["k"] == 8
    assert found["teacher"] == soft_teacher.teacher_name and found["vocab_size"] == 384
    assert found["tokenizer"] == tokenizer_fingerprint(soft_teacher.tokenizer)
    assert found["corpus"] == data.corpus_fingerprint() and found["block_size"] == 32
    assert found["record"] == [["ids", "<u2", [32, 8]], ["logprobs", "<f4", [32, 8]], ["covered", "<f4", [32]]]
    assert {s: v["blocks"] for s, v in found["splits"].items()} == {"train": 66, "validation": 10}
    assert [s["blocks"] for s in found["splits"]["train"]["shards"]] == [16, 16, 16, 16, 2]
    # what is stored is the teacher's top-k at every position of the right block
    store = LabelStore(path)
    for split, blocks in (("train", data.train_blocks), ("validation", data.val_blocks)):
        index = len(blocks) - 1
        ids, logprobs = topk_teacher(teacher_logits(soft_teacher, blocks[index : index + 1])[0], 8)
        stored = store.split(split)[index]
        assert torch.equal(stored["topk_ids"], ids)
        torch.testing.assert_close(stored["topk_logprobs"], logprobs, atol=1e-5, rtol=1e-5)


def test_label_writer_resumes_and_never_rewrites_silently(soft_teacher, tmp_path, monkeypatch):
    once = tmp_path / "once"
    write_labels(soft_teacher, once, kind="top1", splits=["train"])
    path = tmp_path / "resumed"
    write_labels(soft_teacher, path, kind="top1", splits=["train"], trainer_kwargs={"limit_predict_batches": 9})
    assert not manifest(path)["complete"]  # interrupted after 36 blocks: 2 shards of 16 written
    assert len(list(path.glob("train-*.npy"))) == 2
    calls = []
    real = SoftDistill.predict_step
    monkeypatch.setattr(SoftDistill, "predict_step", lambda self, batch, *a: calls.append(batch) or real(
        self, batch, *a))
    write_labels(soft_teacher, path, kind="top1", splits=["train"])
    assert sum(len(b["block_idx"]) for b in calls) == 66 - 32  # written shards are not recomputed
    assert manifest(path)["complete"]
    for shard in sorted(once.glob("train-*.npy")):
        assert (path / shard.name).read_bytes() == shard.read_bytes()  # same store as in one go
    calls.clear()
    before = (path / "manifest.json").read_bytes()
    write_labels(soft_teacher, path, kind="top1", splits=["train"])  # the same labelling again: a no-op
    assert not calls and (path / "manifest.json").read_bytes() == before
    with pytest.raises(FileExistsError, match=r"seed differ.*never rewritten silently"):
        write_labels(soft_teacher, path, kind="top1", splits=["train"], seed=1)
    write_labels(soft_teacher, path, kind="top1", splits=["train"], overwrite=True)
    assert manifest(path)["complete"]


def test_label_writer_sampled_and_generate_kinds(tiny_teacher_dir, soft_teacher, tmp_path):
    path = tmp_path / "sampled"
    write_labels(soft_teacher, path, kind="sampled", num_samples=5, temperature=2.0, splits=["validation"])
    block = LabelStore(path).split("validation")[3]
    assert block["sample_ids"].shape == (32, 5) and torch.allclose(block["sample_weights"].sum(-1), torch.ones(32))
    assert manifest(path)["temperature"] == 2.0 and "train" not in manifest(path)["splits"]

    hard = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate",
                       generation=Generation(prompt_tokens=8, max_new_tokens=4))
    path = tmp_path / "generate"
    write_labels(hard, path, kind="generate", splits=["validation"])
    assert manifest(path)["generation"]["prompt_tokens"] == 8
    data = small_data()
    data.set_tokenizer(hard.tokenizer)
    data.setup()
    expected = generation.generate(hard.teacher, data.val_blocks[:2, :8], hard.sequences.settings,
                                   hard.tokenizer.eos_token_id)
    assert torch.equal(torch.stack([LabelStore(path).split("validation")[i]["continuation"] for i in range(2)]),
                       expected)
    with pytest.raises(ValueError, match="kind='generate' does not fit SoftDistill"):
        write_labels(soft_teacher, tmp_path / "bad", kind="generate")


@pytest.mark.parametrize(("kwargs", "name"), [({"kind": "logits"}, "kind"), ({"k": 0}, "k"),
                                              ({"num_samples": 70000}, "num_samples"), ({"temperature": 0},
                                              "temperature"), ({"value_dtype": "int8"}, "value_dtype"),
                                              ({"splits": ["test"]}, "splits"), ({"shard_blocks": 0}, "shard_blocks")])
def test_label_writer_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LabelWriter("somewhere", **kwargs)


def test_label_writer_needs_the_data_module(soft_teacher, tmp_path):
    trainer = tiny_trainer(tmp_path, callbacks=[LabelWriter(str(tmp_path / "x"))])
    with pytest.raises(ValueError, match="DistillDataModule"):
        trainer.predict(soft_teacher, dataloaders=[[{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]])


DDP_LABELLING = '''
import json, sys
import lightning as L
from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.store import LabelWriter

teacher, store, report = sys.argv[1:4]
model = SoftDistill(teacher=teacher, student={"from_teacher": {"layers": 2}})
data = DistillDataModule(block_size=32, batch_size=4, max_documents=2, val_fraction=0.5, seed=0)
blocks = []
class Count(L.Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, *args):
        blocks.extend(batch["block_idx"].tolist())
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[LabelWriter(store, kind="top1", shard_blocks=16), Count()])
trainer.predict(model, datamodule=data)
with open(f"{report}.{trainer.global_rank}", "w") as f:
    json.dump(blocks, f)
'''


def test_two_ranks_label_disjoint_shares(tiny_teacher_dir, tmp_path):
    """Under DDP each rank labels its own shards (no block twice, none missed) and rank zero completes the store."""
    script = tmp_path / "label_ddp.py"
    script.write_text(DDP_LABELLING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    store, report = tmp_path / "store", tmp_path / "blocks"
    done = subprocess.run([sys.executable, str(script), tiny_teacher_dir, str(store), str(report)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
    assert shares[0] and shares[1]
    # train blocks 0-65 then validation 0-9: 5 + 1 shards, alternating over the two ranks
    assert sorted(shares[0] + shares[1]) == sorted([*range(66), *range(10)])
    assert manifest(store)["complete"]
    LabelStore(store)  # every checksum verifies


# --- a prepared (streamed) corpus: shards end where its chunks do ----------------------------------------------


@pytest.fixture(scope="module")
def prepared(tiny_teacher_dir, tmp_path_factory):
    pytest.importorskip("litdata")
    return prepared_corpus(tmp_path_factory.mktemp("labelled"), tiny_teacher_dir)


def streamed_data(corpus: str) -> DistillDataModule:
    return DistillDataModule(corpus=corpus, block_size=16, batch_size=16)


@requires_litdata
def test_label_a_streamed_corpus_in_shards_aligned_with_its_chunks(soft_teacher, prepared, tmp_path):
    path = tmp_path / "store"
    write_labels(soft_teacher, path, data=streamed_data(prepared), kind="topk", k=4, shard_blocks=20,
                 trainer_kwargs={"limit_predict_batches": 3})
    assert not manifest(path)["complete"]  # interrupted: the shards it finished are kept, the others redone
    kept = {f.name: f.read_bytes() for f in path.glob("*.npy")}
    assert kept
    write_labels(soft_teacher, path, data=streamed_data(prepared), kind="topk", k=4, shard_blocks=20)
    found = manifest(path)
    assert found["complete"] and all((path / name).read_bytes() == data for name, data in kept.items())
    data = streamed_data(prepared)
    data.set_tokenizer(soft_teacher.tokenizer)
    data.setup()
    store = LabelStore(path)
    for split, blocks in (("train", data.train_blocks), ("validation", data.val_blocks)):
        entry = found["splits"][split]
        assert entry["blocks"] == len(blocks)
        assert {s for s in data.chunk_starts(split) if s < len(blocks)} <= set(entry["starts"])
        assert all(0 < shard["blocks"] <= 20 for shard in entry["shards"])
        for index in (0, len(blocks) // 2, len(blocks) - 1):
            ids = teacher_logits(soft_teacher, blocks[index][None])[0].topk(4).indices  # (T, 4)
            assert torch.equal(store.split(split)[index]["topk_ids"], ids)

    student = SoftDistill(teacher=soft_teacher.teacher_name, student=TINY_STUDENT, labels=str(path))
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(student, streamed_data(prepared))  # stored labels joined with the streamed batches by block_idx
    assert torch.isfinite(trainer.callback_metrics["train/kd"]) and "val/agreement" in trainer.callback_metrics


DDP_LABELLING_STREAMED = '''
import json, sys
import lightning as L
from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.store import LabelWriter

teacher, corpus, store, report = sys.argv[1:5]
model = SoftDistill(teacher=teacher, student={"from_teacher": {"layers": 2}})
seen = []
class Count(L.Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        seen.extend([dataloader_idx, b] for b in batch["block_idx"].tolist())
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[LabelWriter(store, kind="top1", shard_blocks=20), Count()])
trainer.predict(model, datamodule=DistillDataModule(corpus=corpus, block_size=16, batch_size=16))
with open(f"{report}.{trainer.global_rank}", "w") as f:
    json.dump(seen, f)
'''


@requires_litdata
def test_two_ranks_label_disjoint_shares_whose_union_is_the_one_rank_store(soft_teacher, prepared, tiny_teacher_dir,
                                                                          tmp_path):
    script = tmp_path / "label_ddp.py"
    script.write_text(DDP_LABELLING_STREAMED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two, report = tmp_path / "two", tmp_path / "blocks"
    done = subprocess.run([sys.executable, str(script), tiny_teacher_dir, prepared, str(two), str(report)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = Path(write_labels(soft_teacher, tmp_path / "one", data=streamed_data(prepared), kind="top1",
                            shard_blocks=20))
    shares = [{tuple(x) for x in json.loads(Path(f"{report}.{rank}").read_text())} for rank in (0, 1)]
    blocks = {split: entry["blocks"] for split, entry in manifest(one)["splits"].items()}
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {(i, b) for i, split in enumerate(("train", "validation"))
                                     for b in range(blocks[split])}
    assert manifest(two)["complete"] and manifest(two)["splits"] == manifest(one)["splits"]  # same shards, checksums
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    LabelStore(two)  # every checksum verifies


# --- the CLI and the embedded teacher ----------------------------------------------------------------------------


def test_label_then_train_with_the_tiny_cli_configs(tiny_teacher_dir, tmp_path, monkeypatch):
    """``predict`` with configs/tiny/labels/label_soft.yaml writes the store that ``fit`` with
    configs/tiny/labels/soft_cached.yaml trains from, the teacher never loaded in the second run."""
    from lightning_distill import backbone
    from lightning_distill.cli import main

    monkeypatch.chdir(tmp_path)
    configs = REPO / "configs" / "tiny" / "labels"
    main(["predict", "--config", str(configs / "label_soft.yaml"), "--model.init_args.teacher", tiny_teacher_dir])
    assert manifest(tmp_path / "labels" / "tiny-topk")["complete"]
    loaded = []
    real = backbone.load_model
    monkeypatch.setattr("lightning_distill.modules.building.load_model", lambda *a, **k: loaded.append(a) or real(
        *a, **k))
    main(["fit", "--config", str(configs / "soft_cached.yaml"), "--model.init_args.student", tiny_teacher_dir])
    assert loaded == []  # the student is named: no teacher is loaded, not even to build it


@pytest.mark.integration
@requires_builtin
def test_label_the_builtin_corpus_with_the_embedded_teacher_then_train_without_it(tmp_path):
    """The issue's path end to end on a slice of the built-in corpus: label once (top-32, fp16: under 140 bytes per
    token on disk), then train a student from the store with the teacher absent from memory."""
    data = {"max_documents": 2, "val_fraction": 0.5, "block_size": 64, "batch_size": 4, "seed": 6}  # 7 + 1 blocks
    path = tmp_path / "smollm2-topk32"
    writer = LabelWriter(str(path), kind="topk", k=32)
    teacher = SoftDistill(teacher="builtin:smollm2-135m-instruct", student={"from_teacher": {"layers": 1}})
    tiny_trainer(tmp_path, callbacks=[writer]).predict(teacher, datamodule=DistillDataModule(**data))
    found = manifest(path)
    tokens = sum(split["blocks"] for split in found["splits"].values()) * 64
    assert found["complete"] and found["vocab_size"] == 49152 and found["bytes_per_block"] == 64 * 130
    assert sum(f.stat().st_size for f in path.iterdir()) / tokens < 140

    model = SoftDistill(teacher="builtin:smollm2-135m-instruct", student={"from_teacher": {"layers": 2}},
                        labels=str(path))
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, DistillDataModule(**data))
    assert model.teacher is None and not model.needs_teacher()  # only built the student, then dropped
    assert torch.isfinite(trainer.callback_metrics["train/kd"]) and 0 <= trainer.callback_metrics["val/agreement"] <= 1
