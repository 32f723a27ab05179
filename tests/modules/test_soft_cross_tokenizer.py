"""SoftDistill with a teacher whose tokenizer is not the student's (ULD, GOLD-style), on tiny random models: the
student trains, checkpoints without its teacher, exports with its own tokenizer; on one tokenizer the whole path is
the forward KL; the settings that cannot work fail before any work, naming both sides."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_data, tiny_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_distill import HardDistill, OnPolicy, SoftDistill, Validation
from lightning_distill.backbone import load_tokenizer
from lightning_distill.losses import GOLD, AlignedTeacher
from lightning_distill.signals import CrossTokenizerTeacher, LiveTeacher


def cross_student(tokenizer_dir: str) -> dict:
    return {"from_teacher": {"layers": 2, "tokenizer": tokenizer_dir}}


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_a_student_on_its_own_tokenizer_trains_checkpoints_and_exports(tiny_teacher_dir, tiny_student_tokenizer_dir,
                                                                       tmp_path, loss):
    teacher = shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")  # removed after training
    model = SoftDistill(teacher=str(teacher), student=cross_student(tiny_student_tokenizer_dir), loss=loss,
                        ce_weight=0.2)
    assert isinstance(model.signal, CrossTokenizerTeacher) and len(model.tokenizer) == 512
    trainer = tiny_trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(model, tiny_data())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/kd"] > 0 and torch.isfinite(metrics["val/ce"])
    assert model.student.config.vocab_size == 512 and model.teacher.config.vocab_size == 384
    trainer.save_checkpoint(tmp_path / "cross.ckpt")
    state = torch.load(tmp_path / "cross.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)  # the frozen teacher is not in it

    shutil.rmtree(teacher)  # the checkpoint alone rebuilds the student and its tokenizer
    restored = SoftDistill.load_from_checkpoint(str(tmp_path / "cross.ckpt"))
    assert len(restored.tokenizer) == 512 and restored.hparams.loss == loss
    out = restored.export(str(tmp_path / "student"))
    exported, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == load_tokenizer(tiny_student_tokenizer_dir).get_vocab()
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(exported(ids).logits, model.student.cpu()(ids).logits)  # the trained student
    assert exported.config.eos_token_id == tokenizer.eos_token_id


def test_on_one_tokenizer_gold_is_the_forward_kl(tiny_teacher_dir):
    """Same tokenizer on both sides: every span is one token and the shared vocabulary all of it, so the GOLD path
    (alignment, the teacher on its own ids, the loss) gives the forward KL of the id-by-id path."""
    gold = SoftDistill(teacher=tiny_teacher_dir, student={"from_teacher": {"layers": 2}}, loss="gold", ce_weight=0.3,
                       temperature=2.0)
    plain = SoftDistill(teacher=tiny_teacher_dir, student={"from_teacher": {"layers": 2}}, loss="forward_kl",
                        ce_weight=0.3, temperature=2.0)
    for model in (gold, plain):
        model.configure_model()
    tokenizer = gold.tokenizer
    texts = ["def f(x):\n    return x ** 2", "class Point:\n    pass\n\nprint(Point())"]
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] + tokenizer(t)["input_ids"] for t in texts]
    ids = torch.tensor([row[:24] for row in rows])
    aligned = gold.signal.distribution(gold.run, {"input_ids": ids})
    assert isinstance(aligned, AlignedTeacher) and torch.equal(aligned.teacher_ids, ids)
    assert len(aligned.spans) == 2 * 23 and (aligned.spans[:, 2] - aligned.spans[:, 1] == 1).all()
    mine = gold.student_loss(ids, ids, aligned, divergence=gold.divergence, ce_weight=0.3, temperature=2.0)
    theirs = plain.student_loss(ids, ids, LiveTeacher().distribution(plain.run, {"input_ids": ids}),
                                divergence=plain.divergence, ce_weight=0.3, temperature=2.0)
    for key in ("loss", "kd", "ce", "tokens"):
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_a_loss_that_needs_one_vocabulary_is_refused_before_any_work(tiny_teacher_dir, tiny_student_tokenizer_dir):
    student = cross_student(tiny_student_tokenizer_dir)
    with pytest.raises(ValueError, match=rf"student=.* reads with its own tokenizer '{tiny_student_tokenizer_dir}' "
                                         rf"and teacher='{tiny_teacher_dir}' with the teacher's, but loss='forward_kl'"
                                         r" compares their distributions id by id: use loss='uld' or loss='gold'"):
        SoftDistill(teacher=tiny_teacher_dir, student=student, loss="forward_kl")
    hard = HardDistill(teacher=tiny_teacher_dir, student=student)
    with pytest.raises(ValueError, match=r"has a tokenizer of its own, but HardDistill with these settings compares "
                                         rf"it with teacher='{tiny_teacher_dir}' id by id"):
        hard.configure_model()
    assert hard.teacher is None  # refused before the teacher was loaded


@pytest.mark.parametrize(("settings", "message"), [
    ({"labels": "store"}, r"labels must be None with loss='gold', got 'store': set labels=None"),
    ({"on_policy": OnPolicy(lmbda=0.5)}, r"on_policy must be None with loss='gold'"),
    ({"validation": Validation(new_tokens=8)}, r"validation.new_tokens must be 0 with loss='gold', got 8"),
    ({"teacher": "http://localhost:1"}, r"loss='gold' reads each block with the teacher's own tokenizer and model, "
                                        r"but teacher='http://localhost:1'"),
])
def test_settings_a_cross_tokenizer_teacher_cannot_serve(tiny_teacher_dir, tiny_student_tokenizer_dir, settings,
                                                          message):
    arguments = {"teacher": tiny_teacher_dir, "student": cross_student(tiny_student_tokenizer_dir), "loss": "gold",
                 **settings}
    with pytest.raises(ValueError, match=message):
        SoftDistill(**arguments)


def test_gold_with_its_parameters_and_labelling_refused(tiny_teacher_dir, tiny_student_tokenizer_dir, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=cross_student(tiny_student_tokenizer_dir),
                        loss=GOLD(matched_weight=0.5))
    assert model.divergence == GOLD(0.5) and not model.compares_vocabularies()
    with pytest.raises(ValueError, match=r"a teacher with another tokenizer cannot label a store yet"):
        tiny_trainer(tmp_path).predict(model, tiny_data())


def test_a_fresh_student_takes_the_size_of_its_own_tokenizer(tiny_teacher_dir, tiny_student_tokenizer_dir):
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    model = SoftDistill(teacher=tiny_teacher_dir, student={"config": config}, tokenizer=tiny_student_tokenizer_dir,
                        loss="uld")
    model.configure_model()
    assert model.student.config.vocab_size == len(model.tokenizer) == 512 and model.teacher.config.vocab_size == 384
