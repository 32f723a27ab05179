"""Tests of lightning_distill.losses.divergences and the dense distill_loss: each divergence against an independent
float64 reference written from its formula, property tests (zero on identical inputs, JSD symmetry and endpoints,
temperature), gradients (gradcheck), masking and normalization, dtypes, cross-entropy, the KD + CE mix, the
registry of divergences and the errors that name the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_logits as make

from lightning_distill import losses
from lightning_distill.losses import divergences, sparse

N, V = 6, 11
CASES = [  # (name, params) covering every divergence, the JSD and skew endpoints included
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("tvd", {}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items())}" for name, params in CASES]


# ------------------------------------------------------------------------- independent float64 reference
def softmax64(row: torch.Tensor, temperature: float) -> list[float]:
    z = [float(x) / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    return [x / sum(e) for x in e]


def kl64(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def mix64(w: float, a: list[float], b: list[float]) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def reference_token(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, params: dict) -> float:
    ps, pt = softmax64(s, temperature), softmax64(t, temperature)
    if name == "forward_kl":
        d = kl64(pt, ps)
    elif name == "reverse_kl":
        d = kl64(ps, pt)
    elif name == "generalized_jsd":
        beta = params["beta"]
        if beta in (0.0, 1.0):  # endpoints by convention (TRL): the plain KLs
            d = kl64(pt, ps) if beta == 0 else kl64(ps, pt)
        else:
            m = mix64(beta, pt, ps)
            d = beta * kl64(pt, m) + (1 - beta) * kl64(ps, m)
    elif name == "skew_kl":
        d = kl64(pt, mix64(params["alpha"], pt, ps))
    elif name == "skew_reverse_kl":
        d = kl64(ps, mix64(1 - params["alpha"], pt, ps))
    else:
        d = 0.5 * sum(abs(a - b) for a, b in zip(pt, ps, strict=True))
    return d * temperature**2


def reference_loss(name, student, teacher, labels, temperature=1.0, params=None, num_tokens=None) -> float:
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    keep = [i for i in range(s.shape[0]) if labels is None or int(labels.reshape(-1)[i]) != -100]
    total = sum(reference_token(name, s[i], t[i], temperature, params or {}) for i in keep)
    return total / (num_tokens if num_tokens is not None else max(len(keep), 1))


# ------------------------------------------------------------------------------------------ dense losses
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_matches_float64_reference(name, params, temperature):
    student, teacher, labels = make()
    got = losses.get_divergence(name, **params)(student, teacher, labels, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    want = reference_loss(name, student, teacher, labels, temperature, params)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_identical_inputs_give_zero(name, params):
    student, _, labels = make()
    divergence = losses.get_divergence(name, **params)
    assert divergence(student, student.clone(), labels).item() == pytest.approx(0, abs=1e-6)


def test_jsd_is_symmetric_at_half():
    student, teacher, labels = make()
    forward = losses.GeneralizedJSD(beta=0.5)(student, teacher, labels)
    swapped = losses.GeneralizedJSD(beta=0.5)(teacher, student, labels)
    torch.testing.assert_close(forward, swapped)


def test_jsd_endpoints_are_the_kls():
    student, teacher, labels = make()
    forward_kl, reverse_kl = losses.ForwardKL(), losses.ReverseKL()
    assert losses.GeneralizedJSD(beta=0.0)(student, teacher, labels) == forward_kl(student, teacher, labels)
    assert losses.GeneralizedJSD(beta=1.0)(student, teacher, labels) == reverse_kl(student, teacher, labels)
    assert losses.SkewKL(alpha=0.0)(student, teacher, labels) == forward_kl(student, teacher, labels)
    assert losses.SkewReverseKL(alpha=0.0)(student, teacher, labels) == reverse_kl(student, teacher, labels)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_temperature_divides_logits_and_scales_by_its_square(name, params):
    student, teacher, labels = make()
    fn = losses.get_divergence(name, **params)
    hot = fn(student, teacher, labels, temperature=2.0)
    torch.testing.assert_close(hot, 4 * fn(student / 2, teacher / 2, labels))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_gradcheck_float64(name, params):
    student, teacher, labels = make(dtype=torch.float64)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    fn = losses.get_divergence(name, **params)
    assert fn(student, teacher, labels).dtype == torch.float64  # the upcast keeps float64
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t, labels, temperature=1.5), (student, teacher))


def test_masked_positions_do_not_count():
    student, teacher, labels = make()
    changed = student.clone()
    changed[[1, 4]] = 100 * torch.randn(2, V)  # the masked rows
    for name in losses.DIVERGENCES:
        fn = losses.get_divergence(name)
        torch.testing.assert_close(fn(student, teacher, labels), fn(changed, teacher, labels))
    kept = labels != -100
    torch.testing.assert_close(losses.ForwardKL()(student, teacher, labels),
                               losses.ForwardKL()(student[kept], teacher[kept]))


@pytest.mark.parametrize("name", list(losses.DIVERGENCES))
def test_all_masked_gives_zero_and_backward_works(name):
    student, teacher, _ = make()
    student.requires_grad_(True)
    labels = torch.full((N,), -100)
    loss = losses.get_divergence(name)(student, teacher, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert losses.cross_entropy(student, labels).item() == 0.0


def test_num_tokens_normalization():
    student, teacher, labels = make()
    forward_kl = losses.ForwardKL()
    mean = forward_kl(student, teacher, labels)
    valid = int((labels != -100).sum())
    for num_tokens in (20, torch.tensor(20)):
        got = forward_kl(student, teacher, labels, num_tokens=num_tokens)
        torch.testing.assert_close(got, mean * valid / 20)
    assert forward_kl(student, teacher, torch.full((N,), -100), num_tokens=0).item() == 0.0
    expected = reference_loss("tvd", student, teacher, labels, num_tokens=20)
    assert losses.TVD()(student, teacher, labels, num_tokens=20).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_bf16_inputs_are_computed_in_float32(name, params):
    student, teacher, labels = make(dtype=torch.bfloat16)
    fn = losses.get_divergence(name, **params)
    got = fn(student, teacher, labels, temperature=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(student.float(), teacher.float(), labels, temperature=2.0))
    want = reference_loss(name, student, teacher, labels, 2.0, params)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_batched_shape_equals_flat():
    student, teacher, labels = make(shape=(2, 3, V))
    for name in losses.DIVERGENCES:
        fn = losses.get_divergence(name)
        flat = fn(student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1), temperature=2.0)
        torch.testing.assert_close(fn(student, teacher, labels, temperature=2.0), flat)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_one_hot_and_minus_inf_teacher_give_no_nan(name):
    student, teacher, labels = make()
    teacher[0] = -math.inf  # one-hot row
    teacher[0, 3] = 0.0
    teacher[2, :5] = -math.inf  # a row with some impossible tokens
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = losses.get_divergence(name)(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    if name == "forward_kl":  # KL to a one-hot target is the cross-entropy of that token
        one_hot = losses.ForwardKL()(student[:1], teacher[:1])
        torch.testing.assert_close(one_hot, losses.cross_entropy(student[:1], torch.tensor([3])))


def test_cross_entropy_matches_torch():
    student, _, labels = make()
    torch.testing.assert_close(losses.cross_entropy(student, labels), F.cross_entropy(student, labels))
    valid = int((labels != -100).sum())
    torch.testing.assert_close(losses.cross_entropy(student, labels, num_tokens=10),
                               F.cross_entropy(student, labels) * valid / 10)


def test_distill_loss_mixes_terms():
    student, teacher, labels = make()
    kd = losses.GeneralizedJSD(beta=0.3)(student, teacher, labels, temperature=2.0)
    ce = losses.cross_entropy(student, labels)
    out = losses.distill_loss(student, teacher, labels, divergence=losses.GeneralizedJSD(beta=0.3), ce_weight=0.25,
                              temperature=2.0)
    torch.testing.assert_close(out["kd"], kd)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], 0.75 * kd + 0.25 * ce)
    pure = losses.distill_loss(student, teacher, None)  # ce_weight 0: CE skipped, labels not needed
    assert pure["ce"].item() == 0.0 and torch.equal(pure["loss"], losses.ForwardKL()(student, teacher))
    fine_tune = losses.distill_loss(student, None, labels, ce_weight=1.0)  # teacher unused
    assert fine_tune["kd"].item() == 0.0 and torch.equal(fine_tune["loss"], ce)


def test_registries():
    assert {name for name, _ in CASES} == set(losses.DIVERGENCES)  # every divergence has a case above
    assert set(sparse.SPARSE_LOSSES) == {"topk", "sampled"} < set(sparse.SPARSE_DIVERGENCES)
    # a name gives its class' object (the one way from a name: get_divergence), its parameters passed on
    assert losses.get_divergence("tvd") == losses.TVD() and type(losses.get_divergence("tvd")) is losses.TVD
    assert losses.get_divergence("generalized_jsd", beta=0.3) == losses.GeneralizedJSD(beta=0.3)
    assert losses.get_divergence("skew_kl", alpha=0.2) == losses.SkewKL(alpha=0.2)
    with pytest.raises(TypeError, match="beta"):  # a parameter that is not its own is refused, not ignored
        losses.get_divergence("skew_kl", beta=0.9, alpha=0.2)


def test_a_new_divergence_is_one_class():
    """Subclassing registers it by name: the losses, the chunked loss and the modules take it."""

    class SquaredHellinger(losses.Divergence):
        name = "test_squared_hellinger"

        def per_token(self, student_logp, teacher_logp):
            return 0.5 * ((0.5 * student_logp).exp() - (0.5 * teacher_logp).exp()).pow(2).sum(-1)

    try:
        student, teacher, labels = make()
        got = losses.get_divergence("test_squared_hellinger")(student, teacher, labels)
        want = losses.distill_loss(student, teacher, labels, divergence=SquaredHellinger())["kd"]
        torch.testing.assert_close(got, want)
        assert got > 0 and losses.get_divergence("test_squared_hellinger")(student, student, labels) == 0
    finally:
        del losses.DIVERGENCES["test_squared_hellinger"]


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda s, t: losses.ForwardKL()(s, t, temperature=0.0), "temperature"),
        (lambda s, t: losses.GeneralizedJSD(beta=1.5)(s, t), "beta"),
        (lambda s, t: losses.SkewKL(alpha=-0.1)(s, t), "alpha"),
        (lambda s, t: losses.SkewReverseKL(alpha=2.0)(s, t), "alpha"),
        (lambda s, t: losses.get_divergence("kl"), "loss"),
        (lambda s, t: divergences.divergence_per_token(losses.get_divergence("jsd"), s, t), "loss"),
        (lambda s, t: losses.ForwardKL()(s, t[:, :5]), "teacher_logits"),
        (lambda s, t: losses.ForwardKL()(s, t, torch.zeros(3, dtype=torch.long)), "labels"),
        (lambda s, t: losses.ForwardKL()(s, t, num_tokens=-1), "num_tokens"),
        (lambda s, t: losses.distill_loss(s, t, None, ce_weight=1.5), "ce_weight"),
        (lambda s, t: losses.distill_loss(s, None, None), "teacher"),
        (lambda s, t: losses.distill_loss(s, t, None, ce_weight=0.5), "labels"),
    ],
)
def test_value_errors_name_the_argument(call, argument):
    student, teacher, _ = make()
    with pytest.raises(ValueError, match=rf"^{argument} must be "):
        call(student, teacher)
