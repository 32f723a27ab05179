"""Distillation losses on logits: dense teacher distributions and sparse (top-k / sampled) stored targets.

Pure torch, no Lightning. Every loss has one shape of call::

    loss = forward_kl(student_logits, teacher_logits, labels, temperature=2.0, num_tokens=None)

- ``student_logits``, ``teacher_logits``: ``(B, T, V)`` or ``(N, V)``, any float dtype. Softmax is taken in at
  least float32 (bf16 / fp16 are upcast, float64 stays float64), and so is the returned scalar.
- ``labels``: ``(B, T)`` or ``(N,)`` long; positions equal to ``-100`` are ignored, ``None`` counts every
  position. Nothing is shifted here: the caller aligns logits and labels.
- Reduction: the sum of per-token losses over valid positions divided by the number of valid positions, or
  by ``num_tokens`` when given (the valid-token count of a whole gradient-accumulation window, DESIGN.md §4).
  When every position is masked the result is exactly 0, still attached to the graph.
- Temperature ``T``: both logits are divided by ``T`` and the loss is multiplied by ``T**2``, which keeps
  gradient magnitudes independent of ``T`` (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network").

The file reads top-down: per-token divergences on log-probs ``(N, V) -> (N,)`` in :data:`DIVERGENCES` (reused
by :mod:`lightning_distill.chunked`); :func:`divergence_per_token` and :func:`reduce_tokens`; the public dense
losses and :func:`distill_loss`; sparse targets stored by the label writer (:func:`topk_forward_kl`,
:func:`sampled_kl`) and the functions that make them (:func:`topk_teacher`, :func:`sample_teacher`). A
:class:`SparseTargets` goes wherever teacher logits go (``distill_loss``, ``chunked_distill_loss``) and selects
the sparse loss of its kind; top-k targets with ``tail="bucket"`` take every divergence of :data:`DIVERGENCES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
NumTokens = int | Tensor | None  # normalizer: see reduce_tokens


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    """Raise a ``ValueError`` naming the argument ``name`` unless ``ok``."""
    if not ok:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")


def _lookup(registry: dict[str, Callable[..., Tensor]], name: str, arg: str) -> Callable[..., Tensor]:
    """``registry[name]``, or a ``ValueError`` naming the argument ``arg`` and listing the valid names."""
    _check(name in registry, arg, name, f"one of {sorted(registry)}")
    return registry[name]


def _log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax of ``logits / temperature`` in at least float32, flattened: (..., V) -> (N, V)."""
    _check(temperature > 0, "temperature", temperature, "> 0")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)  # (N, V)
    return torch.log_softmax(flat if temperature == 1 else flat / temperature, dim=-1)  # (N, V)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs: (N, V) -> (N,).

    Entries with p_v == 0 contribute exactly 0 to the value and to the gradient (0 log 0 = 0), so a one-hot
    teacher or ``-inf`` logits give no NaN: the ``where`` keeps ``-inf - -inf`` out of both passes.
    """
    p = log_p.exp()  # (N, V)
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) from log-probs (N, V), exact at w = 0 and w = 1, computed with logaddexp."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    floor = torch.finfo(log_a.dtype).min  # -inf -> finite: logaddexp(-inf, -inf) has a NaN gradient
    return torch.logaddexp(log_a.clamp(min=floor) + math.log(w), log_b.clamp(min=floor) + math.log1p(-w))


# ------------------------------------------------------------ per-token divergences: (N, V) log-probs -> (N,)
def _forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_t || p_s): classic KD (Hinton et al. 2015); mean-seeking, the student covers all teacher modes."""
    return _kl(teacher_logp, student_logp)


def _reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of LLMs")."""
    return _kl(student_logp, teacher_logp)


