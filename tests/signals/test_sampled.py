"""On-policy distillation (signals/sampled.py, SoftDistill's on_policy): the student's rollouts, masking, the two
losses, no gradient through sampling, prompt files, the validation metric, and a 2-process DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, tiny_data, tiny_trainer

from lightning_distill import OnPolicy, SoftDistill, Validation, generation
from lightning_distill.losses import ReverseKL, SparseTargets
from lightning_distill.metrics import distinct_ngrams
from lightning_distill.signals import LiveTeacher, StudentSamples

ON_POLICY = {"prompt_tokens": 8, "max_new_tokens": 6}


def on_policy(**kwargs) -> OnPolicy:
    """The on-policy options of these tests (short prompts and rollouts), with ``kwargs`` set."""
    return OnPolicy(**{**ON_POLICY, **kwargs})


def model(tiny_teacher_dir, **kwargs) -> SoftDistill:
    made = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, **kwargs)
    made.configure_model()
    return made


def batch(rows: int = 3, length: int = 16) -> dict:
    ids = torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "block_idx": torch.arange(rows)}


def test_lmbda_zero_is_the_off_policy_method(tiny_teacher_dir):
    torch.manual_seed(0)
    off = model(tiny_teacher_dir, ce_weight=0.3)
    same = model(tiny_teacher_dir, ce_weight=0.3, on_policy=on_policy(lmbda=0.0, loss="sampled_token"))
    same.student.load_state_dict(off.student.state_dict())
    with pytest.warns(UserWarning, match="self.log"):
        torch.testing.assert_close(same.training_step(batch(), 0), off.training_step(batch(), 0), rtol=0, atol=0)
    assert type(same.signal) is LiveTeacher


def test_lmbda_is_the_share_of_on_policy_steps(tiny_teacher_dir):
    half = model(tiny_teacher_dir, on_policy=on_policy(lmbda=0.5)).signal
    picks = [half.chooses(step) for step in range(400)]
    assert 150 < sum(picks) < 250 and picks == [half.chooses(step) for step in range(400)]  # seeded
    always = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0)).signal
    assert all(always.chooses(step) for step in range(50))


def test_on_policy_start_keeps_the_first_steps_off_policy(tiny_teacher_dir):
    late = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, start=20)).signal
    assert [late.chooses(step) for step in range(30)] == [False] * 20 + [True] * 10
    half = model(tiny_teacher_dir, on_policy=on_policy(lmbda=0.5)).signal
    half_late = model(tiny_teacher_dir, on_policy=on_policy(lmbda=0.5, start=100)).signal
    assert not any(half_late.chooses(step) for step in range(100))
    assert [half_late.chooses(s) for s in range(100, 300)] == [half.chooses(s) for s in range(100, 300)]  # same coin


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lmbda": 0.0, "start": 5}, r"on_policy\.start=5 delays"),
    ({"lmbda": 1.0, "start": -1}, r"on_policy\.start must be"),
    ({"lmbda": 1.0, "start": 2.5}, r"on_policy\.start must be")])
def test_on_policy_start_bad_values(tiny_teacher_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):  # checked where the group is made
        SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, on_policy=on_policy(**kwargs))


def test_rollout_masks_the_prompt_and_everything_after_eos(tiny_teacher_dir, monkeypatch):
    m = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0))
    eos = m.tokenizer.eos_token_id
    monkeypatch.setattr(generation, "generate", lambda net, p, *a, **k: torch.tensor([[7, 8, eos, 9, 9, 9]] * len(p)))
    rollout = m.signal.rollout(m.run, batch())
    assert rollout["input_ids"].shape == rollout["labels"].shape == (3, 14)
    assert torch.equal(rollout["input_ids"][:, :8], batch()["input_ids"][:, :8])
    assert rollout["labels"][0].tolist() == [-100] * 8 + [7, 8, eos, -100, -100, -100]
    assert not rollout["input_ids"].requires_grad


def test_rollouts_are_sampled_in_eval_mode_without_gradient(tiny_teacher_dir, monkeypatch):
    m = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0))
    seen = []
    real = m.student.generate

    def spy(*args, **kwargs):
        seen.append((m.student.training, torch.is_grad_enabled(), kwargs["do_sample"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(m.student, "generate", spy)
    m.student.train()
    m.signal.rollout(m.run, batch())
    assert seen == [(False, False, True)] and m.student.training  # back in train mode after


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
def test_on_policy_step_trains_the_student_from_its_own_tokens(tiny_teacher_dir, loss):
    m = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, loss=loss))
    inputs = m.signal.loss_inputs(m.run, m.signal.rollout(m.run, batch()), temperature=1.0)
    assert inputs["ce_weight"] == 0.0 and (inputs["targets"][:, :8] == -100).all()
    parts = m.student_loss(**inputs)
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and parts["tokens"] > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_sampled_token_gradient_only_through_the_sampled_tokens_log_probs():
    """The value is the per-token reverse-KL estimate log p_s(x) - log p_t(x); the gradient w.r.t. the student's
    log-probs is that estimate at the sampled token and 0 everywhere else (REINFORCE, discount 0)."""
    g = torch.Generator().manual_seed(0)
    student_logp = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    ids = torch.randint(0, 11, (5, 1), generator=g)
    teacher_logp = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1).gather(-1, ids)
    targets = SparseTargets("tokens", ids, teacher_logp)
    per_token = targets.per_token(student_logp, None, 1.0)
    estimate = (student_logp.gather(-1, ids) - teacher_logp).squeeze(-1)
    torch.testing.assert_close(per_token, estimate.detach())
    (grad,) = torch.autograd.grad(per_token.sum(), student_logp)
    expected = torch.zeros_like(student_logp).scatter(-1, ids, estimate.detach().unsqueeze(-1))
    torch.testing.assert_close(grad, expected)


def test_the_full_loss_equals_the_divergence_on_the_rollout(tiny_teacher_dir):
    m = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, loss="reverse_kl"))
    inputs = m.signal.loss_inputs(m.run, m.signal.rollout(m.run, batch()), temperature=1.0)
    got = m.student_loss(**inputs)["kd"]
    ids, labels = inputs["input_ids"], inputs["targets"]
    student, teacher = m(ids)[:, :-1], LiveTeacher.logits(m.run, {"input_ids": ids})[:, :-1]
    want = ReverseKL()(student, teacher, labels[:, 1:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prompt_file(tiny_teacher_dir, tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "def add(a, b):"}\n\n{"prompt": "The for statement in Python is used to"}\n')
    m = model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, prompts=str(file)))
    m.setup("fit")
    rollout = m.signal.rollout(m.run, batch())
    mask = rollout["attention_mask"]
    assert mask is not None and rollout["input_ids"].shape == mask.shape == rollout["position_ids"].shape
    assert ((rollout["labels"] != -100) <= (mask == 1)).all()  # padding is never a target
    assert torch.isfinite(m.student_loss(**m.signal.loss_inputs(m.run, m.signal.rollout(m.run, batch()), 1.0))["loss"])
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="no chat template"):
        model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, prompts=str(chat))).setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no string field 'prompt'"):
        model(tiny_teacher_dir, on_policy=on_policy(lmbda=1.0, prompts=str(bad))).setup("fit")


def test_fit_logs_generation_and_the_on_policy_validation_metric(tiny_teacher_dir, tmp_path):
    m = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, on_policy=on_policy(lmbda=1.0),
                    validation=Validation(new_tokens=4))
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(m, tiny_data())
    metrics = trainer.callback_metrics
    for name in ("train/generated_tokens_per_sec", "train/generation_share", "val/teacher_logprob",
                 "val/on_policy_rkl", "val/kl"):
        assert torch.isfinite(metrics[name]), name
    assert 0 < metrics["train/generation_share"] < 1 and metrics["val/teacher_logprob"] < 0
    assert 1 <= metrics["val/length"] <= 4  # greedy continuations of 4 tokens, cut at their first EOS
    for n in (2, 4):
        assert 0 < metrics[f"val/distinct_{n}"] <= 1


def test_distinct_ngrams_counts_repeats_within_each_continuation_up_to_its_end():
    tokens = torch.tensor([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7], [1, 2, 1, 2, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()  # the third ends after 4
    torch.testing.assert_close(distinct_ngrams(tokens, mask, 2), torch.tensor([1.0, 0.25, 2 / 3]))
    torch.testing.assert_close(distinct_ngrams(tokens, mask, 4), torch.tensor([1.0, 0.5, 1.0]))
    assert distinct_ngrams(tokens[:1, :1], mask[:1, :1], 2).tolist() == [1.0]  # too short to repeat


def test_bad_arguments(tiny_teacher_dir, tmp_path):
    # the on-policy settings are checked where their group is made, so it is made inside pytest.raises
    lmbda_range = r"on_policy\.lmbda must be a number in \[0, 1\]"
    for kwargs, message in [(lambda: {"on_policy": OnPolicy(lmbda=1.5)}, lmbda_range),
                            (lambda: {"on_policy": OnPolicy(lmbda=-0.1)}, lmbda_range),
                            (lambda: {"on_policy": OnPolicy(lmbda=1.0, loss="kl")}, r"on_policy\.loss"),
                            (lambda: {"on_policy": OnPolicy(lmbda=1.0, prompt_tokens=0)}, r"on_policy\.prompt_tokens"),
                            (lambda: {"on_policy": OnPolicy(lmbda=1.0, temperature=0)}, r"on_policy\.temperature"),
                            (lambda: {"on_policy": OnPolicy(lmbda=1.0, top_p=0)}, r"on_policy\.top_p"),
                            (lambda: {"on_policy": OnPolicy(lmbda=0.5), "labels": str(tmp_path)},
                             "needs a live teacher")]:
        with pytest.raises(ValueError, match=message):
            SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, **kwargs())
    with pytest.raises(ValueError, match="prompts="):
        model(tiny_teacher_dir, on_policy=OnPolicy(lmbda=1.0, prompts=str(tmp_path / "missing.jsonl"))).setup("fit")
    assert isinstance(model(tiny_teacher_dir, on_policy=OnPolicy(lmbda=0.1)).signal, StudentSamples)


def test_on_policy_under_ddp_two_processes_cpu(tiny_teacher_dir, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = Path(__file__).parents[1] / "modules" / "ddp_worker.py"
    kwargs = json.dumps({"on_policy": {"lmbda": 1.0, "loss": "sampled_token", **ON_POLICY}})
    result = subprocess.run([sys.executable, str(worker), tiny_teacher_dir, str(out), kwargs], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["global_step"] == 3 and report["ranks_agree"]
