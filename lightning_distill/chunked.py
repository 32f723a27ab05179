"""Distillation losses from hidden states, chunk by chunk, never holding the (B*T, V) logits.

The student's vocabulary projection is where memory goes: for SmolLM2 (V = 49152, H = 576) the float32
logits of one 4 x 256 batch take 200 MB, and softmax, log-softmax and their gradients multiply that several
times. Here the N = B*T rows are taken ``chunk_size`` at a time: a chunk's logits are projected by the head,
turned into per-token losses by the functions of :mod:`lightning_distill.losses`, and dropped. Each chunk runs
under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so backward recomputes the chunk's (C, V)
logits instead of keeping them: peak memory is O(chunk_size * V) instead of O(N * V), for one more head matmul
per chunk. This is the chunked loss of torchtune and of Liger Kernel (Hsu et al. 2024, "Liger Kernel:
Efficient Triton Kernels for LLM Training"), in plain torch.

Results equal :func:`lightning_distill.losses.distill_loss` on ``head(hidden)`` (tested): same per-token
functions, same masking (``-100``) and normalization (valid tokens, or ``num_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_distill.losses import (
    NumTokens,
    SparseTargets,
    cross_entropy_per_token,
    divergence_per_token,
    reduce_tokens,
    sparse_per_token,
)

Head = nn.Module | Tensor  # an output layer (called), or its (V, H) weight


def _project(head: Head, hidden: Tensor) -> Tensor:
    """Logits (C, V) of hidden states (C, H). A module is called (so the hooks of wrappers such as FSDP run);
    a tensor is used as a bias-free (V, H) weight."""
    return head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)


def _chunked(
    hidden: Tensor,
    head: Head,
    labels: Tensor | None,
    kd_fn: Callable[..., Tensor] | None,
    kd_inputs: tuple[Tensor, ...],
    *,
    ce_weight: float,
    num_tokens: NumTokens,
    chunk_size: int,
) -> dict[str, Tensor]:
    """The shared loop. For each chunk of rows: logits = head(hidden rows), KD per token
    ``kd_fn(logits, *kd_inputs rows)`` (skipped when ``kd_fn`` is None), CE per token (skipped when
    ``ce_weight == 0``). The per-token values (N,) are then reduced as in :mod:`lightning_distill.losses`."""
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"`ce_weight` must be in [0, 1], got {ce_weight!r}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")
    if ce_weight > 0 and labels is None:
        raise ValueError("`labels` must be a tensor when ce_weight > 0, got None")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = None if labels is None else labels.reshape(-1)  # (N,)
    rows = [x.reshape(h.shape[0], x.shape[-1]) for x in kd_inputs]  # each (N, V), (N, H_t) or (N, K)

    def chunk(h_c: Tensor, y_c: Tensor | None, *kd_c: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits = _project(head, h_c)  # (C, V)
        kd = None if kd_fn is None else kd_fn(logits, *kd_c)  # (C,)
        ce = None if ce_weight == 0 else cross_entropy_per_token(logits, y_c)  # (C,)
        return kd, ce

    kd_parts, ce_parts = [], []
    for start in range(0, h.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (h[part], None if y is None else y[part], *(x[part] for x in rows))
        # Non-reentrant checkpoint: only the (sliced) inputs are kept; backward recomputes the chunk.
        kd, ce = checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args)
        kd_parts.append(kd)
        ce_parts.append(ce)

    zero = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    kd = zero if kd_fn is None else reduce_tokens(torch.cat(kd_parts), labels, num_tokens)
    ce = zero if ce_weight == 0 else reduce_tokens(torch.cat(ce_parts), labels, num_tokens)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head: Head,
    teacher_logits: Tensor | SparseTargets | None,
    labels: Tensor | None,
    *,
    divergence: str = "forward_kl",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    num_tokens: NumTokens = None,
    chunk_size: int = 1024,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    **params: float,
) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` from hidden states, ``chunk_size`` rows at a
    time.

    The teacher side is either full logits (``teacher_logits``) or ``teacher_hidden`` with ``teacher_head``,
    whose logits are then made chunk by chunk too. Gradients reach whatever requires them: a frozen teacher
    (``requires_grad=False``, DESIGN.md §4) records no graph; a trained one (co-distillation) gets gradients.

    Args:
        student_hidden: (B, T, H) or (N, H) final hidden states of the student (after its last norm).
        student_head: the output layer (``model.get_output_embeddings()``, an ``nn.Linear``), or its (V, H)
            weight.
        teacher_logits: (B, T, V) or (N, V); or stored :class:`~lightning_distill.losses.SparseTargets`, then
            this is :func:`chunked_sparse_loss`; or ``None`` (``ce_weight == 1``, or the hidden-state path).
        labels: (B, T) or (N,) CE targets and mask (``-100``), already aligned with the hidden states; may be
            ``None`` when ``ce_weight == 0``.
        divergence: a key of :data:`lightning_distill.losses.DIVERGENCES`.
        ce_weight: in [0, 1]; a term with weight 0 is skipped and returned as 0 (at 1 the teacher is unused).
        temperature: KD temperature (CE uses T = 1).
        num_tokens: normalizer of both terms instead of the valid-token count (gradient accumulation).
        chunk_size: rows per chunk, >= 1; memory grows as ``chunk_size * V``.
        teacher_hidden: (B, T, H_t) or (N, H_t) teacher hidden states, instead of ``teacher_logits``.
        teacher_head: the teacher's output layer or (V, H_t) weight, with ``teacher_hidden``.
        **params: divergence parameters (``beta``, ``alpha``).

    Returns:
        ``{"loss", "kd", "ce"}`` scalars, equal to :func:`lightning_distill.losses.distill_loss` on the
        logits.
    """
    if isinstance(teacher_logits, SparseTargets):
        return chunked_sparse_loss(student_hidden, student_head, teacher_logits.ids, teacher_logits.values, labels,
                                   kind=teacher_logits.kind, ce_weight=ce_weight, temperature=temperature,
                                   num_tokens=num_tokens, chunk_size=chunk_size, divergence=divergence, **params)
    if ce_weight == 1:
        teacher = None
    elif teacher_logits is not None:
        if teacher_hidden is not None:
            raise ValueError("`teacher_hidden` must be None when teacher_logits is given")
        teacher = teacher_logits
    elif teacher_hidden is not None and teacher_head is not None:
        teacher = teacher_hidden
    else:
        raise ValueError("`teacher_logits` (or teacher_hidden and teacher_head) is needed when ce_weight < 1")

    def kd_fn(logits: Tensor, teacher_rows: Tensor) -> Tensor:  # (C, V), (C, V) or (C, H_t) -> (C,)
        if teacher_logits is None:
            teacher_rows = _project(teacher_head, teacher_rows)  # (C, V)
        return divergence_per_token(divergence, logits, teacher_rows, temperature, **params)

    return _chunked(student_hidden, student_head, labels, None if teacher is None else kd_fn,
                    () if teacher is None else (teacher,), ce_weight=ce_weight, num_tokens=num_tokens,
                    chunk_size=chunk_size)