def _generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (GKD, Agarwal et al. 2024,
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"; as TRL's
    ``generalized_jsd_loss``). The formula tends to beta * forward KL as beta -> 0 and to (1 - beta) * reverse
    KL as beta -> 1; the endpoints are defined, as in TRL, as the unscaled forward (0) and reverse (1) KL."""
    _check(0 <= beta <= 1, "beta", beta, "in [0, 1]")
    if beta == 0:
        return _kl(teacher_logp, student_logp)
    if beta == 1:
        return _kl(student_logp, teacher_logp)
    mix = _log_mix(teacher_logp, student_logp, beta)  # (N, V) log m
    return beta * _kl(teacher_logp, mix) + (1 - beta) * _kl(student_logp, mix)


def _skew_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p_t || alpha p_t + (1 - alpha) p_s), skew KL (DistiLLM, Ko et al. 2024, "DistiLLM: Towards
    Streamlined Distillation for Large Language Models"); bounded by log(1 / alpha), unlike forward KL."""
    _check(0 <= alpha <= 1, "alpha", alpha, "in [0, 1]")
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def _skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p_s || (1 - alpha) p_t + alpha p_s), skew reverse KL (DistiLLM, Ko et al. 2024)."""
    _check(0 <= alpha <= 1, "alpha", alpha, "in [0, 1]")
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, alpha))


def _tvd(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation 0.5 sum_v |p_t - p_s| (Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation")."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "generalized_jsd": _generalized_jsd,
    "skew_kl": _skew_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}
"""Per-token divergences ``fn(student_logp (N, V), teacher_logp (N, V), **params) -> (N,)`` by name."""


def divergence_per_token(name: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                         student_logp: Tensor | None = None, **params: float) -> Tensor:
    """Per-token divergence ``name`` between tempered softmaxes, already multiplied by ``temperature**2``.

    Args:
        name: a key of :data:`DIVERGENCES`.
        student_logits: (B, T, V) or (N, V) logits, any float dtype.
        teacher_logits: same shape as ``student_logits``.
        temperature: T > 0; both logits are divided by T.
        student_logp: the student's log-probs at ``temperature`` (N, V) when the caller already has them.
        **params: the divergence's parameters (``beta`` for ``generalized_jsd``, ``alpha`` for the skew KLs).

    Returns:
        (N,) per-token values in at least float32, N = B * T.
    """
    fn = _lookup(DIVERGENCES, name, "divergence")
    shape = tuple(student_logits.shape)
    _check(teacher_logits.shape == shape, "teacher_logits", tuple(teacher_logits.shape), f"of shape {shape}")
    student_logp = _log_probs(student_logits, temperature) if student_logp is None else student_logp  # (N, V)
    teacher_logp = _log_probs(teacher_logits, temperature)  # (N, V)
    return fn(student_logp, teacher_logp, **params) * temperature**2  # (N,)


def reduce_tokens(per_token: Tensor, labels: Tensor | None = None, num_tokens: NumTokens = None) -> Tensor:
    """Sum of per-token values over valid positions divided by their count (or by ``num_tokens``).

    Args:
        per_token: (N,) per-token losses.
        labels: (B, T) or (N,) with ``-100`` at ignored positions; ``None``: every position is valid.
        num_tokens: int or 0-dim tensor; divide by it instead of the count of valid positions (the valid-token
            count of a whole gradient-accumulation window).

    Returns:
        Scalar; exactly 0 (and attached to the graph) when every position is ignored.
    """
    if labels is None:
        total, count = per_token.sum(), per_token.numel()
    else:
        valid = labels.reshape(-1) != IGNORE_INDEX  # (N,)
        _check(valid.numel() == per_token.numel(), "labels", tuple(labels.shape), f"{per_token.numel()} long")
        total, count = torch.where(valid, per_token, 0.0).sum(), valid.sum()
    if num_tokens is not None:
        _check(not isinstance(num_tokens, int) or num_tokens >= 0, "num_tokens", num_tokens, ">= 0")
        count = num_tokens
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


# ------------------------------------------------------------------------------------------- dense losses
def _dense(name: str, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
           temperature: float, num_tokens: NumTokens, **params: float) -> Tensor:
    per_token = divergence_per_token(name, student_logits, teacher_logits, temperature, **params)  # (N,)
    return reduce_tokens(per_token, labels, num_tokens)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               temperature: float = 1.0, num_tokens: NumTokens = None) -> Tensor:
    """Forward KL(p_t || p_s), the classic distillation loss (Hinton et al. 2015).

    Args:
        student_logits: (B, T, V) or (N, V) student logits, any float dtype.
        teacher_logits: teacher logits of the same shape.
        labels: (B, T) or (N,) ids with ``-100`` at positions to ignore; ``None``: all positions count.
        temperature: T > 0; logits are divided by T and the loss multiplied by T**2.
        num_tokens: divide the sum by this instead of the number of valid positions (gradient accumulation).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    return _dense("forward_kl", student_logits, teacher_logits, labels, temperature, num_tokens)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               temperature: float = 1.0, num_tokens: NumTokens = None) -> Tensor:
    """Reverse KL(p_s || p_t) (MiniLLM, Gu et al. 2024). Arguments and result as :func:`forward_kl`."""
    return _dense("reverse_kl", student_logits, teacher_logits, labels, temperature, num_tokens)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                    temperature: float = 1.0, num_tokens: NumTokens = None, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024). Arguments and result as
    :func:`forward_kl`, plus ``beta`` in [0, 1]: 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD."""
    return _dense("generalized_jsd", student_logits, teacher_logits, labels, temperature, num_tokens,
                  beta=beta)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            temperature: float = 1.0, num_tokens: NumTokens = None, alpha: float = 0.1) -> Tensor:
    """Skew KL(p_t || alpha p_t + (1 - alpha) p_s) (DistiLLM, Ko et al. 2024). Arguments and result as
    :func:`forward_kl`, plus ``alpha`` in [0, 1] (0: forward KL)."""
    return _dense("skew_kl", student_logits, teacher_logits, labels, temperature, num_tokens, alpha=alpha)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                    temperature: float = 1.0, num_tokens: NumTokens = None, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL(p_s || (1 - alpha) p_t + alpha p_s) (DistiLLM, Ko et al. 2024). Arguments and result as
    :func:`forward_kl`, plus ``alpha`` in [0, 1] (0: reverse KL)."""
    return _dense("skew_reverse_kl", student_logits, teacher_logits, labels, temperature, num_tokens,
                  alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        temperature: float = 1.0, num_tokens: NumTokens = None) -> Tensor:
    """Total variation distance 0.5 sum_v |p_t - p_s| (Wen et al. 2023). Arguments and result as
    :func:`forward_kl`."""
    return _dense("tvd", student_logits, teacher_logits, labels, temperature, num_tokens)


