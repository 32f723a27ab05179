"""Distillation losses from hidden states, chunk by chunk, never holding the (B*T, V) logits.

The student's vocabulary projection is where memory goes: for SmolLM2 (V = 49152, H = 576) the float32 logits of
one 4 x 256 batch take 200 MB, and softmax, log-softmax and their gradients multiply that several times. Here the
N = B*T rows are taken ``chunk_size`` at a time, projected by the head, turned into per-token losses by the
functions of :mod:`lightning_distill.losses`, and dropped: peak memory O(chunk_size * V) instead of O(N * V).

- fused (the default, :mod:`lightning_distill.fused`): the forward pass computes each chunk's gradient w.r.t. its
  logits right away (a local autograd pass over the per-token functions, so every divergence works), turns it into
  the gradients of the hidden rows and of the head weight by two matmuls and keeps only those; backward scales them
  by the incoming gradient. The three head matmuls of the unchunked loss, nothing recomputed: the chunked losses of
  Liger Kernel (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"). The normalizer (valid
  tokens, or ``num_tokens``) is known before the loop, so each chunk's gradient is scaled exactly.
- checkpointed (``fused=False``, evaluation, and the fallback for other head modules and for a teacher that is
  trained): each chunk under :func:`torch.utils.checkpoint.checkpoint`, recomputed in backward (torchtune).

Results equal :func:`lightning_distill.losses.distill_loss` on ``head(hidden)`` (tested): same per-token
functions, same masking (``-100``) and normalization (valid tokens, or ``num_tokens``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_distill import losses
from lightning_distill.fused import Head, KDFn, fusable, fused_loop, per_token_terms, project, requires_grad
from lightning_distill.losses import NumTokens, reduce_tokens
from lightning_distill.sparse import SparseTargets, sparse_per_token

DEFAULT_CHUNK_SIZE = 256
"""Rows per chunk. Measured with ``benchmarks/speed.py`` (2 quiet CPU cores, V = 49152, H = 576, 4096 rows,
float32, the fused path, 2026-11-30): 128 / 256 / 512 rows took 1.04 / 0.97 / 0.90 x and 0.78 / 0.71 / 0.70 x the
time of the unchunked loss (two runs) at 0.046 / 0.063 / 0.128 x and 0.036 / 0.054 / 0.112 x its peak memory; 256 is
the largest within 1/8 of it in every run."""


def _checkpointed(h: Tensor, head: Head, y: Tensor | None, kd_fn: KDFn | None, rows: list[Tensor],
                  teacher_head: Head | None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
                  chunk_size: int) -> dict[str, Tensor]:
    """The checkpointed loop (also evaluation under no grad): per-token values of each chunk under non-reentrant
    checkpointing (only the sliced inputs are kept; backward recomputes the chunk), then reduced."""

    def chunk(h_c: Tensor, y_c: Tensor | None, *kd_c: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if teacher_head is not None and kd_fn is not None:
            kd_c = (project(teacher_head, kd_c[0]),)  # (C, V)
        return per_token_terms(project(head, h_c), y_c, kd_fn, kd_c, ce_weight, temperature)  # (C,), (C,)

    kd_parts, ce_parts = [], []
    for start in range(0, h.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (h[part], None if y is None else y[part], *(x[part] for x in rows))
        kd, ce = checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args)
        kd_parts.append(kd)
        ce_parts.append(ce)
    zero = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    kd = zero if kd_fn is None else reduce_tokens(torch.cat(kd_parts), y, num_tokens)
    ce = zero if ce_weight == 0 else reduce_tokens(torch.cat(ce_parts), y, num_tokens)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}


def _chunked(hidden: Tensor, head: Head, labels: Tensor | None, kd_fn: KDFn | None, kd_inputs: tuple[Tensor, ...],
             teacher_head: Head | None = None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
             chunk_size: int, fused: bool, compiled: bool | None) -> dict[str, Tensor]:
    """Check the arguments, flatten the rows and run the fused loop; or the checkpointed one when ``fused`` is
    False, the head is not fusable (:func:`fusable`), nothing on the student side needs a gradient (evaluation),
    or the teacher side would receive gradients. With ``teacher_head``, ``kd_inputs[0]`` are teacher hidden states
    (N, H_t), projected chunk by chunk."""
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"`ce_weight` must be in [0, 1], got {ce_weight!r}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    if ce_weight > 0 and labels is None:
        raise ValueError("`labels` must be a tensor when ce_weight > 0, got None")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = None if labels is None else labels.reshape(-1)  # (N,)
    rows = [x.reshape(h.shape[0], x.shape[-1]) for x in kd_inputs]  # each (N, V), (N, H_t) or (N, K)
    kwargs = dict(ce_weight=ce_weight, temperature=temperature, num_tokens=num_tokens, chunk_size=chunk_size)
    if (fused and fusable(head) and requires_grad(h, head)
            and not (kd_fn is not None and requires_grad(teacher_head, *kd_inputs))):
        return fused_loop(h, head, y, kd_fn, rows, teacher_head, compiled=h.is_cuda if compiled is None else compiled,
                      **kwargs)
    return _checkpointed(h, head, y, kd_fn, rows, teacher_head, **kwargs)


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    fused: bool = True,
    compiled: bool | None = None,
    **params: float,
) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` from hidden states, ``chunk_size`` rows at a
    time, with the gradients computed in the forward pass (``fused``).

    The teacher side is either full logits (``teacher_logits``) or ``teacher_hidden`` with ``teacher_head``,
    whose logits are then made chunk by chunk too (under no grad: (N, V) teacher logits are never held).
    Gradients reach whatever requires them: a frozen teacher (``requires_grad=False``, DESIGN.md §4) records no
    graph; a trained one (co-distillation) gets gradients, through the checkpointed path.

    Args:
        student_hidden: (B, T, H) or (N, H) final hidden states of the student (after its last norm), any float
            dtype (bf16 under autocast: softmax in float32, gradients in the input dtype).
        student_head: the output layer (``model.get_output_embeddings()``, an ``nn.Linear``, possibly tied to
            the input embedding), or its (V, H) weight. Another module type takes the checkpointed path.
        teacher_logits: (B, T, V) or (N, V); or stored sparse targets (``SparseTargets``), then this is
            :func:`chunked_sparse_loss`; or ``None`` (``ce_weight == 1``, or the hidden-state path).
        labels: (B, T) or (N,) CE targets and mask (``-100``), already aligned with the hidden states; may be
            ``None`` when ``ce_weight == 0``.
        divergence: passed as is to :func:`lightning_distill.losses.divergence_per_token` (with ``params``).
        ce_weight: in [0, 1]; a term with weight 0 is skipped and returned as 0 (at 1 the teacher is unused).
        temperature: KD temperature > 0 (CE uses T = 1).
        num_tokens: normalizer of both terms instead of the valid-token count (gradient accumulation).
        chunk_size: rows per chunk, >= 1; memory grows as ``chunk_size * V``.
        teacher_hidden: (B, T, H_t) or (N, H_t) teacher hidden states, instead of ``teacher_logits``.
        teacher_head: the teacher's output layer or (V, H_t) weight, with ``teacher_hidden``.
        fused: gradients in the forward pass (default); ``False``: the checkpointed path (recomputes each chunk
            in backward).
        compiled: ``torch.compile`` the fused per-chunk loss and gradient; ``None``: on CUDA only. A compiler
            failure warns and falls back to eager.
        **params: divergence parameters (``beta``, ``alpha``).

    Returns:
        ``{"loss", "kd", "ce"}`` scalars (``kd`` and ``ce`` detached on the fused path), equal to
        :func:`lightning_distill.losses.distill_loss` on the logits.
    """
    kwargs = dict(ce_weight=ce_weight, temperature=temperature, num_tokens=num_tokens, chunk_size=chunk_size,
                  fused=fused, compiled=compiled)
    if isinstance(teacher_logits, SparseTargets):
        return chunked_sparse_loss(student_hidden, student_head, teacher_logits.ids, teacher_logits.values, labels,
                                   kind=teacher_logits.kind, divergence=divergence, **kwargs, **params)
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

    def kd_fn(logits: Tensor, logp: Tensor, teacher_rows: Tensor) -> Tensor:  # (C, V) x 3 -> (C,)
        return losses.divergence_per_token(divergence, logits, teacher_rows, temperature, student_logp=logp,
                                           **params)

    return _chunked(student_hidden, student_head, labels, None if teacher is None else kd_fn,
                    () if teacher is None else (teacher,), None if teacher_logits is not None else teacher_head,
                    **kwargs)


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fused: bool = True,
    compiled: bool | None = None,
    **params: str | float,
) -> dict[str, Tensor]:
    """:func:`chunked_distill_loss` against stored sparse teacher targets (top-k or sampled ids).

    Args:
        student_hidden, student_head, labels, ce_weight, temperature, num_tokens, chunk_size, fused, compiled:
            as :func:`chunked_distill_loss`.
        target_ids: (B, T, K) or (N, K) long teacher ids.
        target_values: same shape: teacher log-probs (``kind="topk"``) or sample weights (``kind="sampled"``).
        kind: a key of :data:`lightning_distill.sparse.SPARSE_DIVERGENCES` (``"topk"``, ``"sampled"``, ...).
        **params: passed as is to :func:`lightning_distill.sparse.sparse_per_token`: ``tail`` for ``"topk"``;
            ``divergence`` and its parameters.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars, equal to the unchunked sparse loss and CE on the logits.
    """

    def kd_fn(logits: Tensor, logp: Tensor, ids: Tensor, values: Tensor) -> Tensor:  # (C, V) x 2, (C, K) x 2
        return sparse_per_token(kind, logits, ids, values, temperature, logp, **params)  # (C,)

    use_kd = ce_weight != 1
    return _chunked(student_hidden, student_head, labels, kd_fn if use_kd else None,
                    (target_ids, target_values) if use_kd else (), ce_weight=ce_weight, temperature=temperature,
                    num_tokens=num_tokens, chunk_size=chunk_size, fused=fused, compiled=compiled)
