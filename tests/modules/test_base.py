"""DistillModule mechanics shared by every method: teacher hygiene, checkpoints, accumulation, schedule, export."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_distill import Optimization, Performance, SoftDistill
from lightning_distill.cli import load_checkpoint
from lightning_distill.modules.base import adamw_with_schedule, fused_adamw, lr_factor


def teacher_state(model):
    return {k: v.clone() for k, v in model.teacher.state_dict().items()}


def test_frozen_teacher_unchanged_and_absent_from_checkpoint(tiny_teacher_dir, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=0.5)
    model.configure_model()
    before = teacher_state(model)
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = tiny_trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(model, tiny_data())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in model.student.state_dict().items())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    assert checkpoint["lightning_distill_class"] == "SoftDistill"

    loaded = load_checkpoint(str(path))
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, loaded.student.state_dict()[key]), key
    assert all(torch.equal(before[k], v) for k, v in loaded.teacher.state_dict().items())
    assert loaded.hparams.ce_weight == 0.5


def test_export_loads_in_transformers_and_generates(tiny_teacher_dir, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    model.configure_model()
    out = model.export(str(tmp_path / "student"))
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = model.tokenizer("def f(x):", return_tensors="pt").input_ids
    generated = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, hf.state_dict()[key]), key
    assert isinstance(model.generate(["def f(x):"], model="teacher", max_new_tokens=4)[0], str)


def test_lr_schedule_warmup_then_cosine():
    factors = [lr_factor(s, 100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] < 1.0 + 1e-9
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(100, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_adamw_is_fused_where_torch_takes_the_parameters_and_updates_alike():
    """Fused AdamW for plain CPU parameters, the default one where fused cannot run (none, mixed devices); both take
    the same steps."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    assert fused_adamw(weights) and not fused_adamw([])
    assert not fused_adamw([*weights, torch.nn.Parameter(torch.zeros(2, device="meta"))])
    ours, plain = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
    plain.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    fused = adamw_with_schedule([(ours, 1e-2)], 0.0, warmup_steps=0, min_lr_ratio=1.0, total_steps=5)["optimizer"]
    default = torch.optim.AdamW(plain.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    assert all(group["fused"] for group in fused.param_groups) and not default.param_groups[0]["fused"]
    for step in range(3):
        for model, optimizer in ((ours, fused), (plain, default)):
            model.zero_grad()
            model(torch.full((2, 4), float(step + 1))).square().sum().backward()
            optimizer.step()
    for a, b, before in zip(ours.parameters(), plain.parameters(), start, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, before)  # it moved


class _GradCapture(L.Callback):
    """Grads of the student after the optimizer step's closure (post-hook: after our rescale)."""

    def on_train_start(self, trainer, pl_module):
        self.grads = []
        trainer.optimizers[0].register_step_post_hook(
            lambda opt, args, kwargs: self.grads.append(
                {n: p.grad.clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}))


def _masked_batches(model, sizes_masked):
    """Batches with different numbers of valid tokens (some labels -100)."""
    torch.manual_seed(0)
    vocab = model.student.config.vocab_size
    batches = []
    for batch_size, masked in sizes_masked:
        ids = torch.randint(0, vocab, (batch_size, 16))
        labels = ids.clone()
        labels[:, :masked] = -100
        batches.append({"input_ids": ids, "labels": labels, "block_idx": torch.arange(batch_size)})
    return batches


@pytest.mark.parametrize("ce_weight", [1.0, 0.3])
def test_gradient_accumulation_normalizes_by_window_tokens(tiny_teacher_dir, tmp_path, ce_weight):
    """Two micro-batches with 15 and 3 valid tokens per row, accumulated, give exactly the gradient of one
    batch holding both (mean over all valid tokens), not the mean of the two micro-batch means."""
    torch.manual_seed(0)
    accumulated = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=ce_weight)
    accumulated.configure_model()
    whole = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=ce_weight)
    whole.configure_model()
    whole.student.load_state_dict(accumulated.student.state_dict())
    first, second = _masked_batches(accumulated, [(2, 0), (2, 12)])
    both = {k: torch.cat([first[k], second[k]]) for k in first}

    grads = []
    for model, loader, accumulate in [(accumulated, [first, second], 2), (whole, [both], 1)]:
        capture = _GradCapture()
        trainer = tiny_trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[capture],
                               limit_val_batches=0, enable_checkpointing=False)
        trainer.fit(model, train_dataloaders=DataLoader(loader, batch_size=None))
        grads.append(capture.grads[0])
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_arguments_name_themselves(tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"optimization\.learning_rate"):  # checked where the group is made
        SoftDistill(teacher=tiny_teacher_dir, optimization=Optimization(learning_rate=0))
    with pytest.raises(ValueError, match=r"performance\.chunk_size"):
        SoftDistill(teacher=tiny_teacher_dir, performance=Performance(chunk_size=-1))
    with pytest.raises(ValueError, match="needs a teacher"):
        SoftDistill(teacher=None, student={"from_teacher": {"layers": 2}})


def test_validate_then_fit_then_validate(tiny_teacher_dir, tmp_path):
    """The demo's sequence: metrics created by `validate` must keep working inside `fit`."""
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    data = tiny_data(ood_corpus="builtin:shakespeare")
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=1)
    trainer.validate(model, data, verbose=False)
    before = float(trainer.callback_metrics["val/ppl"])
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    assert float(trainer.callback_metrics["val/ppl"]) != before
    assert "val_ood/kl" in trainer.callback_metrics
