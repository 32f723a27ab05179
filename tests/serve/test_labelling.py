"""``lightning-distill predict`` from a served teacher: the label store it writes equals one written by the teacher
itself (the server encodes the records with the label writer's own code, seeded alike), also with several clients
at once (the ranks of a DDP ``predict``, each asking the server for its own shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    for key in ("tokenizer", "vocab_size", "corpus", "record", "splits", "k", "num_samples", "temperature",
                "teacher_fingerprint"):  # the served teacher's identity as the teacher's own files give it
        assert mine[key] == theirs[key], key  # the shards' checksums included: the same bytes
    assert theirs["teacher_fingerprint"]["weights"] is not None
    assert sorted(p.name for p in here.glob("*.npy")) == sorted(p.name for p in there.glob("*.npy"))


def test_a_served_teacher_labels_only_what_it_serves(served_tiny_teacher, tiny_teacher_dir, tmp_path):
    served = SoftDistill(teacher=served_tiny_teacher.url, tokenizer=tiny_teacher_dir, student=TINY_STUDENT)
    with pytest.raises(ValueError, match="kind='top1': a served teacher labels 'topk' and 'sampled' stores"):
        write_labels(served, tmp_path / "store", kind="top1")


DDP_LABELLING = '''
import json, sys
import lightning as L
from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.store import LabelWriter

url, tokenizer, store, report = sys.argv[1:5]
model = SoftDistill(teacher=url, tokenizer=tokenizer, student={"from_teacher": {"layers": 2}})
data = DistillDataModule(corpus="builtin:python-docs", block_size=32, batch_size=4, max_documents=2,
                         val_fraction=0.5, seed=0)
blocks = []
class Count(L.Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, *args):
        blocks.extend(batch["block_idx"].tolist())
writer = LabelWriter(store, kind="topk", k=8, seed=3, shard_blocks=16)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[writer, Count()])
trainer.predict(model, datamodule=data)
with open(f"{report}.{trainer.global_rank}", "w") as f:
    json.dump(blocks, f)
'''


def test_two_clients_at_once_write_the_store_one_local_labelling_writes(served_tiny_teacher, tiny_teacher_dir,
                                                                        tmp_path):
    """Two DDP ranks label from one server at the same time, each its own shards (two clients of the server):
    together they write the same store, byte for byte, as the teacher labelling alone in this process."""
    script = tmp_path / "label_ddp.py"
    script.write_text(DDP_LABELLING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}  # the API key too
    two, report = tmp_path / "two", tmp_path / "blocks"
    done = subprocess.run([sys.executable, str(script), served_tiny_teacher.url, tiny_teacher_dir, str(two),
                           str(report)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
    assert shares[0] and shares[1]  # both clients asked
    local = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT,
                        performance=Performance(teacher_dtype="float32"))
    one = Path(write_labels(local, tmp_path / "one", kind="topk", k=8, seed=3))
    mine, theirs = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert theirs["complete"]
    for key in ("tokenizer", "vocab_size", "corpus", "record", "splits", "k", "temperature"):
        assert mine[key] == theirs[key], key  # the shards' checksums included: the same bytes
