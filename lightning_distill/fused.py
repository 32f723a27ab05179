"""The fused head loss: each chunk's gradients computed in the forward pass, nothing recomputed in backward.

The engine under :mod:`lightning_distill.chunked` (which checks arguments and chooses the path): for each chunk of
rows, project by the head, take a local autograd pass over the per-token KD and CE functions to get the gradient
w.r.t. the chunk's logits (so every divergence works without a hand-written gradient), turn it into the gradients
of the hidden rows and of the head by two matmuls, keep only those, and drop the logits. Backward scales them by
the incoming gradient: the three head matmuls of the unchunked loss, as the chunked losses of Liger Kernel (Hsu et
al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training") do. The per-chunk function can be compiled
with ``torch.compile``; a compiler error warns and falls back to eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.losses import IGNORE_INDEX, NumTokens, cross_entropy_per_token, reduce_tokens

Head = nn.Module | Tensor  # an output layer (called), or its (V, H) weight
KDFn = Callable[..., Tensor]  # kd_fn(logits (C, V), student log-probs at T (C, V), *rows) -> (C,)

SUB_CHUNK_ELEMENTS = 2**22  # on CPU, logits per sub-chunk of the per-token part (16 MiB in float32), see fused_loop


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
