"""Distillation losses from hidden states, chunk by chunk, never holding the (B*T, V) logits.

The student's vocabulary projection is where memory goes: for SmolLM2 (V = 49152, H = 576) the float32 logits of
one 4 x 256 batch take 200 MB, and softmax, log-softmax and their gradients multiply that several times. Here the
N = B*T rows are taken ``chunk_size`` at a time, projected by the head, turned into per-token losses by the
functions of :mod:`lightning_distill.losses`, and dropped: peak memory O(chunk_size * V) instead of O(N * V).

- fused (the default, :class:`_FusedHeadLoss`): the forward pass computes each chunk's gradient w.r.t. its
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

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_distill import losses
from lightning_distill.losses import IGNORE_INDEX, NumTokens, cross_entropy_per_token, reduce_tokens
from lightning_distill.sparse import SparseTargets, sparse_per_token

Head = nn.Module | Tensor  # an output layer (called), or its (V, H) weight
KDFn = Callable[..., Tensor]  # kd_fn(logits (C, V), student log-probs at T (C, V), *rows) -> (C,)

DEFAULT_CHUNK_SIZE = 256
"""Rows per chunk. Measured with ``benchmarks/speed.py`` (2 CPU cores shared with other jobs, V = 49152, H = 576,
4096 rows, float32): 128 / 256 / 512 rows took 1.09 / 0.97 / 0.95 x the time of the unchunked loss at 0.075 /
0.10 / 0.13 x its peak memory; 256 is the largest within 1/8 of it."""
_SUB_CHUNK_ELEMENTS = 2**22  # on CPU, logits per sub-chunk of the per-token part (16 MiB in float32), see _fused


def _project(head: Head, hidden: Tensor) -> Tensor:
    """Logits (C, V) of hidden states (C, H). A module is called (so the hooks of wrappers such as FSDP run);
    a tensor is used as a bias-free (V, H) weight."""
    return head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)


def _per_token(logits: Tensor, y: Tensor | None, kd_fn: KDFn | None, kd_rows: tuple[Tensor, ...],
               ce_weight: float, temperature: float) -> tuple[Tensor | None, Tensor | None]:
    """Per-token KD and CE (C,) of a chunk's logits (C, V); a skipped term is ``None``. The student's
    log-softmax is taken once, in at least float32, and shared by KD and CE when ``temperature == 1``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (C, V)
    logp = kd = ce = None
    if kd_fn is not None:
        logp = torch.log_softmax(z if temperature == 1 else z / temperature, dim=-1)  # (C, V)
        kd = kd_fn(z, logp, *kd_rows)  # (C,)
    if ce_weight > 0:
        if logp is not None and temperature == 1:
            ce = F.nll_loss(logp, y, ignore_index=IGNORE_INDEX, reduction="none")  # (C,)
        else:
            ce = cross_entropy_per_token(z, y)  # (C,)
    return kd, ce


