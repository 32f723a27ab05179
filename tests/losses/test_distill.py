"""Tests of lightning_distill.losses.distill's chunked loss: chunked_distill_loss equals the dense distill_loss
(values and gradients of the hidden states and head weights) for chunk sizes that do and do not divide the number
of positions, with masking, through every teacher (logits, TeacherHidden, SparseTargets); on the fused path
(gradients in the forward pass, the default) and the checkpointed one, in float64 and bf16."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from lightning_distill import losses
from lightning_distill.losses import GeneralizedJSD, SparseTargets, TeacherHidden, distill, divergences, sparse

B, T, H, H_T, V = 3, 7, 8, 6, 13  # N = 21 positions
CHUNK_SIZES = [1, 4, 5, 21, 64]
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def divergence_of(name: str) -> losses.Divergence:
    """The divergence called ``name`` with its parameters in PARAMS."""
    return losses.get_divergence(name, **PARAMS.get(name, {}))


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


def is_fused(out: dict) -> bool:
    """Whether the loss came from the fused path (its graph node is the fused autograd function)."""
    return type(out["loss"].grad_fn).__name__.startswith("FusedHeadLoss")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("ce_weight", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_equals_unchunked(chunk_size, ce_weight, fused):
    hidden, head, teacher_logits, _, _, labels = make()
    kwargs = dict(divergence="forward_kl", ce_weight=ce_weight, temperature=2.0)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, chunk_size=chunk_size, fused=fused,
                                       **kwargs)
    assert is_fused(got) == fused
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("divergence", sorted(losses.DIVERGENCES))
def test_fused_equals_dense_float64(divergence, ce_weight, teacher):
    """Every divergence, T != 1, both teacher sources, a chunk size that does not divide N: same value and
    gradients (hidden, head weight and bias) as the dense loss on head(hidden), to float64 precision."""
    hidden, head, teacher_logits, teacher_hidden, teacher_head, labels = make(8)
    kwargs = dict(divergence=divergence_of(divergence), ce_weight=ce_weight, temperature=1.7)
    if teacher == "logits":
        source = teacher_logits
    else:
        source = TeacherHidden(teacher_hidden, teacher_head)
        teacher_logits = teacher_head(teacher_hidden)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, source, labels=labels, chunk_size=5, **kwargs)
    assert is_fused(got) and not got["kd"].requires_grad and not got["ce"].requires_grad
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_fused_sub_chunks(kind, monkeypatch):
    """On CPU the per-token part runs on sub-chunks of a chunk (here 2 rows of chunks of 5): same results."""
    monkeypatch.setattr(distill, "SUB_CHUNK_ELEMENTS", 2 * V)
    hidden, head, teacher_logits, teacher_hidden, teacher_head, labels = make(21)
    kwargs = dict(ce_weight=0.3, temperature=1.5, divergence=GeneralizedJSD(beta=0.3))
    if kind == "dense":
        want = losses.distill_loss(head(hidden), teacher_head(teacher_hidden), labels, **kwargs)
        got = losses.chunked_distill_loss(hidden, head, TeacherHidden(teacher_hidden, teacher_head), labels,
                                          chunk_size=5, **kwargs)
    else:
        targets = SparseTargets("topk", *sparse.topk_teacher(teacher_logits, 4, temperature=1.5), "bucket")
        want = losses.distill_loss(head(hidden), targets, labels, **kwargs)
        got = losses.chunked_distill_loss(hidden, head, targets, labels, chunk_size=5, **kwargs)
    assert is_fused(got)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("num_tokens", [30, torch.tensor(30), torch.tensor(11.0), 0])
def test_fused_num_tokens(num_tokens):
    """An external normalizer (a gradient-accumulation window) scales values and per-chunk gradients."""
    hidden, head, teacher_logits, _, _, labels = make(9)
    kwargs = dict(ce_weight=0.3, temperature=2.0, num_tokens=num_tokens)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, chunk_size=4, **kwargs)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_fused_all_masked_gives_zero_and_zero_grads(ce_weight):
    hidden, head, teacher_logits, _, _, labels = make(10)
    masked = torch.full_like(labels, losses.IGNORE_INDEX)
    out = losses.chunked_distill_loss(hidden, head, teacher_logits, masked, ce_weight=ce_weight, chunk_size=4)
    assert is_fused(out) and out["loss"].item() == out["kd"].item() == out["ce"].item() == 0.0
    out["loss"].backward()
    for x in (hidden, head.weight, head.bias):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_fused_scales_by_the_incoming_gradient():
    """Backward multiplies the stored gradients by grad_output (here 3) and adds to other paths' gradients."""
    hidden, head, teacher_logits, _, _, labels = make(11)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.3)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, ce_weight=0.3, chunk_size=4)
    inputs = [hidden, head.weight, head.bias]
    for g, w in zip(torch.autograd.grad(3 * got["loss"] + (hidden**2).sum(), inputs),
                    torch.autograd.grad(3 * want["loss"] + (hidden**2).sum(), inputs), strict=True):
        torch.testing.assert_close(g, w)


