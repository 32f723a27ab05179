"""Run by tests/modules/test_ddp.py as `python global_batch_worker.py TEACHER_DIR CORPUS OUT_DIR WORLD BATCH`: a
SoftDistill fit of 6 steps on WORLD CPU ranks (gloo DDP when 2) at BATCH blocks per rank. Each rank writes the
blocks of its batches (``blocks-<rank>.json``); rank 0 writes the student's final weights (``weights.pt``)."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest helpers
from conftest import TINY_STUDENT

from lightning_distill import DistillDataModule, Optimization, Performance, SoftDistill


class Blocks(L.Callback):
    def __init__(self) -> None:
        self.blocks = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.blocks.append(batch["block_idx"].tolist())


def main() -> None:
    teacher, corpus, out, world, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    model = SoftDistill(teacher=teacher, student=TINY_STUDENT, ce_weight=0.5,
                        performance=Performance(teacher_dtype=None), optimization=Optimization(warmup_steps=2))
    data = DistillDataModule(corpus=corpus, block_size=16, batch_size=batch, val_fraction=0.25, seed=3)
    blocks = Blocks()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=6,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[blocks])
    trainer.fit(model, data)
    (out / f"blocks-{trainer.global_rank}.json").write_text(json.dumps(blocks.blocks))
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.student.state_dict().items()}, out / "weights.pt")
    if world > 1:  # tear gloo down before the interpreter exits (see ddp_worker.py)
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