def _chunk_grad(logits: Tensor, y: Tensor | None, valid: Tensor | None, w_kd: Tensor, w_ce: Tensor,
                kd_fn: KDFn | None, kd_rows: tuple[Tensor, ...], ce_weight: float, temperature: float,
                functional: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The gradient (C, V) of a chunk's contribution ``w_kd * sum KD + w_ce * sum CE`` (valid rows) to the loss
    w.r.t. its logits (C, V), in the logits' dtype, and the per-token KD and CE (C,) (``None`` when skipped).

    A local autograd pass over :func:`_per_token`, so that every divergence works without a hand-written
    gradient: ``torch.autograd.grad`` on a small graph (works under saved-tensor hooks such as activation
    offloading), or, when ``functional`` (for ``torch.compile``), ``torch.func.grad_and_value``."""

    def total(z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kd, ce = _per_token(z, y, kd_fn, kd_rows, ce_weight, temperature)  # (C,), (C,)
        terms = {k: (t, w) for k, t, w in (("kd", kd, w_kd), ("ce", ce, w_ce)) if t is not None}
        loss = sum((t if valid is None else torch.where(valid, t, 0.0)).sum() * w for t, w in terms.values())
        return loss, {k: t.detach() for k, (t, _) in terms.items()}  # no None in an aux output

    if functional:
        grad, (_, per_token) = torch.func.grad_and_value(total, has_aux=True)(logits)
    else:
        with torch.enable_grad():
            z = logits.detach().requires_grad_()  # (C, V)
            loss, per_token = total(z)
            grad = torch.autograd.grad(loss, z)[0]  # (C, V)
    return grad, per_token.get("kd"), per_token.get("ce")


_COMPILED: dict[str, Any] = {}  # "fn": the compiled _chunk_grad (made on first use); "failed": True after an error


def _chunk_grad_fn(compiled: bool) -> Callable[..., tuple[Tensor, Tensor | None, Tensor | None]]:
    """:func:`_chunk_grad`, or its ``torch.compile`` (made once per process), guarded: a compiler error costs a
    warning and the eager path, not the run."""
    if compiled and "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_chunk_grad)

    def guarded(*args: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if not _COMPILED.get("failed"):
            try:
                return _COMPILED["fn"](*args, True)
            except Exception as error:  # torch.compile raises many kinds of errors
                warnings.warn(f"torch.compile of the fused loss failed, using eager: {error!r}", stacklevel=2)
                _COMPILED["failed"] = True
        return _chunk_grad(*args)

    return guarded if compiled else _chunk_grad


def _fusable(head: Head) -> bool:
    """Whether the fused path can route the head's gradient: a plain tensor, or an ``nn.Linear`` (tied to the
    embedding or not) with the stock ``forward`` and plain parameters (not FSDP2's sharded DTensors)."""
    if isinstance(head, Tensor):
        return type(head) in (Tensor, nn.Parameter)
    return (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
            and all(type(p) is nn.Parameter for p in head.parameters()))


def _requires_grad(*xs: Head | Tensor | None) -> bool:
    """Whether any of these tensors / modules' parameters would receive a gradient here."""
    tensors = [p for x in xs if isinstance(x, nn.Module) for p in x.parameters()]
    tensors += [x for x in xs if isinstance(x, Tensor)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _FusedHeadLoss(torch.autograd.Function):
    """``loss, kd, ce = apply(hidden (N, H), weight (V, H), bias (V,) | None, run)``: ``run`` (:func:`_fused`)
    gives the loss terms and the loss's gradients w.r.t. the three tensors, which backward scales."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                run: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, Tensor, Tensor]:
        loss, kd, ce, grad_h, grad_w, grad_b = run()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        return (*(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors), None)


def _fused(h: Tensor, head: Head, y: Tensor | None, kd_fn: KDFn | None, rows: list[Tensor],
           teacher_head: Head | None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
           chunk_size: int, compiled: bool) -> dict[str, Tensor]:
    """The fused loop over chunks of the rows of ``h`` (N, H), inside :class:`_FusedHeadLoss`; see the module
    docstring. On CPU the per-token part of a chunk runs on sub-chunks of at most :data:`_SUB_CHUNK_ELEMENTS`
    logits, while the matmuls keep ``chunk_size`` rows: buffers under glibc's largest mmap threshold (32 MiB) are
    reused from its heap, a larger one is a fresh ``mmap`` whose page faults cost as much as the arithmetic
    (measured: 4x less system time). 16 MiB rather than 32: less memory, a little more time when other jobs share
    the cores (an OpenMP thread spins at the end of each operation while the other waits for a core)."""
    weight, bias = (head, None) if isinstance(head, Tensor) else (head.weight, head.bias)
    need_h, need_w, need_b = (t is not None and _requires_grad(t) for t in (h, weight, bias))
    chunk_grad = _chunk_grad_fn(compiled)

    def run() -> tuple[Tensor | None, ...]:
        acc = torch.promote_types(h.dtype, torch.float32)  # dtype of the loss terms and of the accumulators
        valid = None if y is None else y != IGNORE_INDEX  # (N,)
        count = num_tokens if num_tokens is not None else h.shape[0] if valid is None else valid.sum()
        denom = torch.as_tensor(count, device=h.device).clamp(min=1).to(acc)  # as in reduce_tokens
        w_kd, w_ce = (1 - ce_weight) / denom, ce_weight / denom
        kd_tok, ce_tok = h.new_zeros((2, h.shape[0]), dtype=acc)  # (N,) each: per-token values of the terms
        grad_h = torch.empty_like(h) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None  # (V, H)
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None  # (V,)
        g = None  # the (C, V) gradient buffer, one for all chunks
        sub = chunk_size if h.is_cuda else max(1, min(chunk_size, _SUB_CHUNK_ELEMENTS // weight.shape[0]))
        for start in range(0, h.shape[0], chunk_size):
            h_c = h[start:start + chunk_size]  # (C, H)
            logits = _project(head, h_c)  # (C, V)
            kd_rows = [x[start:start + chunk_size] for x in rows]  # (C, V), (C, H_t) or (C, K) x 2
            if teacher_head is not None and kd_fn is not None:
                kd_rows[0] = _project(teacher_head, kd_rows[0])  # (C, V)
            g = logits.new_empty(logits.shape) if g is None else g[:len(logits)]  # (C, V)
            for s in range(0, len(logits), sub):  # sub-chunks of S rows
                stop = min(s + sub, len(logits))
                part = slice(start + s, start + stop)
                y_s, v_s = (None if t is None else t[part] for t in (y, valid))
                g[s:stop], kd, ce = chunk_grad(logits[s:stop], y_s, v_s, w_kd, w_ce, kd_fn,  # g[s:stop] is written
                                               tuple(x[s:stop] for x in kd_rows), ce_weight, temperature)
                for tok, t in ((kd_tok, kd), (ce_tok, ce)):  # (S,) each
                    if t is not None:
                        tok[part] = t
            if need_h:  # under autocast, bf16 matmuls with autocast's cached bf16 weight, as the dense backward
                grad_h[start:start + chunk_size] = g @ weight  # (C, H)
            if need_w and grad_w.dtype == g.dtype == h_c.dtype:
                grad_w.addmm_(g.T, h_c)  # (V, H)
            elif need_w:
                grad_w += g.T @ h_c  # (V, H) in the compute dtype (autocast), accumulated in float32
            if need_b:
                grad_b += g.sum(0)  # (V,)
        kd = reduce_tokens(kd_tok, y, num_tokens) if kd_fn is not None else h.new_zeros((), dtype=acc)
        ce = reduce_tokens(ce_tok, y, num_tokens) if ce_weight > 0 else h.new_zeros((), dtype=acc)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return (1 - ce_weight) * kd + ce_weight * ce, kd, ce, grad_h, grad_w, grad_b

    loss, kd, ce = _FusedHeadLoss.apply(h, weight, bias, run)
    return {"loss": loss, "kd": kd, "ce": ce}


def _checkpointed(h: Tensor, head: Head, y: Tensor | None, kd_fn: KDFn | None, rows: list[Tensor],
                  teacher_head: Head | None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
                  chunk_size: int) -> dict[str, Tensor]:
    """The checkpointed loop (also evaluation under no grad): per-token values of each chunk under non-reentrant
    checkpointing (only the sliced inputs are kept; backward recomputes the chunk), then reduced."""

    def chunk(h_c: Tensor, y_c: Tensor | None, *kd_c: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if teacher_head is not None and kd_fn is not None:
            kd_c = (_project(teacher_head, kd_c[0]),)  # (C, V)
        return _per_token(_project(head, h_c), y_c, kd_fn, kd_c, ce_weight, temperature)  # (C,), (C,)

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
    False, the head is not fusable (:func:`_fusable`), nothing on the student side needs a gradient (evaluation),
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
    if (fused and _fusable(head) and _requires_grad(h, head)
            and not (kd_fn is not None and _requires_grad(teacher_head, *kd_inputs))):
        return _fused(h, head, y, kd_fn, rows, teacher_head, compiled=h.is_cuda if compiled is None else compiled,
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
