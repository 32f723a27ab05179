"""Kill a fit on a streamed corpus mid-epoch, resume from its last checkpoint: the batches trained on after the resume
are those of an uninterrupted run, on 1 rank (2 DataLoader workers) and on 2 DDP CPU ranks, into the next epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepared_corpus, requires_litdata

pytestmark = requires_litdata
WORKER = Path(__file__).with_name("resume_worker.py")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("devices", "workers"), [(1, 2), (2, 0)])
def test_a_killed_fit_resumes_with_the_batches_of_an_uninterrupted_one(tiny_teacher_dir, tmp_path, devices, workers):
    corpus = prepared_corpus(tmp_path / "corpus", tiny_teacher_dir)
    args = [corpus, tiny_teacher_dir, "out", str(devices), str(workers)]
    killed = run([*args, "kill"], tmp_path)
    assert killed.returncode != 0 and (tmp_path / "ckpt").is_dir(), killed.stderr[-3000:]
    done = run([*args, "full"], tmp_path)  # an uninterrupted fit, then the resumed one
    assert done.returncode == 0, done.stderr[-3000:]
    kill_at = {1: 10, 2: 6}[devices]
    shares = []
    for rank in range(devices):
        full, killed_seen, resumed = (json.loads((tmp_path / f"out.{mode}.{rank}.json").read_text())
                                      for mode in ("full", "kill", "resumed"))
        assert [step for step, _, _ in full] == list(range(len(full)))
        assert killed_seen == full[: kill_at + 2]  # the killed run trained two steps past its checkpoint
        assert resumed == full[kill_at:]  # same blocks, same tokens, from the checkpoint's step on
        epoch = 112 // (4 * devices)  # steps per epoch: 112 train blocks of 64 tokens in batches of 4 per rank
        assert len({b for _, blocks, _ in full[:epoch] for b in blocks}) == 4 * epoch  # no block twice in an epoch
        shares.append({b for _, blocks, _ in full[:epoch] for b in blocks})
    if devices == 2:
        assert not shares[0] & shares[1]  # each rank its own share of the stream


def test_resuming_from_an_end_of_epoch_checkpoint_starts_the_next_epoch(tiny_teacher_dir, tmp_path):
    """Epoch-based training restored from the checkpoint of a finished epoch (Lightning does not restore the loader's
    state then): the next epoch is the one an uninterrupted run trains on, reshuffled, not the first one again."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from resume_worker import Tiny

    from lightning_distill import DistillDataModule
    from lightning_distill.backbone import load_tokenizer

    corpus = prepared_corpus(tmp_path / "corpus", tiny_teacher_dir)
    tokenizer = load_tokenizer(tiny_teacher_dir)

    def fit(epochs: int, callbacks=(), ckpt_path=None) -> list:
        model = Tiny(tokenizer)
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                            enable_checkpointing=bool(callbacks), default_root_dir=str(tmp_path))
        trainer.fit(model, DistillDataModule(corpus=corpus, block_size=64, batch_size=4, seed=3), ckpt_path=ckpt_path)
        return model.seen

    full = fit(2)
    fit(1, [ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end")])
    resumed = fit(2, ckpt_path=str(tmp_path / "ckpt" / "end.ckpt"))
    assert resumed == full[28:] and resumed != full[:28]  # epoch 2 of the uninterrupted run (28 steps per epoch)
