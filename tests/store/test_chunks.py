"""Label stores of a prepared (streamed) corpus: shards aligned with the corpus chunks, an interrupted labelling resumed
with finished shards kept, a student trained from the store on the streamed corpus (the block_idx join), and two DDP
ranks labelling disjoint shares whose union is the store one rank writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, prepared_corpus, requires_litdata, tiny_trainer, write_labels

from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.store import LabelStore
from lightning_distill.store.chunks import locate, shard_ranges, shard_starts, split_starts

REPO = Path(__file__).resolve().parents[2]


def test_shards_start_every_shard_blocks_and_at_every_chunk():
    assert shard_starts(10, 4) == [0, 4, 8] == split_starts({"blocks": 10}, 4)
    assert shard_starts(10, 4, [0, 3, 3, 7]) == [0, 3, 7]  # an empty chunk adds no shard
    assert shard_starts(10, 2, [0, 5]) == [0, 2, 4, 5, 7, 9]
    assert shard_ranges([0, 3, 7], 10) == [(0, 3), (3, 7), (7, 10)]
    assert split_starts({"blocks": 10, "starts": [0, 3, 7]}, 4) == [0, 3, 7]
    assert [locate([0, 3, 7], b) for b in (0, 2, 3, 9)] == [(0, 0), (0, 2), (1, 0), (2, 2)]


@pytest.fixture(scope="module")
def soft_teacher(tiny_teacher_dir):
    return SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)


@pytest.fixture(scope="module")
def corpus(tiny_teacher_dir, tmp_path_factory):
    pytest.importorskip("litdata")
    return prepared_corpus(tmp_path_factory.mktemp("labelled"), tiny_teacher_dir)


def streamed_data(corpus: str) -> DistillDataModule:
    return DistillDataModule(corpus=corpus, block_size=16, batch_size=16)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@requires_litdata
def test_label_a_streamed_corpus_in_shards_aligned_with_its_chunks(soft_teacher, corpus, tmp_path):
    path = tmp_path / "store"
    write_labels(soft_teacher, path, data=streamed_data(corpus), kind="topk", k=4, shard_blocks=20,
                 trainer_kwargs={"limit_predict_batches": 3})
    assert not manifest(path)["complete"]  # interrupted: the shards it finished are kept, the others redone
    kept = {f.name: f.read_bytes() for f in path.glob("*.npy")}
    assert kept
    write_labels(soft_teacher, path, data=streamed_data(corpus), kind="topk", k=4, shard_blocks=20)
    found = manifest(path)
    assert found["complete"] and all((path / name).read_bytes() == data for name, data in kept.items())
    data = streamed_data(corpus)
    data.set_tokenizer(soft_teacher.tokenizer)
    data.setup()
    store = LabelStore(path)
    for split, blocks in (("train", data.train_blocks), ("validation", data.val_blocks)):
        entry = found["splits"][split]
        assert entry["blocks"] == len(blocks)
        assert {s for s in data.chunk_starts(split) if s < len(blocks)} <= set(entry["starts"])
        assert all(0 < shard["blocks"] <= 20 for shard in entry["shards"])
        for index in (0, len(blocks) // 2, len(blocks) - 1):
            ids = soft_teacher.teacher_logits(blocks[index][None])[0].topk(4).indices  # (T, 4)
            assert torch.equal(store.split(split)[index]["topk_ids"], ids)

    student = SoftDistill(teacher=soft_teacher.teacher_name, student=TINY_STUDENT, labels=str(path))
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(student, streamed_data(corpus))  # stored labels joined with the streamed batches by block_idx
    assert torch.isfinite(trainer.callback_metrics["train/kd"]) and "val/agreement" in trainer.callback_metrics


DDP_LABELLING = '''
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
def test_two_ranks_label_disjoint_shares_whose_union_is_the_one_rank_store(soft_teacher, corpus, tiny_teacher_dir,
                                                                          tmp_path):
    script = tmp_path / "label_ddp.py"
    script.write_text(DDP_LABELLING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two, report = tmp_path / "two", tmp_path / "blocks"
    done = subprocess.run([sys.executable, str(script), tiny_teacher_dir, corpus, str(two), str(report)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = Path(write_labels(soft_teacher, tmp_path / "one", data=streamed_data(corpus), kind="top1", shard_blocks=20))
    shares = [{tuple(x) for x in json.loads(Path(f"{report}.{rank}").read_text())} for rank in (0, 1)]
    blocks = {split: entry["blocks"] for split, entry in manifest(one)["splits"].items()}
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {(i, b) for i, split in enumerate(("train", "validation"))
                                     for b in range(blocks[split])}
    assert manifest(two)["complete"] and manifest(two)["splits"] == manifest(one)["splits"]  # same shards, checksums
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    LabelStore(two)  # every checksum verifies
