"""The distillation loss of a batch: ``loss = (1 - ce_weight) * KD + ce_weight * CE``, from logits or from hidden
states chunk by chunk, never holding the (B*T, V) logits.

Pure torch, no Lightning. The teacher side of the loss is one of three things (what a teacher signal gives):

- logits (B, T, V);
- :class:`TeacherHidden`: the teacher's final hidden states and its output head, whose logits are made only where
  the loss needs them (chunk by chunk);
- :class:`~lightning_distill.losses.sparse.SparseTargets`: a few ids per position (stored top-k or sampled labels,
  the teacher's picks), which computes its own per-token loss.

:func:`distill_loss` takes the student's logits. :func:`chunked_distill_loss` takes its hidden states and output head:
the student's vocabulary projection is where memory goes (for SmolLM2, V = 49152, H = 576, the float32 logits of one
4 x 256 batch take 200 MB, and softmax, log-softmax and their gradients multiply that several times), so the
N = B*T rows are taken ``chunk_size`` at a time, projected by the head, turned into per-token losses by the functions
of :mod:`~lightning_distill.losses.divergences`, and dropped: peak memory O(chunk_size * V) instead of O(N * V).

- fused (the default, :func:`fused_loop`): the forward pass computes each chunk's gradient w.r.t. its logits right
  away (a local autograd pass over the per-token functions, so every divergence works without a hand-written
  gradient), turns it into the gradients of the hidden rows and of the head weight by two matmuls and keeps only
  those; backward scales them by the incoming gradient. The three head matmuls of the unchunked loss, nothing
  recomputed: the chunked losses of Liger Kernel (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM
  Training"). The normalizer (valid tokens, or ``num_tokens``) is known before the loop, so each chunk's gradient is
  scaled exactly. The per-chunk function can be compiled with ``torch.compile``; a compiler error warns and falls
  back to eager.
- checkpointed (``fused=False``, evaluation, and the fallback for other head modules and for a teacher that is
  trained): each chunk under :func:`torch.utils.checkpoint.checkpoint`, recomputed in backward (torchtune).

Both equal :func:`distill_loss` on ``head(hidden)`` (tested): same per-token functions, same masking (``-100``) and
normalization (valid tokens, or ``num_tokens``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_distill.checks import require
from lightning_distill.losses.divergences import (
    IGNORE_INDEX,
    Divergence,
    NumTokens,
    cross_entropy,
    cross_entropy_per_token,
    divergence_per_token,
    get_divergence,
    log_probs,
    reduce_tokens,
)
from lightning_distill.losses.sparse import SparseTargets

Head = nn.Module | Tensor  # an output layer (called), or its (V, H) weight
KDFn = Callable[..., Tensor]  # kd_fn(logits (C, V), student log-probs at T (C, V), *rows) -> (C,)

DEFAULT_CHUNK_SIZE = 256
"""Rows per chunk. Measured with ``benchmarks/speed.py`` (2 quiet CPU cores, V = 49152, H = 576, 4096 rows,
float32, the fused path, 2026-11-30): 128 / 256 / 512 rows took 1.04 / 0.97 / 0.90 x and 0.78 / 0.71 / 0.70 x the
time of the unchunked loss (two runs) at 0.046 / 0.063 / 0.128 x and 0.036 / 0.054 / 0.112 x its peak memory; 256 is
the largest within 1/8 of it in every run."""

SUB_CHUNK_ELEMENTS = 2**22  # on CPU, logits per sub-chunk of the per-token part (16 MiB in float32), see fused_loop


@dataclass(frozen=True)
class TeacherHidden:
    """The teacher's final hidden states with its output head: its logits, made only where the loss needs them.

    Attributes:
        hidden: (B, T, H_t) hidden states after the teacher's final norm.
        head: the teacher's output layer (V, H_t), or its (V, H_t) weight.
    """

    hidden: Tensor
    head: Head

    def __getitem__(self, index: object) -> TeacherHidden:
        return replace(self, hidden=self.hidden[index])

    def logits(self) -> Tensor:
        """The full logits (..., V): what the unchunked loss and validation use."""
        return project(self.head, self.hidden)


Teacher = Tensor | TeacherHidden | SparseTargets
"""The teacher side of a loss, aligned with the student's rows (see the module docstring)."""