def test_fused_only_what_requires_grad():
    """A frozen head (hidden gets gradients) and a frozen body (only the head does)."""
    hidden, head, teacher_logits, _, _, labels = make(12)
    weight = head.weight.detach().clone()  # a bare (V, H) weight that does not require grad
    want = losses.distill_loss(hidden @ weight.T, teacher_logits, labels, ce_weight=0.5)
    got = losses.chunked_distill_loss(hidden, weight, teacher_logits, labels, ce_weight=0.5, chunk_size=4)
    assert_same(got, want, [hidden])
    frozen = hidden.detach()
    want = losses.distill_loss(head(frozen), teacher_logits, labels, ce_weight=0.5)
    got = losses.chunked_distill_loss(frozen, head, teacher_logits, labels, ce_weight=0.5, chunk_size=4)
    assert is_fused(got)
    assert_same(got, want, [head.weight, head.bias])


def test_tied_embedding_head():
    """An output layer sharing its weight with the input embedding: both uses add up in the embedding's grad."""
    _, _, teacher_logits, _, _, labels = make(13)
    embedding = nn.Embedding(V, H).double()
    head = nn.Linear(H, V, bias=False).double()
    head.weight = embedding.weight
    ids = torch.randint(0, V, (B, T))
    kwargs = dict(ce_weight=0.3, temperature=1.5, divergence=GeneralizedJSD(beta=0.4))
    want = losses.distill_loss(head(torch.tanh(embedding(ids))), teacher_logits, labels, **kwargs)
    got = losses.chunked_distill_loss(torch.tanh(embedding(ids)), head, teacher_logits, labels, chunk_size=5,
                                       **kwargs)
    assert is_fused(got)
    assert_same(got, want, [embedding.weight])


def assert_close_bf16(got: dict, want: dict, inputs: list[torch.Tensor]) -> None:
    """Loose equality for bf16: values to 2%, gradients (in the inputs' dtypes) to 3% of their norm."""
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], want[key], rtol=2e-2, atol=1e-3)
    for x, g, w in zip(inputs, torch.autograd.grad(got["loss"], inputs), torch.autograd.grad(want["loss"], inputs),
                       strict=True):
        assert g.dtype == w.dtype == x.dtype
        assert (g.double() - w.double()).norm() <= 3e-2 * w.double().norm(), (g, w)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
def test_fused_bf16_weights(divergence):
    """bf16 hidden states and head: softmax in float32, gradients in bf16, close to the dense loss."""
    hidden, head, teacher_logits, _, _, labels = make(14)
    hidden = hidden.detach().bfloat16().requires_grad_()
    head = head.bfloat16()
    kwargs = dict(divergence=divergence, ce_weight=0.3, temperature=2.0)
    want = losses.distill_loss(head(hidden), teacher_logits.bfloat16(), labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits.bfloat16(), labels, chunk_size=5, **kwargs)
    assert is_fused(got) and got["loss"].dtype == torch.float32
    assert_close_bf16(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_fused_bf16_autocast(teacher):
    """float32 parameters under bf16 autocast (bf16-mixed): bf16 logits and matmuls, float32 gradients."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(15)
    hidden, head, teacher_head = hidden.float().detach().requires_grad_(), head.float(), teacher_head.float()
    teacher_hidden = teacher_hidden.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher_logits = teacher_head(teacher_hidden)
        want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.4)
        source = teacher_logits if teacher == "logits" else TeacherHidden(teacher_hidden, teacher_head)
        got = losses.chunked_distill_loss(hidden, head, source, labels=labels, ce_weight=0.4, chunk_size=5)
    assert is_fused(got)
    assert_close_bf16(got, want, [hidden, head.weight, head.bias])


class ScaledLinear(nn.Linear):
    """An nn.Linear whose forward is not the stock one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", ["sequential", "subclass"])
def test_other_head_modules_fall_back_to_checkpointing(kind):
    hidden, head, teacher_logits, _, _, labels = make(16)
    head = nn.Sequential(head) if kind == "sequential" else ScaledLinear(H, V).double()
    want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.3)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, ce_weight=0.3, chunk_size=4)
    assert not is_fused(got)
    assert_same(got, want, [hidden, *head.parameters()])


