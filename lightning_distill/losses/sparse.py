"""Sparse teacher targets: the teacher's distribution kept on a few ids per position (top-k or sampled).

Pure torch. The label writer makes them (:func:`topk_teacher`, :func:`sample_teacher`) and the label store keeps
them; a :class:`SparseTargets` goes wherever teacher logits go (:func:`~lightning_distill.losses.distill.distill_loss`,
:func:`~lightning_distill.losses.distill.chunked_distill_loss`) and computes its own per-token loss:

- ``topk``: forward KL to the K most likely ids, or with ``tail="bucket"`` any divergence of
  :data:`lightning_distill.losses.divergences.DIVERGENCES` on the K ids + the rest (:func:`topk_forward_kl`);
- ``sampled``: the unbiased random-sampling estimate of the forward KL (:func:`sampled_kl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_distill.checks import require
from lightning_distill.losses.divergences import (
    Divergence,
    ForwardKL,
    NumTokens,
    get_divergence,
    kl,
    log_probs,
    reduce_tokens,
)

TAILS = ("renorm", "bucket")


# --------------------------------------------------------------------------------------------- making targets
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
    require(1 <= k <= teacher_logits.shape[-1], "k", k, f"in [1, {teacher_logits.shape[-1]}]")
    require(temperature > 0, "temperature", temperature, "> 0")
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
    require(num_samples >= 1, "num_samples", num_samples, ">= 1")
    probs = log_probs(teacher_logits, temperature).exp()  # (N, V)
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


# ------------------------------------------------------------------------------------------ per-token losses
def _topk_kl(student_logp: Tensor, ids: Tensor, logprobs: Tensor, tail: str, divergence: Divergence) -> Tensor:
    """A divergence to a top-k teacher: (N, V), (N, K), (N, K) -> (N,); see :func:`topk_forward_kl`.

    ``tail="bucket"`` turns both sides into proper distributions over K + 1 outcomes, on which every divergence
    is defined (by data processing, each is at most its dense value). ``tail="renorm"`` leaves the teacher 0
    outside its K ids, where only the forward KL stays finite and meaningful.
    """
    require(tail in TAILS, "tail", tail, "'renorm' or 'bucket'")
    student_k = student_logp.gather(-1, ids)  # (N, K)
    if tail == "renorm":
        require(isinstance(divergence, ForwardKL), "divergence", divergence,
              "'forward_kl' with tail='renorm' (use tail='bucket' for the other divergences)")
        return kl(torch.log_softmax(logprobs, dim=-1), student_k)
    if ids.shape[-1] == student_logp.shape[-1]:  # the (distinct) ids cover the vocabulary: there is no tail
        return divergence.per_token(student_k, logprobs)
    student_tail = _tail(student_logp, ids, student_k)  # (N, 1) log(1 - sum_k p_s(id_k))
    teacher_covered = logprobs.logsumexp(-1, keepdim=True)  # (N, 1) log sum_k q_k
    empty = teacher_covered >= 0  # a teacher tail below rounding
    teacher_tail = torch.log(-torch.expm1(teacher_covered.masked_fill(empty, -1)))  # (N, 1) log(1 - sum q)
    # masked_fill after the log: no NaN gradients. A real teacher's tail is never 0: the mode-seeking
    # divergences get the smallest positive mass instead, which keeps them finite.
    floor = -math.inf if isinstance(divergence, ForwardKL) else math.log(torch.finfo(logprobs.dtype).tiny)
    teacher_tail = teacher_tail.masked_fill(empty, floor)
    student_c = torch.cat([student_k, student_tail], -1)  # (N, K + 1)
    return divergence.per_token(student_c, torch.cat([logprobs, teacher_tail], -1))


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


def _sampled_ce(student_logp: Tensor, sample_ids: Tensor, sample_weights: Tensor, tail: str,
                divergence: Divergence) -> Tensor:
    """Cross-entropy to a sparse empirical teacher: (N, V), (N, S), (N, S) -> (N,). See :func:`sampled_kl`.

    Only a divergence linear in the teacher (the forward KL) has an unbiased estimate from draws."""
    require(divergence.linear_in_teacher, "divergence", divergence, "'forward_kl' with sampled targets (the only "
          "divergence linear in the teacher, hence estimated without bias from its draws)")
    return -(sample_weights * student_logp.gather(-1, sample_ids)).sum(-1)


def _sampled_token(student_logp: Tensor, ids: Tensor, teacher_logp: Tensor, tail: str,
                   divergence: Divergence) -> Tensor:
    """On-policy distillation from the teacher's log-prob of each token the student sampled: (N, V), (N, 1),
    (N, 1) -> (N,).

    The per-token reverse-KL estimate k = log p_s(x) - log p_t(x), x ~ p_s, is a negative advantage (reward
    log p_t - log p_s, discount 0; "On-Policy Distillation", Thinking Machines 2025; the policy gradient of MiniLLM,
    Gu et al. 2024): the value returned is k, its gradient k * grad log p_s(x) (REINFORCE), whose expectation is the
    gradient of the reverse KL at that position. Gradient flows only through the student's log-prob of its own token.
    """
    student_x = student_logp.gather(-1, ids)  # (N, 1)
    estimate = (student_x - teacher_logp).detach()  # (N, 1)
    surrogate = estimate * student_x  # gradient: estimate * grad log p_s(x)
    return (estimate + surrogate - surrogate.detach()).sum(-1)


SPARSE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {"topk": _topk_kl, "sampled": _sampled_ce, "top1": _sampled_ce,
                                                        "tokens": _sampled_token}
"""Per-token sparse losses ``fn(student_logp (N, V), ids (N, K), values (N, K), tail, divergence) -> (N,)``;
``top1`` (the teacher's picks, weight 1) is the sampled loss of one sure draw: KL to a one-hot teacher, which is
the cross-entropy of its pick; ``tokens`` (the student's own tokens with the teacher's log-probs) is the on-policy
sampled-token loss."""


@dataclass(frozen=True)
class SparseTargets:
    """A teacher signal kept on a few ids per position, read from a label store.

    Passed wherever teacher logits go, it computes the sparse loss of its ``kind``. Indexing slices both
    tensors: ``targets[:, :-1]``.

    Attributes:
        kind: ``"topk"`` (values are teacher log-probs), ``"sampled"`` (values are sample weights), ``"top1"``
            (the teacher's picks, :meth:`from_picks`) or ``"tokens"`` (the next tokens of the sequence itself, values
            the teacher's log-probs of them: :meth:`from_token_logprobs`).
        ids: (B, T, K) long teacher ids.
        values: (B, T, K) float, aligned with ``ids``.
        tail: ``topk``: how the teacher's missing mass is treated, ``"bucket"`` or ``"renorm"``.
    """

    kind: str
    ids: Tensor
    values: Tensor
    tail: str = "bucket"

    def __post_init__(self) -> None:
        require(self.kind in SPARSE_DIVERGENCES, "kind", self.kind, f"one of {sorted(SPARSE_DIVERGENCES)}")
        require(self.ids.shape == self.values.shape, "values", tuple(self.values.shape),
              f"of shape {tuple(self.ids.shape)} (as ids)")
        require(self.tail in TAILS, "tail", self.tail, "'renorm' or 'bucket'")

    @classmethod
    def from_picks(cls, picks: Tensor) -> SparseTargets:
        """The teacher's chosen tokens (B, T) as a target: one id per position with weight 1 (hard labels)."""
        return cls("top1", picks.unsqueeze(-1), torch.ones_like(picks, dtype=torch.float32).unsqueeze(-1))

    @classmethod
    def from_token_logprobs(cls, input_ids: Tensor, teacher_logprobs: Tensor) -> SparseTargets:
        """The on-policy sampled-token target of sequences (B, T) the student wrote: at t, the token t + 1 and the
        teacher's log-prob of it (B, T) (the last position, which predicts nothing, holds a placeholder)."""
        following = input_ids.roll(-1, dims=1)  # (B, T)
        return cls("tokens", following.unsqueeze(-1), teacher_logprobs.float().unsqueeze(-1))

    def __getitem__(self, index: object) -> SparseTargets:
        return replace(self, ids=self.ids[index], values=self.values[index])

    def rows(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` flattened to (N, K)."""
        return self.ids.reshape(-1, self.ids.shape[-1]), self.values.reshape(-1, self.ids.shape[-1])

    def per_token(self, student_logp: Tensor, divergence: Divergence, temperature: float) -> Tensor:
        """The per-token loss from student log-probs (N, V) at ``temperature``: (N,), times ``temperature**2``."""
        ids, values = self.rows()  # (N, K) each
        require(ids.shape[0] == student_logp.shape[0], "target_ids", tuple(self.ids.shape),
              f"of {student_logp.shape[0]} rows (as the student's logits)")
        fn = SPARSE_DIVERGENCES[self.kind]
        return fn(student_logp, ids, values.to(student_logp.dtype), self.tail, divergence) * temperature**2


def sparse_per_token(kind: str, student_logits: Tensor, target_ids: Tensor, target_values: Tensor,
                     temperature: float = 1.0, student_logp: Tensor | None = None, *, tail: str = "renorm",
                     divergence: str | Divergence = "forward_kl") -> Tensor:
    """Per-token loss to a sparse target, multiplied by ``temperature**2``.

    Args:
        kind: ``"topk"`` (values are teacher log-probs, :func:`topk_forward_kl`) or ``"sampled"`` (values are
            weights, :func:`sampled_kl`).
        student_logits: (B, T, V) or (N, V).
        target_ids: (B, T, K) or (N, K) long.
        target_values: same shape as ``target_ids``, any float dtype.
        temperature: T > 0, the temperature the targets were made at.
        student_logp: the student's log-probs at ``temperature`` (N, V) when the caller already has them.
        tail: ``topk`` only, see :func:`topk_forward_kl`.
        divergence: a divergence or its name; ``forward_kl`` unless ``tail="bucket"``.

    Returns:
        (N,) per-token values in at least float32.
    """
    require(kind in SPARSE_DIVERGENCES, "kind", kind, f"one of {sorted(SPARSE_DIVERGENCES)}")
    rows = tuple(student_logits.shape[:-1])
    require(target_ids.shape[:-1] == rows, "target_ids", tuple(target_ids.shape), f"of shape ({rows}, K)")
    student_logp = log_probs(student_logits, temperature) if student_logp is None else student_logp  # (N, V)
    targets = SparseTargets(kind, target_ids, target_values, tail)
    return targets.per_token(student_logp, get_divergence(divergence), temperature)


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

    With K = V both equal the dense :class:`~lightning_distill.losses.divergences.ForwardKL`.

    Args:
        student_logits: (B, T, V) or (N, V).
        target_ids: (B, T, K) or (N, K) long, distinct per position.
        target_logprobs: same shape, teacher log-probs of those ids at ``temperature`` (not renormalized).
        labels, temperature, num_tokens: as the dense :class:`~lightning_distill.losses.divergences.ForwardKL`;
            ``temperature`` must be the writer's.
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
    gradient of the dense forward KL. Its value is not 0 at p_s = p_t (the teacher entropy remains).

    Args:
        student_logits: (B, T, V) or (N, V).
        sample_ids: (B, T, S) or (N, S) long; padding slots may hold any valid id.
        sample_weights: same shape, normalized counts summing to 1 per position, 0 in padding slots.
        labels, temperature, num_tokens: as the dense :class:`~lightning_distill.losses.divergences.ForwardKL`.
    """
    per_token = sparse_per_token("sampled", student_logits, sample_ids, sample_weights, temperature)
    return reduce_tokens(per_token, labels, num_tokens)


SPARSE_LOSSES: dict[str, Callable[..., Tensor]] = {"topk": topk_forward_kl, "sampled": sampled_kl}
"""The sparse-target losses by kind (keys of :data:`SPARSE_DIVERGENCES`)."""