# ------------------------------------------------------------------------------------------ from logits
def distill_loss(student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *,
                 divergence: str | Divergence = "forward_kl", ce_weight: float = 0.0, temperature: float = 1.0,
                 num_tokens: NumTokens = None) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` on full logits; the same from hidden states,
    never holding (N, V) logits, is :func:`chunked_distill_loss`.

    Args:
        student_logits: (B, T, V) or (N, V).
        teacher: teacher logits of the same shape, :class:`TeacherHidden` (its logits are made here), or sparse
            targets; may be ``None`` when ``ce_weight == 1``.
        labels: (B, T) or (N,) CE targets and mask (``-100``); may be ``None`` when ``ce_weight == 0``.
        divergence: a :class:`~lightning_distill.losses.divergences.Divergence` or its name.
        ce_weight: in [0, 1]; the term with weight 0 is skipped and returned as 0.
        temperature: KD temperature (CE always uses T = 1).
        num_tokens: normalizer of both terms, as in :func:`~lightning_distill.losses.divergences.reduce_tokens`.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars.
    """
    require(0 <= ce_weight <= 1, "ce_weight", ce_weight, "in [0, 1]")
    divergence = get_divergence(divergence)
    zero = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    kd = ce = zero
    student_logp = None
    if ce_weight < 1:
        require(teacher is not None, "teacher", None, "logits, TeacherHidden or SparseTargets when ce_weight < 1")
        teacher = teacher.logits() if isinstance(teacher, TeacherHidden) else teacher
        student_logp = log_probs(student_logits, temperature)  # (N, V), shared with CE at T = 1
        if isinstance(teacher, SparseTargets):  # a sparse target computes its own loss
            per_token = teacher.per_token(student_logp, divergence, temperature)
        else:
            per_token = divergence_per_token(divergence, student_logits, teacher, temperature,
                                             student_logp=student_logp)
        kd = reduce_tokens(per_token, labels, num_tokens)
    if ce_weight > 0:
        require(labels is not None, "labels", None, "a tensor when ce_weight > 0")
        if student_logp is not None and temperature == 1:  # one log-softmax pass (and its backward) for both
            per_token = F.nll_loss(student_logp, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
            ce = reduce_tokens(per_token, labels, num_tokens)
        else:
            ce = cross_entropy(student_logits, labels, num_tokens=num_tokens)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}


# ---------------------------------------------------------------------------- from hidden states, chunked
def chunked_distill_loss(
    student_hidden: Tensor,
    student_head: Head,
    teacher: Teacher | None,
    labels: Tensor | None,
    *,
    divergence: str | Divergence = "forward_kl",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    num_tokens: NumTokens = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fused: bool = True,
    compiled: bool | None = None,
) -> dict[str, Tensor]:
    """``loss = (1 - ce_weight) * KD + ce_weight * CE(labels)`` from hidden states, ``chunk_size`` rows at a
    time, with the gradients computed in the forward pass (``fused``).

    A :class:`TeacherHidden` teacher's logits are made chunk by chunk too (under no grad: (N, V) teacher logits are
    never held). Gradients reach whatever requires them: a frozen teacher (``requires_grad=False``) records no
    graph; a trained one (co-distillation) gets gradients, through the checkpointed path.

    Args:
        student_hidden: (B, T, H) or (N, H) final hidden states of the student (after its last norm), any float
            dtype (bf16 under autocast: softmax in float32, gradients in the input dtype).
        student_head: the output layer (``model.get_output_embeddings()``, an ``nn.Linear``, possibly tied to
            the input embedding), or its (V, H) weight. Another module type takes the checkpointed path.
        teacher: logits (B, T, V) / (N, V), :class:`TeacherHidden` (hidden (B, T, H_t) and head), or
            :class:`~lightning_distill.losses.sparse.SparseTargets` (B, T, K); ``None`` when ``ce_weight == 1``.
        labels: (B, T) or (N,) CE targets and mask (``-100``), already aligned with the hidden states; may be
            ``None`` when ``ce_weight == 0``.
        divergence: a :class:`~lightning_distill.losses.divergences.Divergence` or its name.
        ce_weight: in [0, 1]; a term with weight 0 is skipped and returned as 0 (at 1 the teacher is unused).
        temperature: KD temperature > 0 (CE uses T = 1).
        num_tokens: normalizer of both terms instead of the valid-token count (gradient accumulation).
        chunk_size: rows per chunk, >= 1; memory grows as ``chunk_size * V``.
        fused: gradients in the forward pass (default); ``False``: the checkpointed path (recomputes each chunk
            in backward).
        compiled: ``torch.compile`` the fused per-chunk loss and gradient; ``None``: on CUDA only. A compiler
            failure warns and falls back to eager.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars (``kd`` and ``ce`` detached on the fused path), equal to
        :func:`distill_loss` on the logits.
    """
    divergence = get_divergence(divergence)
    require(ce_weight == 1 or teacher is not None, "teacher", None, "logits, TeacherHidden or SparseTargets when "
            "ce_weight < 1")
    settings = dict(ce_weight=ce_weight, temperature=temperature, num_tokens=num_tokens, chunk_size=chunk_size,
                    fused=fused, compiled=compiled)
    if ce_weight == 1:
        return _chunked(student_hidden, student_head, labels, None, (), **settings)
    if isinstance(teacher, SparseTargets):
        def sparse_fn(logits: Tensor, logp: Tensor, ids: Tensor, values: Tensor) -> Tensor:  # (C, V) x 2, (C, K) x 2
            return SparseTargets(teacher.kind, ids, values, teacher.tail).per_token(logp, divergence, temperature)

        return _chunked(student_hidden, student_head, labels, sparse_fn, (teacher.ids, teacher.values), **settings)

    def dense_fn(logits: Tensor, logp: Tensor, teacher_rows: Tensor) -> Tensor:  # (C, V) x 3 -> (C,)
        return divergence_per_token(divergence, logits, teacher_rows, temperature, student_logp=logp)

    if isinstance(teacher, TeacherHidden):
        return _chunked(student_hidden, student_head, labels, dense_fn, (teacher.hidden,), teacher.head, **settings)
    return _chunked(student_hidden, student_head, labels, dense_fn, (teacher,), **settings)


def _chunked(hidden: Tensor, head: Head, labels: Tensor | None, kd_fn: KDFn | None, kd_inputs: tuple[Tensor, ...],
             teacher_head: Head | None = None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
             chunk_size: int, fused: bool, compiled: bool | None) -> dict[str, Tensor]:
    """Check the arguments, flatten the rows and run the fused loop; or the checkpointed one when ``fused`` is
    False, the head is not fusable (:func:`fusable`), nothing on the student side needs a gradient (evaluation),
    or the teacher side would receive gradients. With ``teacher_head``, ``kd_inputs[0]`` are teacher hidden states
    (N, H_t), projected chunk by chunk."""
    require(0 <= ce_weight <= 1, "ce_weight", ce_weight, "in [0, 1]")
    require(chunk_size >= 1, "chunk_size", chunk_size, ">= 1")
    require(temperature > 0, "temperature", temperature, "> 0")
    require(ce_weight == 0 or labels is not None, "labels", labels, "a tensor when ce_weight > 0")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = None if labels is None else labels.reshape(-1)  # (N,)
    rows = [x.reshape(h.shape[0], x.shape[-1]) for x in kd_inputs]  # each (N, V), (N, H_t) or (N, K)
    kwargs = dict(ce_weight=ce_weight, temperature=temperature, num_tokens=num_tokens, chunk_size=chunk_size)
    if (fused and fusable(head) and requires_grad(h, head)
            and not (kd_fn is not None and requires_grad(teacher_head, *kd_inputs))):
        return fused_loop(h, head, y, kd_fn, rows, teacher_head, compiled=h.is_cuda if compiled is None else compiled,
                      **kwargs)
    return _checkpointed(h, head, y, kd_fn, rows, teacher_head, **kwargs)



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



# --------------------------------------------------------------------------------------- the fused engine
def project(head: Head, hidden: Tensor) -> Tensor:
    """Logits (C, V) of hidden states (C, H). A module is called (so the hooks of wrappers such as FSDP run);
    a tensor is used as a bias-free (V, H) weight."""
    return head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)


def per_token_terms(logits: Tensor, y: Tensor | None, kd_fn: KDFn | None, kd_rows: tuple[Tensor, ...],
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


def chunk_grad(logits: Tensor, y: Tensor | None, valid: Tensor | None, w_kd: Tensor, w_ce: Tensor,
                kd_fn: KDFn | None, kd_rows: tuple[Tensor, ...], ce_weight: float, temperature: float,
                functional: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The gradient (C, V) of a chunk's contribution ``w_kd * sum KD + w_ce * sum CE`` (valid rows) to the loss
    w.r.t. its logits (C, V), in the logits' dtype, and the per-token KD and CE (C,) (``None`` when skipped).

    A local autograd pass over :func:`per_token_terms`, so that every divergence works without a hand-written
    gradient: ``torch.autograd.grad`` on a small graph (works under saved-tensor hooks such as activation
    offloading), or, when ``functional`` (for ``torch.compile``), ``torch.func.grad_and_value``."""

    def total(z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kd, ce = per_token_terms(z, y, kd_fn, kd_rows, ce_weight, temperature)  # (C,), (C,)
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


_COMPILED: dict[str, Any] = {}  # "fn": the compiled chunk_grad (made on first use); "failed": True after an error


def chunk_grad_fn(compiled: bool) -> Callable[..., tuple[Tensor, Tensor | None, Tensor | None]]:
    """:func:`chunk_grad`, or its ``torch.compile`` (made once per process), guarded: a compiler error costs a
    warning and the eager path, not the run."""
    if compiled and "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(chunk_grad)

    def guarded(*args: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if not _COMPILED.get("failed"):
            try:
                return _COMPILED["fn"](*args, True)
            except Exception as error:  # torch.compile raises many kinds of errors
                warnings.warn(f"torch.compile of the fused loss failed, using eager: {error!r}", stacklevel=2)
                _COMPILED["failed"] = True
        return chunk_grad(*args)

    return guarded if compiled else chunk_grad


def fusable(head: Head) -> bool:
    """Whether the fused path can route the head's gradient: a plain tensor, or an ``nn.Linear`` (tied to the
    embedding or not) with the stock ``forward`` and plain parameters (not FSDP2's sharded DTensors)."""
    if isinstance(head, Tensor):
        return type(head) in (Tensor, nn.Parameter)
    return (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
            and all(type(p) is nn.Parameter for p in head.parameters()))


def requires_grad(*xs: Head | Tensor | None) -> bool:
    """Whether any of these tensors / modules' parameters would receive a gradient here."""
    tensors = [p for x in xs if isinstance(x, nn.Module) for p in x.parameters()]
    tensors += [x for x in xs if isinstance(x, Tensor)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FusedHeadLoss(torch.autograd.Function):
    """``loss, kd, ce = apply(hidden (N, H), weight (V, H), bias (V,) | None, run)``: ``run`` (:func:`fused_loop`)
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


def fused_loop(h: Tensor, head: Head, y: Tensor | None, kd_fn: KDFn | None, rows: list[Tensor],
           teacher_head: Head | None, *, ce_weight: float, temperature: float, num_tokens: NumTokens,
           chunk_size: int, compiled: bool) -> dict[str, Tensor]:
    """The fused loop over chunks of the rows of ``h`` (N, H), inside :class:`FusedHeadLoss`; see the module
    docstring. On CPU the per-token part of a chunk runs on sub-chunks of at most :data:`SUB_CHUNK_ELEMENTS`
    logits, while the matmuls keep ``chunk_size`` rows: buffers under glibc's largest mmap threshold (32 MiB) are
    reused from its heap, a larger one is a fresh ``mmap`` whose page faults cost as much as the arithmetic
    (measured: 4x less system time). 16 MiB rather than 32: less memory, a little more time when other jobs share
    the cores (an OpenMP thread spins at the end of each operation while the other waits for a core)."""
    weight, bias = (head, None) if isinstance(head, Tensor) else (head.weight, head.bias)
    need_h, need_w, need_b = (t is not None and requires_grad(t) for t in (h, weight, bias))
    grad_of_chunk = chunk_grad_fn(compiled)

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
        sub = chunk_size if h.is_cuda else max(1, min(chunk_size, SUB_CHUNK_ELEMENTS // weight.shape[0]))
        for start in range(0, h.shape[0], chunk_size):
            h_c = h[start:start + chunk_size]  # (C, H)
            logits = project(head, h_c)  # (C, V)
            kd_rows = [x[start:start + chunk_size] for x in rows]  # (C, V), (C, H_t) or (C, K) x 2
            if teacher_head is not None and kd_fn is not None:
                kd_rows[0] = project(teacher_head, kd_rows[0])  # (C, V)
            g = logits.new_empty(logits.shape) if g is None else g[:len(logits)]  # (C, V)
            for s in range(0, len(logits), sub):  # sub-chunks of S rows
                stop = min(s + sub, len(logits))
                part = slice(start + s, start + stop)
                y_s, v_s = (None if t is None else t[part] for t in (y, valid))
                g[s:stop], kd, ce = grad_of_chunk(logits[s:stop], y_s, v_s, w_kd, w_ce, kd_fn,  # writes g[s:stop]
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

    loss, kd, ce = FusedHeadLoss.apply(h, weight, bias, run)
    return {"loss": loss, "kd": kd, "ce": ce}
