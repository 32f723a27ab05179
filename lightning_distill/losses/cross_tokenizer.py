"""Losses between a student and a teacher whose tokenizers differ: the two distributions cover different
vocabularies and different positions, so no divergence can compare them id by id.

Both are first brought onto the same text spans (:mod:`lightning_distill.alignment` finds them): a span is a run of
student tokens ``[s0, s1)`` and a run of teacher tokens ``[t0, t1)`` spelling the same bytes. Each side's span
distribution is merged as TRL's GOLD does (``ULDLoss._merge_probabilities_with_alignment_groups``): the
distribution that predicts the span's first token, times the model's probability of each later token of the span
given the ones before (a scalar per span, the chain rule on the tokens actually there)::

    m(y) = p(y | x_<s0) * prod_{j = s0 + 1}^{s1 - 1} p(x_j | x_<j)

(unnormalized when the span has several tokens: its mass is the probability of the rest of the span). Then, per
span:

- :class:`ULD`, Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss for LLMs"): both vectors sorted in decreasing order, the shorter padded with
  zeros, and the L1 distance between them (:func:`uld_distance`), the closed form of the Wasserstein distance with
  a uniform cost between any two tokens. No vocabulary is aligned: it matches the shape of the distributions.
  (The paper pairs the i-th student and teacher positions; here, as in TRL's ``use_extended_uld``, the pairs are the
  spans, so a block's tokens never drift apart.)
- :class:`GOLD`, a GOLD-style hybrid (TRL's ``uld_use_hybrid_loss``): on the tokens both vocabularies share (the
  same text; :meth:`~lightning_distill.alignment.Aligner.shared`) the exact forward KL, on the rest ULD. The KL is
  taken between the two distributions coarse-grained to the shared ids plus one bucket holding the rest of each
  side's mass (its other tokens, and for a merged span what the span's later tokens leave), as top-k stores'
  ``tail="bucket"`` does: a proper KL, 0 exactly when both agree on every shared token. (TRL takes a JSD of the
  shared probabilities as they are, and by default weights the two parts by the share of the teacher's vocabulary
  that is matched; here both weights are 1 unless given.)

Conventions (those of :mod:`~lightning_distill.losses.divergences` where they apply): logits of any float dtype,
softmax in at least float32 (float64 stays float64), both logits divided by the temperature, the KL part times
``T**2``; the value is the mean over the spans whose first student token is a valid target (label != -100), exactly
0 (attached to the graph) when there is none. Pure torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_distill.checks import require
from lightning_distill.losses.divergences import IGNORE_INDEX, Parameters, cross_entropy, kl, log_probs


@dataclass(frozen=True)
class AlignedTeacher:
    """The teacher's side of a cross-tokenizer batch (what :class:`~lightning_distill.signals.CrossTokenizerTeacher`
    gives): its logits on its own tokenization of each block, and the spans both tokenizations share.

    Attributes:
        logits: (B, U, V_t) the teacher's logits on ``teacher_ids`` (position u predicts teacher token u + 1).
        teacher_ids: (B, U) long, the teacher's tokens of each block (right-padded).
        spans: (G, 5) long, ``(block, s0, s1, t0, t1)``: student tokens ``[s0, s1)`` and teacher tokens
            ``[t0, t1)`` of block ``block`` spell the same bytes; ``s0 >= 1`` and ``t0 >= 1``.
        shared: (M, 2) long, ``(teacher id, student id)`` of the tokens both vocabularies share.
    """

    logits: Tensor
    teacher_ids: Tensor
    spans: Tensor
    shared: Tensor


def merged_log_probs(logits: Tensor, next_ids: Tensor, block: Tensor, start: Tensor, stop: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Each span's merged distribution, as normalized log-probs and a log-scale (GOLD's merge, in log space).

    Args:
        logits: (B, N, V), row p predicting token p + 1 (already shifted: ``model(ids).logits[:, :-1]``).
        next_ids: (B, N) long, the token each row predicts (``ids[:, 1:]``).
        block, start, stop: (G,) long, each span's block and its tokens ``[start, stop)`` (``start >= 1``).
        temperature: both the distribution and the later tokens' probabilities are taken at it.

    Returns:
        ``log_p`` (G, V), the log-softmax of row ``start - 1`` (which predicts the span's first token), and
        ``log_scale`` (G,), the summed log-prob of the span's later tokens (0 for a one-token span): the merged
        vector is ``exp(log_p + log_scale[:, None])``.
    """
    B, N, V = logits.shape
    logp = log_probs(logits, temperature).view(B, N, V)  # (B, N, V)
    following = logp.gather(-1, next_ids.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)  # (B, N)
    before = torch.cat([following.new_zeros(B, 1), following.cumsum(1)], dim=1)  # (B, N + 1): sum of rows < n
    log_scale = before[block, stop - 1] - before[block, start]  # rows start .. stop - 2: tokens start + 1 .. stop - 1
    return logp[block, start - 1], log_scale


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD's distance per row: ``sum_i |sort(p_s)_i - sort(p_t)_i|``, both sorted in decreasing order and the
    shorter padded with zeros: (G, V_s), (G, V_t) -> (G,).

    Only the top ``min(V_s, V_t)`` of each are sorted (``topk``): past them the padded side is 0, so the rest adds
    the longer side's remaining mass, exactly."""
    k = min(student_probs.shape[-1], teacher_probs.shape[-1])
    top_s, top_t = student_probs.topk(k, dim=-1).values, teacher_probs.topk(k, dim=-1).values  # (G, k) each
    rest = (student_probs.sum(-1) - top_s.sum(-1)) + (teacher_probs.sum(-1) - top_t.sum(-1))  # one of them is 0
    return (top_s - top_t).abs().sum(-1) + rest


