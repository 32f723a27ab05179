"""Tests of lightning_distill.losses.sparse: the teacher kept on a few ids per position. Top-k targets (with the
full vocabulary they equal the dense forward KL; the two tails; gradcheck), the samplers (top-k log-probs, sampled
draws merged into weights), the sampled-KL estimate (unbiased gradient, gradcheck, padding) and the errors that
name the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import random_logits as make

from lightning_distill import losses
from lightning_distill.losses import sparse

N, V = 6, 11


# ------------------------------------------------------------------------------------------ top-k targets
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_with_full_vocabulary_equals_forward_kl(tail, temperature):
    student, teacher, labels = make(shape=(2, 3, V))
    ids, logprobs = sparse.topk_teacher(teacher, V, temperature=temperature)
    got = sparse.topk_forward_kl(student, ids, logprobs, labels, temperature=temperature, tail=tail)
    torch.testing.assert_close(got, losses.ForwardKL()(student, teacher, labels, temperature=temperature))


def test_topk_partial_vocabulary():
    student, teacher, labels = make()
    ids, logprobs = sparse.topk_teacher(teacher, 4)
    renorm = sparse.topk_forward_kl(student, ids, logprobs, labels, tail="renorm")
    bucket = sparse.topk_forward_kl(student, ids, logprobs, labels, tail="bucket")
    dense = losses.ForwardKL()(student, teacher, labels)
    assert torch.isfinite(renorm) and torch.isfinite(bucket) and not torch.isclose(renorm, bucket)
    assert renorm >= 0 and 0 <= bucket <= dense + 1e-6  # coarse-graining never increases KL
    same_ids, same_logprobs = sparse.topk_teacher(student, 4)  # student == teacher: the bucketed KL is 0
    assert sparse.topk_forward_kl(student, same_ids, same_logprobs, tail="bucket").item() == pytest.approx(
        0, abs=1e-6)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_gradcheck(tail):
    student, teacher, labels = make(dtype=torch.float64)
    ids, logprobs = sparse.topk_teacher(teacher, 4, temperature=2.0)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: sparse.topk_forward_kl(s, ids, logprobs, labels, temperature=2.0, tail=tail), (student,))


def test_topk_teacher():
    _, teacher, _ = make(shape=(2, 3, V))
    ids, logprobs = sparse.topk_teacher(teacher, 5, temperature=2.0)
    assert ids.shape == logprobs.shape == (2, 3, 5) and ids.dtype == torch.long
    torch.testing.assert_close(logprobs, torch.log_softmax(teacher / 2, -1).gather(-1, ids))
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()


# ---------------------------------------------------------------------------------------- sampled targets
def test_sample_teacher_merges_duplicates():
    _, teacher, _ = make(shape=(2, 3, V))
    ids, weights = sparse.sample_teacher(teacher, 16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == weights.shape == (2, 3, 16) and ids.dtype == torch.long
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    for row_ids, row_w in zip(ids.reshape(-1, 16), weights.reshape(-1, 16), strict=True):
        kept = row_ids[row_w > 0]
        assert len(set(kept.tolist())) == len(kept)  # unique ids
        assert torch.all((row_w * 16).round() == row_w * 16)  # counts / S
    again = sparse.sample_teacher(teacher, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids) and torch.equal(again[1], weights)
    # Many draws: the empirical distribution approaches the tempered teacher.
    ids, weights = sparse.sample_teacher(teacher[0, 0], 20000, temperature=2.0,
                                         generator=torch.Generator().manual_seed(1))
    empirical = torch.zeros(V).scatter_add_(0, ids, weights)
    torch.testing.assert_close(empirical, torch.softmax(teacher[0, 0] / 2, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kl_gradient_is_unbiased(temperature):
    student, teacher, _ = make(dtype=torch.float64)
    student = student[:3].requires_grad_(True)
    teacher = teacher[:3]
    draws, samples = 2000, 8
    ids, weights = sparse.sample_teacher(teacher.expand(draws, 3, V), samples, temperature=temperature,
                                         generator=torch.Generator().manual_seed(0))  # (D, 3, S)
    # Mean over draws of each draw's loss (itself a mean over 3 tokens).
    sampled = sparse.sampled_kl(student.expand(draws, 3, V), ids, weights, temperature=temperature,
                                num_tokens=draws * 3)
    dense = losses.ForwardKL()(student, teacher, temperature=temperature)
    (sampled_grad,) = torch.autograd.grad(sampled, student)
    (dense_grad,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(sampled_grad, dense_grad, atol=0.015, rtol=0)
    # The value estimates the cross-entropy: forward KL plus the teacher's entropy (times T^2).
    p_t = torch.softmax(teacher / temperature, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean() * temperature**2
    assert sampled.item() == pytest.approx((dense + entropy).item(), abs=0.05 * temperature**2)


def test_sampled_kl_gradcheck_and_padding():
    student, teacher, labels = make(dtype=torch.float64)
    ids, weights = sparse.sample_teacher(teacher, 6, generator=torch.Generator().manual_seed(0))
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: sparse.sampled_kl(s, ids, weights, labels), (student,))
    moved = ids.masked_fill(weights == 0, V - 1)  # padding slots may hold any id
    torch.testing.assert_close(sparse.sampled_kl(student, moved, weights), sparse.sampled_kl(student, ids, weights))


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda s, t: sparse.topk_teacher(t, V + 1), "k"),
        (lambda s, t: sparse.sample_teacher(t, 0), "num_samples"),
        (lambda s, t: sparse.topk_forward_kl(s, *sparse.topk_teacher(t, 3), tail="drop"), "tail"),
        (lambda s, t: sparse.sparse_per_token("dense", s, *sparse.topk_teacher(t, 3)), "kind"),
        (lambda s, t: sparse.sampled_kl(s, *sparse.sample_teacher(t[:3], 4)), "target_ids"),
    ],
)
def test_value_errors_name_the_argument(call, argument):
    student, teacher, _ = make()
    with pytest.raises(ValueError, match=rf"^{argument} must be "):
        call(student, teacher)