LOSSES: dict[str, Callable[..., Tensor]] = {
    fn.__name__: fn for fn in (forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, tvd)
}
"""The dense losses above by name (the keys of :data:`DIVERGENCES`)."""


def get_loss(name: str) -> Callable[..., Tensor]:
    """The dense loss called ``name``; a ``ValueError`` lists the valid names."""
    return _lookup(LOSSES, name, "name")


def cross_entropy_per_token(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Negative log-likelihood of ``labels`` (B, T) / (N,) under ``student_logits`` (..., V), in at least
    float32: (N,), 0 at ignored positions."""
    logits = student_logits.reshape(-1, student_logits.shape[-1])  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")  # (N,)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, num_tokens: NumTokens = None) -> Tensor:
    """Mean next-token cross-entropy over valid positions (same normalization as the divergences, T = 1).

    Args:
        student_logits: (B, T, V) or (N, V) logits.
        labels: (B, T) or (N,) target ids, ``-100`` ignored.
        num_tokens: divide by this instead of the number of valid positions.
    """
    return reduce_tokens(cross_entropy_per_token(student_logits, labels), labels, num_tokens)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor | SparseTargets | None, labels: Tensor | None, *,
                 divergence: str = "forward_kl", ce_weight: float = 0.0, temperature: float = 1.0,
                 num_tokens: NumTokens = None, **params: float) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` on full logits; the same from hidden states,
    never holding (N, V) logits, is :func:`lightning_distill.chunked.chunked_distill_loss`.

    Args:
        student_logits: (B, T, V) or (N, V).
        teacher_logits: same shape; or stored :class:`SparseTargets` ((B, T, K) / (N, K)), then KD is the sparse
            loss of their kind (:func:`sparse_per_token`); may be ``None`` when ``ce_weight == 1``.
        labels: (B, T) or (N,) CE targets and mask (``-100``); may be ``None`` when ``ce_weight == 0``.
        divergence: a key of :data:`DIVERGENCES`.
        ce_weight: in [0, 1]; the term with weight 0 is skipped and returned as 0.
        temperature: KD temperature (CE always uses T = 1).
        num_tokens: normalizer of both terms, as in :func:`reduce_tokens`.
        **params: divergence parameters (``beta``, ``alpha``).

    Returns:
        ``{"loss", "kd", "ce"}`` scalars.
    """
    _check(0 <= ce_weight <= 1, "ce_weight", ce_weight, "in [0, 1]")
    zero = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    kd = ce = zero
    student_logp = None
    if ce_weight < 1:
        _check(teacher_logits is not None, "teacher_logits", None, "a tensor when ce_weight < 1")
        student_logp = _log_probs(student_logits, temperature)  # (N, V), shared with CE at T = 1
        if isinstance(teacher_logits, SparseTargets):  # stored top-k / sampled targets
            per_token = sparse_per_token(teacher_logits.kind, student_logits, teacher_logits.ids,
                                         teacher_logits.values, temperature, student_logp=student_logp,
                                         divergence=divergence, **params)
        else:
            per_token = divergence_per_token(divergence, student_logits, teacher_logits, temperature,
                                             student_logp=student_logp, **params)
        kd = reduce_tokens(per_token, labels, num_tokens)
    if ce_weight > 0:
        _check(labels is not None, "labels", None, "a tensor when ce_weight > 0")
        if student_logp is not None and temperature == 1:  # one log-softmax pass (and its backward) for both
            per_token = F.nll_loss(student_logp, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
            ce = reduce_tokens(per_token, labels, num_tokens)
        else:
            ce = cross_entropy(student_logits, labels, num_tokens=num_tokens)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}


# ------------------------------------------------------------------------ sparse (stored) teacher targets
def topk_teacher(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's ``k`` most likely ids and their log-probs at ``temperature``, as the label writer stores.

    Args:
        teacher_logits: (..., V) logits.
        k: number of ids kept per position, in [1, V].
        temperature: softmax temperature; train with the same one.

    Returns:
        ``(ids, logprobs)``, (..., K) long and (..., K) float32 log-probs of the full (not renormalized)
        tempered distribution, most likely first.
    """
    _check(1 <= k <= teacher_logits.shape[-1], "k", k, f"in [1, {teacher_logits.shape[-1]}]")
    _check(temperature > 0, "temperature", temperature, "> 0")
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (N, V)
    scaled = flat if temperature == 1 else flat.float() / temperature
    logprobs, ids = torch.log_softmax(scaled, -1, dtype=torch.float32).topk(k, dim=-1)  # (N, K)
    shape = (*teacher_logits.shape[:-1], k)
    return ids.reshape(shape), logprobs.reshape(shape)


def sample_teacher(teacher_logits: Tensor, num_samples: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``num_samples`` ids per position from the tempered teacher, with replacement, and merge duplicates
    (the random-sampling KD target of Anshumann et al. 2025; see :func:`sampled_kl`).

    Args:
        teacher_logits: (..., V) logits.
        num_samples: S >= 1 draws per position.
        temperature: softmax temperature; train with the same one.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(ids, weights)``, both (..., S): unique ids in ascending order, each with weight count / S, then
        padding slots (id 0, weight 0). Weights sum to 1 per position.
    """
    _check(num_samples >= 1, "num_samples", num_samples, ">= 1")
    probs = _log_probs(teacher_logits, temperature).exp()  # (N, V)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (N, S)
    ids, weights = merge_draws(draws)
    shape = (*teacher_logits.shape[:-1], num_samples)
    return ids.reshape(shape), weights.to(probs.dtype).reshape(shape)


def merge_draws(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Merge repeated ids among S draws per row: (N, S) -> ``(ids, weights)``, both (N, S): distinct ids in
    ascending order, each weighted count / S, then padding slots (id 0, weight 0)."""
    num_samples = draws.shape[-1]
    draws = draws.sort(-1).values
    first = torch.ones_like(draws, dtype=torch.bool)  # (N, S) first draw of each distinct id
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    counts = torch.searchsorted(draws, draws, right=True) - torch.searchsorted(draws, draws)  # (N, S)
    weights = torch.where(first, counts.to(torch.float32) / num_samples, 0.0)  # (N, S)
    order = (~first).long().argsort(dim=-1, stable=True)  # distinct ids to the front, keeping their order
    weights = weights.gather(-1, order)
    return draws.gather(-1, order).masked_fill(weights == 0, 0), weights


def _topk_kl(student_logp: Tensor, ids: Tensor, logprobs: Tensor, tail: str = "renorm",
             divergence: str = "forward_kl", **params: float) -> Tensor:
    """A divergence to a top-k teacher: (N, V), (N, K), (N, K) -> (N,); see :func:`topk_forward_kl`.

    ``tail="bucket"`` turns both sides into proper distributions over K + 1 outcomes, on which every divergence
    of :data:`DIVERGENCES` is defined (by data processing, each is at most its dense value). ``tail="renorm"``
    leaves the teacher 0 outside its K ids, where only ``forward_kl`` stays finite and meaningful.
    """
    _check(tail in ("renorm", "bucket"), "tail", tail, "'renorm' or 'bucket'")
    student_k = student_logp.gather(-1, ids)  # (N, K)
    if tail == "renorm":
        _check(divergence == "forward_kl", "divergence", divergence,
               "'forward_kl' with tail='renorm' (use tail='bucket' for the other divergences)")
        return _kl(torch.log_softmax(logprobs, dim=-1), student_k)
    fn = _lookup(DIVERGENCES, divergence, "divergence")
    if ids.shape[-1] == student_logp.shape[-1]:  # the (distinct) ids cover the vocabulary: there is no tail
        return fn(student_k, logprobs, **params)
    student_tail = _tail(student_logp, ids, student_k)  # (N, 1) log(1 - sum_k p_s(id_k))
    teacher_covered = logprobs.logsumexp(-1, keepdim=True)  # (N, 1) log sum_k q_k
    empty = teacher_covered >= 0  # a teacher tail below rounding
    teacher_tail = torch.log(-torch.expm1(teacher_covered.masked_fill(empty, -1)))  # (N, 1) log(1 - sum q)
    # masked_fill after the log: no NaN gradients. A real teacher's tail is never 0: the mode-seeking
    # divergences get the smallest positive mass instead, which keeps them finite.
    floor = -math.inf if divergence == "forward_kl" else math.log(torch.finfo(logprobs.dtype).tiny)
    teacher_tail = teacher_tail.masked_fill(empty, floor)
    student_c = torch.cat([student_k, student_tail], -1)  # (N, K + 1)
    return fn(student_c, torch.cat([logprobs, teacher_tail], -1), **params)


def _tail(student_logp: Tensor, ids: Tensor, student_k: Tensor) -> Tensor:
    """log(1 - sum_k p(id_k)), the student's mass outside the ids: (N, V), (N, K), (N, K) -> (N, 1).

    From the K log-probs, ``log(-expm1(logsumexp))``, without a pass over the vocabulary; where that mass is so
    small that the subtraction loses digits (below 1e-3 in float32), exactly, as a logsumexp over the other ids
    of those rows only.
    """
    covered = student_k.logsumexp(-1, keepdim=True)  # (N, 1) log sum_k p_k, <= 0 up to rounding
    eps = torch.finfo(covered.dtype).eps
    tail = torch.log(-torch.expm1(covered.clamp(max=-eps)))  # (N, 1); the clamp keeps log(0) off the graph
    rows = (tail < math.log(1e-3 if eps > 1e-10 else 1e-8)).squeeze(-1).nonzero().squeeze(-1)  # (R,)
    if rows.numel():
        others = torch.ones_like(student_logp[rows], dtype=torch.bool).scatter_(-1, ids[rows], False)  # (R, V)
        exact = student_logp[rows].masked_fill(~others, -math.inf).logsumexp(-1, keepdim=True)  # (R, 1)
        tail = tail.index_put((rows,), exact)
    return tail


def _sampled_ce(student_logp: Tensor, sample_ids: Tensor, sample_weights: Tensor,
                divergence: str = "forward_kl") -> Tensor:
    """Cross-entropy to a sparse empirical teacher: (N, V), (N, S), (N, S) -> (N,). See :func:`sampled_kl`.

    Only the forward KL has an unbiased estimate from draws (it is linear in the teacher's probabilities)."""
    _check(divergence == "forward_kl", "divergence", divergence, "'forward_kl' with sampled targets (the only "
           "divergence linear in the teacher, hence estimated without bias from its draws)")
    return -(sample_weights * student_logp.gather(-1, sample_ids)).sum(-1)


SPARSE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {"topk": _topk_kl, "sampled": _sampled_ce}
"""Per-token sparse losses ``fn(student_logp (N, V), ids (N, K), values (N, K), **params) -> (N,)``; ``params``
may name a ``divergence`` of :data:`DIVERGENCES` (``"topk"`` with ``tail="bucket"``: any; otherwise
``forward_kl`` only) with its ``beta`` / ``alpha``."""


@dataclass(frozen=True)
class SparseTargets:
    """A teacher signal stored on a few ids per position (:mod:`lightning_distill.labels` reads it).

    Passed wherever teacher logits go (:func:`distill_loss`, ``chunked_distill_loss``, ``student_loss``), it
    selects the sparse loss of its ``kind``. Indexing slices both tensors: ``targets[:, :-1]``.

    Attributes:
        kind: ``"topk"`` (values are teacher log-probs) or ``"sampled"`` (values are sample weights).
        ids: (B, T, K) long teacher ids.
        values: (B, T, K) float, aligned with ``ids``.
    """

    kind: str
    ids: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        _check(self.kind in SPARSE_DIVERGENCES, "kind", self.kind, f"one of {sorted(SPARSE_DIVERGENCES)}")
        _check(self.ids.shape == self.values.shape, "values", tuple(self.values.shape), f"of shape "
               f"{tuple(self.ids.shape)} (as ids)")

    def __getitem__(self, index: object) -> SparseTargets:
        return replace(self, ids=self.ids[index], values=self.values[index])


def sparse_per_token(kind: str, student_logits: Tensor, target_ids: Tensor, target_values: Tensor,
                     temperature: float = 1.0, student_logp: Tensor | None = None, **params: str | float) -> Tensor:
    """Per-token loss to a sparse target, multiplied by ``temperature**2``.

    Args:
        kind: ``"topk"`` (values are teacher log-probs, :func:`topk_forward_kl`) or ``"sampled"`` (values are
            weights, :func:`sampled_kl`).
        student_logits: (B, T, V) or (N, V).
        target_ids: (B, T, K) or (N, K) long.
        target_values: same shape as ``target_ids``, any float dtype.
        temperature: T > 0, the temperature the targets were made at.
        student_logp: the student's log-probs at ``temperature`` (N, V) when the caller already has them.
        **params: ``tail`` for ``"topk"``; ``divergence`` (and its ``beta`` / ``alpha``), see
            :data:`SPARSE_DIVERGENCES`.

    Returns:
        (N,) per-token values in at least float32.
    """
    fn = _lookup(SPARSE_DIVERGENCES, kind, "kind")
    rows = tuple(student_logits.shape[:-1])
    _check(target_ids.shape[:-1] == rows, "target_ids", tuple(target_ids.shape), f"of shape ({rows}, K)")
    student_logp = _log_probs(student_logits, temperature) if student_logp is None else student_logp  # (N, V)
    ids = target_ids.reshape(student_logp.shape[0], -1)  # (N, K)
    values = target_values.reshape(ids.shape).to(student_logp.dtype)  # (N, K)
    return fn(student_logp, ids, values, **params) * temperature**2  # (N,)


def topk_forward_kl(student_logits: Tensor, target_ids: Tensor, target_logprobs: Tensor,
                    labels: Tensor | None = None, *, temperature: float = 1.0,
                    num_tokens: NumTokens = None, tail: str = "renorm") -> Tensor:
    """Forward KL to a teacher stored as its top-k ids and log-probs (from :func:`topk_teacher`).

    Top-k targets are biased: they drop the teacher's tail (Anshumann et al. 2025 show the student ends up
    miscalibrated); :func:`sampled_kl` is the unbiased alternative. Two ways to treat the missing mass:

    - ``"renorm"``: renormalize the K teacher probs q_k to sum to 1 and compute
      sum_k q_k (log q_k - log p_s(id_k)); the teacher's missing mass is ignored and the student is only
      pushed up on the K ids (its remaining mass falls as a side effect of the softmax).
    - ``"bucket"``: keep the missing teacher mass 1 - sum_k q_k as one extra outcome matched against the
      student's mass outside the K ids (see :func:`_tail`): the exact KL between the two
      distributions coarse-grained to K + 1 outcomes, hence never above the dense forward KL.

    With K = V both equal :func:`forward_kl`.

    Args:
        student_logits: (B, T, V) or (N, V).
        target_ids: (B, T, K) or (N, K) long, distinct per position.
        target_logprobs: same shape, teacher log-probs of those ids at ``temperature`` (not renormalized).
        labels, temperature, num_tokens: as :func:`forward_kl`; ``temperature`` must be the writer's.
        tail: ``"renorm"`` or ``"bucket"``.
    """
    per_token = sparse_per_token("topk", student_logits, target_ids, target_logprobs, temperature, tail=tail)
    return reduce_tokens(per_token, labels, num_tokens)


def sampled_kl(student_logits: Tensor, sample_ids: Tensor, sample_weights: Tensor,
               labels: Tensor | None = None, *, temperature: float = 1.0,
               num_tokens: NumTokens = None) -> Tensor:
    """Random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation
    in LLMs"): cross-entropy -sum_s w_s log p_s(id_s) to the teacher's empirical distribution from
    :func:`sample_teacher`, times T**2.

    The ids are drawn from the teacher with replacement, so E[w] = p_t: the loss is an unbiased estimate of
    CE(p_t, p_s) = KL(p_t || p_s) + H(p_t), and its gradient w.r.t. the student logits is, in expectation, the
    gradient of the dense :func:`forward_kl`. Its value is not 0 at p_s = p_t (the teacher entropy remains).

    Args:
        student_logits: (B, T, V) or (N, V).
        sample_ids: (B, T, S) or (N, S) long; padding slots may hold any valid id.
        sample_weights: same shape, normalized counts summing to 1 per position, 0 in padding slots.
        labels, temperature, num_tokens: as :func:`forward_kl`; ``temperature`` must be the writer's.
    """
    per_token = sparse_per_token("sampled", student_logits, sample_ids, sample_weights, temperature)
    return reduce_tokens(per_token, labels, num_tokens)


SPARSE_LOSSES: dict[str, Callable[..., Tensor]] = {"topk": topk_forward_kl, "sampled": sampled_kl}
"""The sparse-target losses by kind (keys of :data:`SPARSE_DIVERGENCES`)."""