CROSS_TOKENIZER_LOSSES: dict[str, type[CrossTokenizerLoss]] = {}
"""Every :class:`CrossTokenizerLoss` subclass by its ``name``."""


class CrossTokenizerLoss(Parameters):
    """A loss between the span distributions of a student and a teacher with different tokenizers. Subclasses set
    ``name`` (which registers them) and :meth:`per_span`; calling the object gives the KD term of a batch."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            CROSS_TOKENIZER_LOSSES[cls.name] = cls
        torch.serialization.add_safe_globals([cls])  # a method's saved hyperparameters may hold one

    def per_span(self, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], shared: Tensor,
                 temperature: float) -> Tensor:
        """The loss of each span from both sides' :func:`merged_log_probs` ``(log_p (G, V), log_scale (G,))``:
        (G,)."""
        raise NotImplementedError

    def __call__(self, student_logits: Tensor, input_ids: Tensor, teacher: AlignedTeacher,
                 labels: Tensor | None = None, *, temperature: float = 1.0) -> Tensor:
        """The KD term: the mean over valid spans of :meth:`per_span`.

        Args:
            student_logits: (B, T - 1, V_s), row p predicting student token p + 1.
            input_ids: (B, T) the student's tokens.
            teacher: the teacher's side (:class:`AlignedTeacher`).
            labels: (B, T) with -100 at tokens not to learn (a span counts when its first token is valid); ``None``:
                every span counts.
            temperature: T > 0, applied to both sides.
        """
        require(temperature > 0, "temperature", temperature, "> 0")
        spans = teacher.spans
        if labels is not None:
            spans = spans[labels[spans[:, 0], spans[:, 1]] != IGNORE_INDEX]
        if len(spans) == 0:
            return student_logits.sum() * 0.0
        block, s0, s1, t0, t1 = spans.unbind(-1)
        student = merged_log_probs(student_logits, input_ids[:, 1:], block, s0, s1, temperature)
        with torch.no_grad():
            teacher_side = merged_log_probs(teacher.logits[:, :-1], teacher.teacher_ids[:, 1:], block, t0, t1,
                                            temperature)
        return self.per_span(student, teacher_side, teacher.shared, temperature).mean()


class ULD(CrossTokenizerLoss):
    """Universal Logit Distillation: the L1 distance of the sorted span distributions (:func:`uld_distance`)."""

    name = "uld"

    def per_span(self, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], shared: Tensor,
                 temperature: float) -> Tensor:
        (log_s, scale_s), (log_t, scale_t) = student, teacher
        return uld_distance((log_s + scale_s[:, None]).exp(), (log_t + scale_t[:, None]).exp())


class GOLD(CrossTokenizerLoss):
    """GOLD-style hybrid: ``matched_weight * KL`` on the shared tokens (+ one bucket for the rest of each side's
    mass), times ``T**2``, ``+ unmatched_weight * ULD`` on the tokens only one side has.

    Args:
        matched_weight: weight of the exact KL on the shared tokens, >= 0.
        unmatched_weight: weight of ULD on the others, >= 0.
    """

    name = "gold"

    def __init__(self, matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> None:
        for name, value in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, name, value,
                    "a number >= 0", f"e.g. GOLD({name}=1.0)")
        self.matched_weight, self.unmatched_weight = float(matched_weight), float(unmatched_weight)

    def per_span(self, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], shared: Tensor,
                 temperature: float) -> Tensor:
        (log_s, scale_s), (log_t, scale_t) = student, teacher
        t_ids, s_ids = shared[:, 0], shared[:, 1]
        matched = kl(bucketed(log_t, scale_t, t_ids), bucketed(log_s, scale_s, s_ids)) * temperature**2  # (G,)
        t_other, s_other = others(log_t.shape[-1], t_ids), others(log_s.shape[-1], s_ids)
        unmatched = uld_distance((log_s[:, s_other] + scale_s[:, None]).exp(),
                                 (log_t[:, t_other] + scale_t[:, None]).exp())
        return self.matched_weight * matched + self.unmatched_weight * unmatched


def bucketed(log_p: Tensor, log_scale: Tensor, ids: Tensor) -> Tensor:
    """A merged span distribution coarse-grained to ``ids`` + one bucket, as log-probs (G, M + 1) summing to 1:
    ``m(ids)``, then ``1 - sum m(ids)`` = the mass of the other tokens plus ``1 - scale`` (computed without
    cancellation: a logsumexp of the others, and ``log(1 - e^s)``)."""
    floor = torch.finfo(log_p.dtype).min
    keep = log_p[:, ids] + log_scale[:, None]  # (G, M)
    other = torch.logsumexp(log_p[:, others(log_p.shape[-1], ids)], dim=-1) + log_scale  # (G,)
    merged = log_scale < 0
    missing = torch.where(merged, torch.log(-torch.expm1(torch.where(merged, log_scale, -1.0))), -torch.inf)
    rest = torch.logaddexp(other.clamp(min=floor), missing)  # (G,)
    return torch.cat([keep, rest[:, None]], dim=-1)


def others(size: int, ids: Tensor) -> Tensor:
    """The ids of a vocabulary of ``size`` that are not in ``ids``: (size - len(ids),) long."""
    mask = torch.ones(size, dtype=torch.bool, device=ids.device)
    mask[ids] = False
    return mask.nonzero().squeeze(-1)


def get_cross_tokenizer_loss(spec: str | CrossTokenizerLoss) -> CrossTokenizerLoss:
    """A cross-tokenizer loss from its name (``"uld"``, ``"gold"``) or an object (returned as is)."""
    if isinstance(spec, CrossTokenizerLoss):
        return spec
    require(isinstance(spec, str) and spec in CROSS_TOKENIZER_LOSSES, "loss", spec,
            f"a CrossTokenizerLoss or one of {sorted(CROSS_TOKENIZER_LOSSES)}")
    return CROSS_TOKENIZER_LOSSES[spec]()


def cross_tokenizer_loss(student_logits: Tensor, input_ids: Tensor, teacher: AlignedTeacher | None,
                         labels: Tensor, *, loss: CrossTokenizerLoss, ce_weight: float = 0.5,
                         temperature: float = 1.0) -> dict[str, Tensor]:
    """``(1 - ce_weight) * KD + ce_weight * CE`` of a cross-tokenizer batch.

    Args:
        student_logits: (B, T - 1, V_s), row p predicting student token p + 1.
        input_ids: (B, T) the student's tokens.
        teacher: the teacher's side; unused (may be ``None``) when ``ce_weight == 1``.
        labels: (B, T) targets (``input_ids`` with -100 at tokens not to learn); CE is on ``labels[:, 1:]``.
        loss: the KD term (:class:`ULD`, :class:`GOLD`).
        ce_weight: in [0, 1].
        temperature: T > 0 of the KD term.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars: CE the mean over valid target tokens, KD over valid spans.
    """
    require(0 <= ce_weight <= 1, "ce_weight", ce_weight, "in [0, 1]")
    ce = cross_entropy(student_logits, labels[:, 1:])
    if ce_weight == 1.0 or teacher is None:
        require(ce_weight == 1.0, "teacher", teacher, "the teacher's side when ce_weight < 1")
        return {"loss": ce, "kd": torch.zeros_like(ce), "ce": ce}
    kd = loss(student_logits, input_ids, teacher, labels, temperature=temperature)
    return {"loss": (1 - ce_weight) * kd + ce_weight * ce, "kd": kd, "ce": ce}
