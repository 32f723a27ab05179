"""Distillation losses on logits: ``(1 - ce_weight) * KD + ce_weight * CE`` (:func:`distill_loss`).

Pure torch, no Lightning. The divergences (KD terms) are small typed objects defined in
:mod:`lightning_distill.divergences` and re-exported here, so ``losses.forward_kl``, ``losses.DIVERGENCES`` and
``loss: {class_path: lightning_distill.losses.GeneralizedJSD, init_args: {beta: 0.5}}`` keep working; the
conventions every loss follows (shapes, float32 softmax, ``-100`` masking, valid-token normalization, ``T**2``
temperature scaling) are stated there once. Sparse stored targets (top-k, sampled) are in
:mod:`lightning_distill.sparse`; the same losses from hidden states, chunk by chunk, in
:mod:`lightning_distill.chunked`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.divergences import (  # noqa: F401  (re-exported: the public names of the losses)
    DIVERGENCES,
    IGNORE_INDEX,
    TVD,
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    NumTokens,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    check,
    divergence_from,
    divergence_per_token,
    forward_kl,
    generalized_jsd,
    get_divergence,
    get_loss,
    kl,
    log_mix,
    log_probs,
    reduce_tokens,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)


# -------------------------------------------------------------------------------------------- cross-entropy
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


# ----------------------------------------------------------------------------------------------- KD + CE mix
def distill_loss(student_logits: Tensor, teacher: Tensor | SparseTarget | None, labels: Tensor | None, *,
                 divergence: str | Divergence = "forward_kl", ce_weight: float = 0.0, temperature: float = 1.0,
                 num_tokens: NumTokens = None, **params: float) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` on full logits; the same from hidden states,
    never holding (N, V) logits, is :func:`lightning_distill.chunked.chunked_distill_loss`.

    Args:
        student_logits: (B, T, V) or (N, V).
        teacher: teacher logits of the same shape; or a sparse target (stored top-k / sampled ids,
            :class:`lightning_distill.sparse.SparseTargets`), which computes its own per-token loss; may be
            ``None`` when ``ce_weight == 1``.
        labels: (B, T) or (N,) CE targets and mask (``-100``); may be ``None`` when ``ce_weight == 0``.
        divergence: a :class:`Divergence` or a name in :data:`DIVERGENCES` (with its ``params``).
        ce_weight: in [0, 1]; the term with weight 0 is skipped and returned as 0.
        temperature: KD temperature (CE always uses T = 1).
        num_tokens: normalizer of both terms, as in :func:`reduce_tokens`.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars.
    """
    check(0 <= ce_weight <= 1, "ce_weight", ce_weight, "in [0, 1]")
    divergence = get_divergence(divergence, **params)
    zero = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    kd = ce = zero
    student_logp = None
    if ce_weight < 1:
        check(teacher is not None, "teacher_logits", None, "a tensor when ce_weight < 1")
        student_logp = log_probs(student_logits, temperature)  # (N, V), shared with CE at T = 1
        if isinstance(teacher, Tensor):
            per_token = divergence_per_token(divergence, student_logits, teacher, temperature,
                                             student_logp=student_logp)
        else:  # a sparse target computes its own loss
            per_token = teacher.per_token(student_logp, divergence, temperature)
        kd = reduce_tokens(per_token, labels, num_tokens)
    if ce_weight > 0:
        check(labels is not None, "labels", None, "a tensor when ce_weight > 0")
        if student_logp is not None and temperature == 1:  # one log-softmax pass (and its backward) for both
            per_token = F.nll_loss(student_logp, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
            ce = reduce_tokens(per_token, labels, num_tokens)
        else:
            ce = cross_entropy(student_logits, labels, num_tokens=num_tokens)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}


class SparseTarget:
    """What :func:`distill_loss` needs of a sparse teacher target (implemented by
    :class:`lightning_distill.sparse.SparseTargets`): its per-token loss from the student's log-probs."""

    def per_token(self, student_logp: Tensor, divergence: Divergence, temperature: float) -> Tensor:
        """(N, V) student log-probs at ``temperature`` -> (N,) per-token loss, times ``temperature**2``."""
        raise NotImplementedError


_MOVED_TO_SPARSE = ("SparseTargets", "SPARSE_DIVERGENCES", "SPARSE_LOSSES", "merge_draws", "sample_teacher",
                    "sampled_kl", "sparse_per_token", "topk_forward_kl", "topk_teacher")


def __getattr__(name: str) -> object:
    """The sparse-target names that lived here before :mod:`lightning_distill.sparse` (kept importable)."""
    if name in _MOVED_TO_SPARSE:
        from lightning_distill import sparse

        return getattr(sparse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
