"""Run by tests/data/test_resume_streamed.py as ``python resume_worker.py CORPUS TOKENIZER OUT DEVICES WORKERS MODE``:
a fit of a tiny model over a prepared (streamed) corpus that records every training batch's blocks and tokens.

MODE ``full``: an uninterrupted fit, then a second one resumed from the checkpoint of step KILL_AT written by a
third, killed one (``kill``: checkpoints every KILL_AT steps, then dies with ``os._exit`` two steps later, as a crash
would). Each rank writes ``OUT.<mode>.<rank>.json``. Lightning's DDP launcher re-runs this script once per extra rank.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_distill import DistillDataModule
from lightning_distill.backbone import load_tokenizer

MAX_STEPS = {1: 36, 2: 20}  # past the end of the first epoch (28 and 14 steps of 4 blocks of 64 tokens)
KILL_AT = {1: 10, 2: 6}


class Tiny(L.LightningModule):
    """A bigram model that records what it trains on."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(len(tokenizer), len(tokenizer))
        self.seen: list[list] = []

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]  # (B, T)
        self.seen.append([self.global_step, batch["block_idx"].tolist(), ids.sum(-1).tolist()])
        logits = self.embed(ids[:, :-1])  # (B, T-1, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.embed(batch["input_ids"]).mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Kill(L.Callback):
    def __init__(self, at: int, out: str) -> None:
        self.at, self.out = at, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at + 2:  # two steps past the checkpoint: their work is lost
            dump(f"{self.out}.kill.{trainer.global_rank}.json", pl_module.seen)
            os._exit(1)


def dump(path: str, seen: list) -> None:
    with open(path, "w") as f:
        json.dump(seen, f)


def fit(corpus, tokenizer, devices, workers, callbacks, ckpt_path=None, checkpoint=False):
    model = Tiny(tokenizer)
    data = DistillDataModule(corpus=corpus, block_size=64, batch_size=4, num_workers=workers, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=MAX_STEPS[devices], limit_val_batches=2, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        enable_checkpointing=checkpoint, default_root_dir=os.getcwd())
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model


def main() -> None:
    corpus, tokenizer_dir, out, devices, workers, mode = sys.argv[1:7]
    devices, workers = int(devices), int(workers)
    tokenizer = load_tokenizer(tokenizer_dir)
    at = KILL_AT[devices]
    if mode == "kill":
        every = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=at, save_top_k=-1, filename="{step}")
        fit(corpus, tokenizer, devices, workers, [every, Kill(at, out)], checkpoint=True)
        raise SystemExit("the killed run went past its kill step")
    trainer, model = fit(corpus, tokenizer, devices, workers, [])
    dump(f"{out}.full.{trainer.global_rank}.json", model.seen)
    trainer, model = fit(corpus, tokenizer, devices, workers, [], ckpt_path=f"ckpt/step={at}.ckpt")
    dump(f"{out}.resumed.{trainer.global_rank}.json", model.seen)
    if devices > 1:
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
