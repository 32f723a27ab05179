"""Tests of lightning_distill.chunked: the chunked losses equal the unchunked ones (values and gradients of the
hidden states and head weights) for chunk sizes that do and do not divide the number of positions, with
masking, through both teacher paths (logits, hidden states + head) and for sparse targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill import chunked, losses

B, T, H, H_T, V = 3, 7, 8, 6, 13  # N = 21 positions
CHUNK_SIZES = [1, 4, 5, 21, 64]


def make(seed: int = 0):
    """Student hidden states and head, teacher logits / hidden states / frozen head, labels with masking."""
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(H, V).double()
    teacher_hidden = torch.randn(B, T, H_T, dtype=torch.float64)
    teacher_head = nn.Linear(H_T, V, bias=False).double().requires_grad_(False)
    teacher_logits = 2 * teacher_head(teacher_hidden)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = losses.IGNORE_INDEX
    labels[2, -1] = losses.IGNORE_INDEX
    return hidden, head, teacher_logits, teacher_hidden, teacher_head, labels


def assert_same(got: dict, want: dict, inputs: list[torch.Tensor]) -> None:
    """Equal loss parts and equal gradients of ``loss`` w.r.t. ``inputs``."""
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], want[key])
    for g, w in zip(torch.autograd.grad(got["loss"], inputs), torch.autograd.grad(want["loss"], inputs),
                    strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("ce_weight", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_equals_unchunked(chunk_size, ce_weight):
    hidden, head, teacher_logits, _, _, labels = make()
    kwargs = dict(divergence="forward_kl", ce_weight=ce_weight, temperature=2.0)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = chunked.chunked_distill_loss(hidden, head, teacher_logits, labels, chunk_size=chunk_size, **kwargs)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize(
    ("divergence", "params"),
    [("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.2}), ("tvd", {})],
)
def test_every_divergence(divergence, params):
    hidden, head, teacher_logits, _, _, labels = make(1)
    kwargs = dict(divergence=divergence, ce_weight=0.2, temperature=1.5, num_tokens=30, **params)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = chunked.chunked_distill_loss(hidden, head, teacher_logits, labels, chunk_size=4, **kwargs)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_teacher_hidden_path(chunk_size):
    hidden, head, _, teacher_hidden, teacher_head, labels = make(2)
    weight = head.weight.detach().clone().requires_grad_(True)  # a bare (V, H) weight as the student head
    for teacher in (teacher_head, teacher_head.weight):  # module or (V, H_t) weight
        want = losses.distill_loss(hidden @ weight.T, teacher_head(teacher_hidden), labels, ce_weight=0.5)
        got = chunked.chunked_distill_loss(hidden, weight, None, labels, ce_weight=0.5, chunk_size=chunk_size,
                                           teacher_hidden=teacher_hidden, teacher_head=teacher)
        assert_same(got, want, [hidden, weight])


def test_trained_teacher_gets_gradients():
    """Co-distillation: a teacher head that requires grad gets the same gradient as unchunked."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(3)
    teacher_head.requires_grad_(True)
    want = losses.distill_loss(head(hidden), teacher_head(teacher_hidden), labels, divergence="generalized_jsd")
    got = chunked.chunked_distill_loss(hidden, head, None, labels, divergence="generalized_jsd", chunk_size=4,
                                       teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    assert_same(got, want, [hidden, head.weight, teacher_head.weight])


def test_without_labels():
    """Pure distillation (ce_weight 0) needs no labels: every position counts."""
    hidden, head, teacher_logits, _, _, _ = make(7)
    want = losses.distill_loss(head(hidden), teacher_logits, None, divergence="tvd")
    got = chunked.chunked_distill_loss(hidden, head, teacher_logits, None, divergence="tvd", chunk_size=5)
    assert_same(got, want, [hidden, head.weight, head.bias])


def test_all_masked_and_no_grad():
    hidden, head, teacher_logits, _, _, labels = make(4)
    masked = torch.full_like(labels, losses.IGNORE_INDEX)
    out = chunked.chunked_distill_loss(hidden, head, teacher_logits, masked, ce_weight=0.5, chunk_size=4)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    with torch.no_grad():  # evaluation: no checkpointing, same values
        got = chunked.chunked_distill_loss(hidden, head, teacher_logits, labels, ce_weight=0.5, chunk_size=4)
        want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.5)
    torch.testing.assert_close(got["loss"], want["loss"])


def test_chunk_logits_are_not_saved_for_backward():
    """Structural check of the checkpointing: no (C, V) tensor is kept between forward and backward."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(5)
    saved: list[torch.Size] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.shape)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = chunked.chunked_distill_loss(hidden, head, None, labels, ce_weight=0.5, chunk_size=4,
                                           teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    assert not any(len(shape) == 2 and shape[-1] == V for shape in saved), saved
    out["loss"].backward()
    assert hidden.grad is not None and head.weight.grad is not None


@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize(("kind", "params"), [("topk", {"tail": "renorm"}), ("topk", {"tail": "bucket"}),
                                              ("sampled", {})])
def test_sparse_equals_unchunked(kind, params, chunk_size):
    hidden, head, teacher_logits, _, _, labels = make(6)
    if kind == "topk":
        ids, values = losses.topk_teacher(teacher_logits, 5, temperature=2.0)
    else:
        ids, values = losses.sample_teacher(teacher_logits, 8, temperature=2.0,
                                            generator=torch.Generator().manual_seed(0))
    logits = head(hidden)
    kd = losses.SPARSE_LOSSES[kind](logits, ids, values, labels, temperature=2.0, **params)
    ce = losses.cross_entropy(logits, labels)
    want = {"loss": 0.7 * kd + 0.3 * ce, "kd": kd, "ce": ce}
    got = chunked.chunked_sparse_loss(hidden, head, ids, values, labels, kind=kind, ce_weight=0.3,
                                      temperature=2.0, chunk_size=chunk_size, **params)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"ce_weight": 1.5}, "ce_weight"),
        ({"teacher_logits": None}, "teacher_logits"),
        ({"labels": None, "ce_weight": 0.5}, "labels"),
        ({"teacher_hidden": torch.zeros(B, T, H_T)}, "teacher_hidden"),
    ],
)
def test_value_errors_name_the_argument(kwargs, argument):
    hidden, head, teacher_logits, _, _, labels = make()
    call = {"teacher_logits": teacher_logits, "labels": labels, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        chunked.chunked_distill_loss(hidden, head, call.pop("teacher_logits"), call.pop("labels"), **call)