def chunked_sparse_loss(
    student_hidden: Tensor,
    student_head: Head,
    target_ids: Tensor,
    target_values: Tensor,
    labels: Tensor | None,
    *,
    kind: str = "topk",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    num_tokens: NumTokens = None,
    chunk_size: int = 1024,
    **params: str | float,
) -> dict[str, Tensor]:
    """:func:`chunked_distill_loss` against stored sparse teacher targets (top-k or sampled ids).

    Args:
        student_hidden, student_head, labels, ce_weight, temperature, num_tokens, chunk_size: as
            :func:`chunked_distill_loss`.
        target_ids: (B, T, K) or (N, K) long teacher ids.
        target_values: same shape: teacher log-probs (``kind="topk"``) or sample weights (``kind="sampled"``).
        kind: ``"topk"`` (:func:`lightning_distill.losses.topk_forward_kl`) or ``"sampled"``
            (:func:`lightning_distill.losses.sampled_kl`).
        **params: ``tail`` for ``"topk"``; ``divergence`` and its ``beta`` / ``alpha`` (see
            :data:`lightning_distill.losses.SPARSE_DIVERGENCES`).

    Returns:
        ``{"loss", "kd", "ce"}`` scalars, equal to the unchunked sparse loss and CE on the logits.
    """

    def kd_fn(logits: Tensor, ids: Tensor, values: Tensor) -> Tensor:  # (C, V), (C, K), (C, K) -> (C,)
        return sparse_per_token(kind, logits, ids, values, temperature, **params)

    use_kd = ce_weight != 1
    return _chunked(student_hidden, student_head, labels, kd_fn if use_kd else None,
                    (target_ids, target_values) if use_kd else (), ce_weight=ce_weight, num_tokens=num_tokens,
                    chunk_size=chunk_size)
