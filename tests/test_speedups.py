"""Compiled and Liger-patched models (:mod:`lightning_distill.speedups`) on tiny random models, on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import TINY_STUDENT

from lightning_distill import CoDistill, Features, Performance, SoftDistill, speedups


def test_defaults_compile_nothing(tiny_teacher_dir):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    model.configure_model()
    assert not speedups.is_compiled(model.student) and not speedups.is_compiled(model.teacher)


def test_compiling_is_in_place_and_idempotent(tiny_teacher_dir):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT,
                        performance=Performance(compile_student=True, compile_teacher=True))
    model.configure_model()
    assert speedups.is_compiled(model.student) and speedups.is_compiled(model.teacher)
    names = sorted(model.student.state_dict())
    compiled = model.student.get_decoder()._compiled_call_impl
    model.configure_model()  # again: nothing rebuilt, nothing recompiled
    speedups.compile_decoder(model.student)
    assert model.student.get_decoder()._compiled_call_impl is compiled
    assert not any("_orig_mod" in name for name in names)  # checkpoints and exports keep the plain names


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"compile_student": "yes"}, r"performance.compile_student must be True or False, got 'yes'"),
    ({"compile_teacher": 1}, r"performance.compile_teacher must be True or False, got 1"),
    ({"liger_kernels": None}, r"performance.liger_kernels must be True or False, got None"),
])
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Performance(**kwargs)


def test_a_trained_teacher_is_not_compiled(tiny_teacher_dir):
    with pytest.raises(ValueError, match="compile_teacher=True compiles a frozen teacher"):
        CoDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, performance=Performance(compile_teacher=True))


def test_the_feature_term_is_not_compiled(tiny_teacher_dir):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, features=Features(weight=1.0),
                        performance=Performance(compile_student=True))
    with pytest.raises(ValueError, match="set features=None, or compile_student=False"):
        model.configure_model()


def test_liger_kernels_need_cuda_then_the_package(tiny_teacher_dir, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="liger_kernels=True needs a CUDA device"):
            SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, performance=Performance(liger_kernels=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name))
    with pytest.raises(ImportError, match=r"needs the liger-kernel package: pip install 'lightning-distill\[bench\]'"):
        speedups.check(Performance(liger_kernels=True), trains_teacher=False)  # what every method's __init__ runs


def test_liger_kernels_patch_llama_models_only():
    class NotLlama(torch.nn.Module):
        config = type("Config", (), {"model_type": "gpt2"})()

    with pytest.raises(ValueError, match="liger_kernels=True patches Llama models, but the student is 'gpt2'"):
        speedups.liger_llama(NotLlama(), "student")


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_a_compiled_student_gives_the_same_loss_and_gradients(tiny_teacher_dir, chunk_size):
    """About 35 s on 2 busy CPU cores for the first case (the compilation), well under a second for the second."""
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 24))
    results = []
    for compiled in (False, True):
        performance = Performance(chunk_size=chunk_size, compile_student=compiled, compile_teacher=compiled)
        model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=0.3, performance=performance)
        model.configure_model()
        parts = model.student_loss(ids, ids, model.signal.distribution(model.run, {"input_ids": ids}), ce_weight=0.3)
        parts["loss"].backward()
        results.append((parts, model.student.model.embed_tokens.weight.grad.clone()))
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(results[1][0][key], results[0][0][key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-3)