@pytest.mark.parametrize(
    ("divergence", "params"),
    [("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.2}), ("tvd", {})],
)
def test_every_divergence(divergence, params):
    hidden, head, teacher_logits, _, _, labels = make(1)
    kwargs = dict(divergence=losses.get_divergence(divergence, **params), ce_weight=0.2, temperature=1.5,
                  num_tokens=30)
    want = losses.distill_loss(head(hidden), teacher_logits, labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, chunk_size=4, **kwargs)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_teacher_hidden_path(chunk_size):
    hidden, head, _, teacher_hidden, teacher_head, labels = make(2)
    weight = head.weight.detach().clone().requires_grad_(True)  # a bare (V, H) weight as the student head
    for teacher in (teacher_head, teacher_head.weight):  # module or (V, H_t) weight
        want = losses.distill_loss(hidden @ weight.T, teacher_head(teacher_hidden), labels, ce_weight=0.5)
        got = losses.chunked_distill_loss(hidden, weight, TeacherHidden(teacher_hidden, teacher), labels,
                                          ce_weight=0.5, chunk_size=chunk_size)
        assert_same(got, want, [hidden, weight])


def test_trained_teacher_gets_gradients():
    """Co-distillation: a teacher head that requires grad gets the same gradient as unchunked."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(3)
    teacher_head.requires_grad_(True)
    want = losses.distill_loss(head(hidden), teacher_head(teacher_hidden), labels, divergence="generalized_jsd")
    got = losses.chunked_distill_loss(hidden, head, TeacherHidden(teacher_hidden, teacher_head), labels,
                                      divergence="generalized_jsd", chunk_size=4)
    assert not is_fused(got)  # the fused path computes no teacher gradient: the checkpointed one does
    assert_same(got, want, [hidden, head.weight, teacher_head.weight])


def test_without_labels():
    """Pure distillation (ce_weight 0) needs no labels: every position counts."""
    hidden, head, teacher_logits, _, _, _ = make(7)
    want = losses.distill_loss(head(hidden), teacher_logits, None, divergence="tvd")
    got = losses.chunked_distill_loss(hidden, head, teacher_logits, None, divergence="tvd", chunk_size=5)
    assert_same(got, want, [hidden, head.weight, head.bias])


def test_all_masked_and_no_grad():
    hidden, head, teacher_logits, _, _, labels = make(4)
    masked = torch.full_like(labels, losses.IGNORE_INDEX)
    out = losses.chunked_distill_loss(hidden, head, teacher_logits, masked, ce_weight=0.5, chunk_size=4)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    with torch.no_grad():  # evaluation: no checkpointing, same values
        got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, ce_weight=0.5, chunk_size=4)
        want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.5)
    torch.testing.assert_close(got["loss"], want["loss"])


@pytest.mark.parametrize("fused", [True, False])
def test_no_chunk_logits_live_between_forward_and_backward(fused):
    """Structural check: no (C, V) tensor saved for backward during the forward is still alive after it (the
    fused path's local graphs are freed chunk by chunk; the checkpointed path saves only its inputs)."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(5)
    saved: list[weakref.ref] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = losses.chunked_distill_loss(hidden, head, TeacherHidden(teacher_hidden, teacher_head), labels,
                                          ce_weight=0.5, chunk_size=4, fused=fused)
    gc.collect()
    alive = [ref().shape for ref in saved if ref() is not None]
    assert not any(len(shape) == 2 and shape[-1] == V for shape in alive), alive
    out["loss"].backward()
    assert hidden.grad is not None and head.weight.grad is not None


@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize(("kind", "params"), [("topk", {"tail": "renorm"}), ("topk", {"tail": "bucket"}),
                                              ("sampled", {})])
def test_sparse_equals_unchunked(kind, params, chunk_size):
    hidden, head, teacher_logits, _, _, labels = make(6)
    if kind == "topk":
        ids, values = sparse.topk_teacher(teacher_logits, 5, temperature=2.0)
    else:
        ids, values = sparse.sample_teacher(teacher_logits, 8, temperature=2.0,
                                            generator=torch.Generator().manual_seed(0))
    logits = head(hidden)
    kd = sparse.SPARSE_LOSSES[kind](logits, ids, values, labels, temperature=2.0, **params)
    ce = losses.cross_entropy(logits, labels)
    want = {"loss": 0.7 * kd + 0.3 * ce, "kd": kd, "ce": ce}
    got = losses.chunked_distill_loss(hidden, head, SparseTargets(kind, ids, values, **params), labels,
                                      ce_weight=0.3, temperature=2.0, chunk_size=chunk_size)
    assert is_fused(got)
    assert_same(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
@pytest.mark.parametrize(("divergence", "tail"), [("forward_kl", "renorm"), ("reverse_kl", "bucket"),
                                                  ("generalized_jsd", "bucket")])
def test_sparse_targets_through_distill_loss(divergence, tail, ce_weight):
    """A SparseTargets where teacher logits go (as the modules pass it, with its tail), every mix weight."""
    hidden, head, teacher_logits, _, _, labels = make(17)
    targets = SparseTargets("topk", *sparse.topk_teacher(teacher_logits, 4, temperature=1.5), tail)
    kwargs = dict(divergence=divergence_of(divergence), ce_weight=ce_weight, temperature=1.5, num_tokens=25)
    want = losses.distill_loss(head(hidden), targets, labels, **kwargs)
    got = losses.chunked_distill_loss(hidden, head, targets, labels, chunk_size=5, **kwargs)
    assert is_fused(got)
    assert_same(got, want, [hidden, head.weight, head.bias])


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """``compiled=True``: the compiled chunk function is used; if it raises, a warning and the eager path."""
    hidden, head, teacher_logits, _, _, labels = make(18)
    calls = []

    def broken(*args):
        calls.append(args[-1])  # the compiled function is called with functional=True
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(distill, "_COMPILED", {"fn": broken})
    want = losses.distill_loss(head(hidden), teacher_logits, labels, ce_weight=0.3)
    with pytest.warns(UserWarning, match="torch.compile"):
        got = losses.chunked_distill_loss(hidden, head, teacher_logits, labels, ce_weight=0.3, chunk_size=5,
                                           compiled=True)
    assert calls == [True] and distill._COMPILED["failed"]
    assert_same(got, want, [hidden, head.weight, head.bias])


def test_functional_chunk_grad_equals_eager():
    """The ``torch.func`` form of the chunk gradient (the one ``torch.compile`` traces) equals the eager one."""
    _, _, teacher_logits, _, _, labels = make(19)
    logits = torch.randn(B * T, V, dtype=torch.float64)
    y = labels.reshape(-1)
    w = torch.tensor(0.1, dtype=torch.float64)

    def kd_fn(z, logp, t):
        return divergences.divergence_per_token(losses.get_divergence("skew_kl", alpha=0.3), z, t, 2.0,
                                                student_logp=logp)

    args = (logits, y, y != losses.IGNORE_INDEX, w, 2 * w, kd_fn, (teacher_logits.reshape(-1, V),), 0.3, 2.0)
    for got, want in zip(distill.chunk_grad(*args, True), distill.chunk_grad(*args), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_cuda_compiled_bf16_equals_dense(divergence):
    """On CUDA the fused path compiles its chunk function by default; bf16 autocast as in bf16-mixed training."""
    hidden, head, _, teacher_hidden, teacher_head, labels = make(20)
    hidden = hidden.float().cuda().detach().requires_grad_()
    head, teacher_head, teacher_hidden, labels = head.float().cuda(), teacher_head.float().cuda(), \
        teacher_hidden.float().cuda(), labels.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = losses.distill_loss(head(hidden), teacher_head(teacher_hidden), labels, divergence=divergence,
                                   ce_weight=0.5)
        got = losses.chunked_distill_loss(hidden, head, TeacherHidden(teacher_hidden, teacher_head), labels,
                                          divergence=divergence, ce_weight=0.5, chunk_size=8)
    assert is_fused(got) and not distill._COMPILED.get("failed")
    assert_close_bf16(got, want, [hidden, head.weight, head.bias])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"ce_weight": 1.5}, "ce_weight"),
        ({"teacher": None}, "teacher"),
        ({"labels": None, "ce_weight": 0.5}, "labels"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_value_errors_name_the_argument(kwargs, argument):
    hidden, head, teacher_logits, _, _, labels = make()
    call = {"teacher": teacher_logits, "labels": labels, **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument} must be "):
        losses.chunked_distill_loss(hidden, head, call.pop("teacher"), call.pop("labels"), **call)


def test_the_teacher_is_one_argument():
    """Teacher logits and teacher hidden states cannot both be given: the teacher is one argument (logits,
    TeacherHidden or SparseTargets), and the ``teacher_hidden=`` keyword that took hidden states beside it is
    refused."""
    hidden, head, teacher_logits, _, _, labels = make()
    with pytest.raises(TypeError, match="teacher_hidden"):
        losses.chunked_distill_loss(hidden, head, teacher_logits, labels, teacher_hidden=torch.zeros(B, T, H_T))
