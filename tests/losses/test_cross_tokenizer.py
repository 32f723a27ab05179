"""The cross-tokenizer losses against float64 references written the plain way: probabilities, GOLD's merge as a
product of scalars (as TRL's ``_merge_probabilities_with_alignment_groups``), full sorts padded with zeros, the
bucket as ``1 - sum``, one span at a time."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.losses import (
    GOLD,
    IGNORE_INDEX,
    ULD,
    AlignedTeacher,
    ForwardKL,
    cross_tokenizer_loss,
    get_cross_tokenizer_loss,
    uld_distance,
)
from lightning_distill.losses.cross_tokenizer import merged_log_probs

B, T, U, V_S, V_T = 2, 7, 6, 7, 10
# (block, s0, s1, t0, t1): one-to-one spans, a student merge (s 3..5 <-> t 3), a teacher merge (s 5 <-> t 4..6),
# a merge on both sides (block 1: s 1..3 <-> t 1..4)
SPANS = [(0, 1, 2, 1, 2), (0, 2, 3, 2, 3), (0, 3, 5, 3, 4), (0, 5, 6, 4, 6), (1, 1, 3, 1, 4), (1, 3, 4, 4, 5)]
SHARED = [(0, 0), (2, 1), (5, 3), (8, 6), (9, 2)]  # (teacher id, student id)


def batch(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T - 1, V_S, generator=g, dtype=torch.float64).to(dtype)
    teacher = (2 * torch.randn(B, U, V_T, generator=g, dtype=torch.float64)).to(dtype)
    input_ids = torch.randint(0, V_S, (B, T), generator=g)
    teacher_ids = torch.randint(0, V_T, (B, U), generator=g)
    aligned = AlignedTeacher(teacher, teacher_ids, torch.tensor(SPANS), torch.tensor(SHARED))
    return student, input_ids, aligned


def merged_reference(logits: torch.Tensor, ids: torch.Tensor, b: int, start: int, stop: int,
                     temperature: float) -> torch.Tensor:
    """GOLD's merge in probability space: p(. | < start) * prod_j p(ids[j] | < j); row p of ``logits`` predicts
    token p + 1 of ``ids``."""
    probs = torch.softmax(logits.double() / temperature, -1)  # (B, N, V): row p predicts token p + 1
    merged = probs[b, start - 1].clone()
    for j in range(start + 1, stop):
        merged = merged * probs[b, j - 1, ids[b, j]]
    return merged


def uld_reference(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    size = max(len(p), len(q))
    pad = lambda x: torch.cat([x.sort(descending=True).values, x.new_zeros(size - len(x))])  # noqa: E731
    return (pad(p) - pad(q)).abs().sum()


def gold_reference(p_s: torch.Tensor, p_t: torch.Tensor, shared: list[tuple[int, int]], temperature: float,
                   matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> torch.Tensor:
    t_ids, s_ids = [t for t, _ in shared], [s for _, s in shared]
    P = torch.cat([p_t[t_ids], (1 - p_t[t_ids].sum()).reshape(1)])
    Q = torch.cat([p_s[s_ids], (1 - p_s[s_ids].sum()).reshape(1)])
    kl = (P * (P.log() - Q.log())).sum() * temperature**2
    t_rest = [v for v in range(len(p_t)) if v not in t_ids]
    s_rest = [v for v in range(len(p_s)) if v not in s_ids]
    return matched_weight * kl + unmatched_weight * uld_reference(p_s[s_rest], p_t[t_rest])


def loss_reference(loss, student, input_ids, aligned, labels, temperature):
    values = []
    for b, s0, s1, t0, t1 in SPANS:
        if labels is not None and labels[b, s0] == IGNORE_INDEX:
            continue
        p_s = merged_reference(student, input_ids, b, s0, s1, temperature)
        p_t = merged_reference(aligned.logits[:, :-1], aligned.teacher_ids, b, t0, t1, temperature)
        if isinstance(loss, ULD):
            values.append(uld_reference(p_s, p_t))
        else:
            values.append(gold_reference(p_s, p_t, SHARED, temperature, loss.matched_weight, loss.unmatched_weight))
    return torch.stack(values).mean()


def test_uld_distance_is_the_sorted_l1_with_zero_padding():
    g = torch.Generator().manual_seed(1)
    for sizes in ((5, 9), (9, 5), (6, 6)):
        p = torch.rand(4, sizes[0], generator=g, dtype=torch.float64)
        q = torch.rand(4, sizes[1], generator=g, dtype=torch.float64) * 0.3  # unnormalized, as merged spans are
        want = torch.stack([uld_reference(p[i], q[i]) for i in range(4)])
        torch.testing.assert_close(uld_distance(p, q), want, rtol=1e-12, atol=1e-12)
    assert uld_distance(p, p).abs().max() < 1e-12


def test_merge_is_golds_product_of_conditionals():
    student, input_ids, _ = batch()
    block, start, stop = (torch.tensor(x) for x in zip(*[(b, s0, s1) for b, s0, s1, _, _ in SPANS], strict=True))
    log_p, log_scale = merged_log_probs(student, input_ids[:, 1:], block, start, stop, temperature=1.5)
    for g, (b, s0, s1, _, _) in enumerate(SPANS):
        want = merged_reference(student, input_ids, b, s0, s1, 1.5)
        torch.testing.assert_close((log_p[g] + log_scale[g]).exp(), want, rtol=1e-12, atol=1e-14)
    assert log_scale[0] == 0 and log_scale[2] < 0  # one token: no scale; a student merge: the later token's prob


@pytest.mark.parametrize("loss", [ULD(), GOLD(), GOLD(matched_weight=0.3, unmatched_weight=2.0)], ids=repr)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_match_float64_references(loss, temperature):
    student, input_ids, aligned = batch()
    labels = input_ids.clone()
    labels[1, 1] = IGNORE_INDEX  # block 1's first span is not learned
    got = loss(student, input_ids, aligned, labels, temperature=temperature)
    want = loss_reference(loss, student, input_ids, aligned, labels, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [ULD(), GOLD()], ids=repr)
def test_gradients_match_the_reference(loss):
    student, input_ids, aligned = batch(seed=3)
    mine, theirs = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss(mine, input_ids, aligned, None, temperature=1.0).backward()
    loss_reference(loss, theirs, input_ids, aligned, None, 1.0).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", [ULD(), GOLD()], ids=repr)
def test_float32_and_bfloat16_logits_give_the_float64_value_closely(loss):
    student, input_ids, aligned = batch(seed=5)
    want = loss(student, input_ids, aligned)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        low = AlignedTeacher(aligned.logits.to(dtype), aligned.teacher_ids, aligned.spans, aligned.shared)
        got = loss(student.to(dtype), input_ids, low)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_gold_on_one_tokenizer_is_the_forward_kl():
    """Same vocabulary, every token shared, every span one token: the bucket is empty, ULD has nothing left, and GOLD
    is the forward KL of each position."""
    g = torch.Generator().manual_seed(7)
    student = torch.randn(B, T - 1, V_S, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V_S, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V_S, (B, T), generator=g)
    spans = torch.tensor([(b, t, t + 1, t, t + 1) for b in range(B) for t in range(1, T)])
    aligned = AlignedTeacher(teacher, ids, spans, torch.arange(V_S).repeat(2, 1).T)
    want = ForwardKL()(student, teacher[:, :-1], temperature=2.0)
    torch.testing.assert_close(GOLD()(student, ids, aligned, temperature=2.0), want, rtol=1e-10, atol=1e-12)
    same = torch.cat([student, torch.zeros(B, 1, V_S, dtype=torch.float64)], dim=1)  # the student as its teacher
    assert ULD()(student, ids, AlignedTeacher(same, ids, spans, aligned.shared)) < 1e-12


def test_no_valid_span_is_zero_on_the_graph_and_ce_only_skips_the_teacher():
    student, input_ids, aligned = batch()
    student.requires_grad_()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    zero = GOLD()(student, input_ids, aligned, labels)
    assert zero == 0 and zero.requires_grad
    parts = cross_tokenizer_loss(student, input_ids, None, input_ids, loss=ULD(), ce_weight=1.0)
    assert parts["kd"] == 0 and torch.equal(parts["loss"], parts["ce"])
    mixed = cross_tokenizer_loss(student, input_ids, aligned, input_ids, loss=ULD(), ce_weight=0.25)
    torch.testing.assert_close(mixed["loss"], 0.75 * mixed["kd"] + 0.25 * mixed["ce"])


def test_names_and_bad_parameters():
    assert isinstance(get_cross_tokenizer_loss("gold"), GOLD) and isinstance(get_cross_tokenizer_loss("uld"), ULD)
    with pytest.raises(ValueError, match=r"loss must be a CrossTokenizerLoss or one of \['gold', 'uld'\], got 'kl'"):
        get_cross_tokenizer_loss("kl")
    with pytest.raises(ValueError, match=r"matched_weight must be a number >= 0, got -1"):
        GOLD(matched_weight=-1)
    assert GOLD(0.5) == GOLD(matched_weight=0.5) != GOLD()
