"""Divergences between the teacher's and the student's next-token distributions, cross-entropy, and the per-token
math they share.

Pure torch, no Lightning. A divergence is a small typed object (:class:`Divergence`): its parameters are checked
when it is made, and it registers itself by name in :data:`DIVERGENCES`, so YAML can name it
(``loss: reverse_kl``) or build it with parameters (``loss: {class_path: lightning_distill.losses.GeneralizedJSD,
init_args: {beta: 0.5}}``); :func:`get_divergence` is the one way from a name to an object. A new divergence is one
subclass with a ``name`` and :meth:`Divergence.per_token`.

Every loss has one shape of call::

    loss = ForwardKL()(student_logits, teacher_logits, labels, temperature=2.0, num_tokens=None)

- ``student_logits``, ``teacher_logits``: ``(B, T, V)`` or ``(N, V)``, any float dtype. Softmax is taken in at
  least float32 (bf16 / fp16 are upcast, float64 stays float64), and so is the returned scalar.
- ``labels``: ``(B, T)`` or ``(N,)`` long; positions equal to ``-100`` are ignored, ``None`` counts every
  position. Nothing is shifted here: the caller aligns logits and labels.
- Reduction: the sum of per-token losses over valid positions divided by the number of valid positions, or
  by ``num_tokens`` when given (the valid-token count of a whole gradient-accumulation window).
  When every position is masked the result is exactly 0, still attached to the graph.
- Temperature ``T``: both logits are divided by ``T`` and the loss is multiplied by ``T**2``, which keeps
  gradient magnitudes independent of ``T`` (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network").
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.checks import require

IGNORE_INDEX = -100
NumTokens = int | Tensor | None  # normalizer: see reduce_tokens


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax of ``logits / temperature`` in at least float32, flattened: (..., V) -> (N, V)."""
    require(temperature > 0, "temperature", temperature, "> 0")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)  # (N, V)
    return torch.log_softmax(flat if temperature == 1 else flat / temperature, dim=-1)  # (N, V)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs: (N, V) -> (N,).

    Entries with p_v == 0 contribute exactly 0 to the value and to the gradient (0 log 0 = 0), so a one-hot
    teacher or ``-inf`` logits give no NaN: the ``where`` keeps ``-inf - -inf`` out of both passes.
    """
    p = log_p.exp()  # (N, V)
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) from log-probs (N, V), exact at w = 0 and w = 1, computed with logaddexp."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    floor = torch.finfo(log_a.dtype).min  # -inf -> finite: logaddexp(-inf, -inf) has a NaN gradient
    return torch.logaddexp(log_a.clamp(min=floor) + math.log(w), log_b.clamp(min=floor) + math.log1p(-w))


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
        require(valid.numel() == per_token.numel(), "labels", tuple(labels.shape), f"{per_token.numel()} long")
        total, count = torch.where(valid, per_token, 0.0).sum(), valid.sum()
    if num_tokens is not None:
        require(not isinstance(num_tokens, int) or num_tokens >= 0, "num_tokens", num_tokens, ">= 0")
        count = num_tokens
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


# ---------------------------------------------------------------------------------------------- divergences
DIVERGENCES: dict[str, type[Divergence]] = {}
"""Every :class:`Divergence` subclass by its ``name`` (filled as the classes are defined)."""


class Parameters:
    """A loss object compared, hashed and shown by the parameters it was made with (its attributes)."""

    def params(self) -> dict[str, float]:
        """The parameters the object was made with."""
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))


class Divergence(Parameters):
    """A divergence D(p_teacher, p_student), computed per token from log-probs.

    Subclasses set ``name`` (which registers them in :data:`DIVERGENCES`), take their parameters as typed,
    range-checked ``__init__`` arguments, and implement :meth:`per_token`. Calling the object gives the loss.
    """

    name: ClassVar[str] = ""
    #: whether the divergence is linear in the teacher's probabilities (then a sample of the teacher estimates it
    #: without bias: sampled stored labels)
    linear_in_teacher: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            DIVERGENCES[cls.name] = cls
        torch.serialization.add_safe_globals([cls])  # a method's saved hyperparameters may hold one

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        """The divergence at each position: (N, V), (N, V) log-probs -> (N,)."""
        raise NotImplementedError

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                 temperature: float = 1.0, num_tokens: NumTokens = None) -> Tensor:
        """The loss: per-token divergence of the tempered softmaxes times T**2, reduced by :func:`reduce_tokens`.

        Args:
            student_logits: (B, T, V) or (N, V) logits, any float dtype.
            teacher_logits: same shape as ``student_logits``.
            labels: (B, T) or (N,) ids with ``-100`` at positions to ignore; ``None``: all positions count.
            temperature: T > 0; logits are divided by T and the loss multiplied by T**2.
            num_tokens: divide the sum by this instead of the number of valid positions.

        Returns:
            Scalar loss, float32 (float64 for float64 inputs).
        """
        per_token = divergence_per_token(self, student_logits, teacher_logits, temperature)  # (N,)
        return reduce_tokens(per_token, labels, num_tokens)


class ForwardKL(Divergence):
    """KL(p_t || p_s): classic KD (Hinton et al. 2015); mean-seeking, the student covers all teacher modes."""

    name = "forward_kl"
    linear_in_teacher = True

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return kl(teacher_logp, student_logp)


class ReverseKL(Divergence):
    """KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of LLMs")."""

    name = "reverse_kl"

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return kl(student_logp, teacher_logp)


class GeneralizedJSD(Divergence):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (GKD, Agarwal et al. 2024,
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"; as TRL's
    ``generalized_jsd_loss``). The formula tends to beta * forward KL as beta -> 0 and to (1 - beta) * reverse
    KL as beta -> 1; the endpoints are defined, as in TRL, as the unscaled forward (0) and reverse (1) KL.

    Args:
        beta: interpolation in [0, 1]: 0 forward KL, 1 reverse KL, 0.5 the symmetric JSD.
    """

    name = "generalized_jsd"

    def __init__(self, beta: float = 0.5) -> None:
        require(0 <= beta <= 1, "beta", beta, "in [0, 1]")
        self.beta = beta

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        if self.beta == 0:
            return kl(teacher_logp, student_logp)
        if self.beta == 1:
            return kl(student_logp, teacher_logp)
        mix = log_mix(teacher_logp, student_logp, self.beta)  # (N, V) log m
        return self.beta * kl(teacher_logp, mix) + (1 - self.beta) * kl(student_logp, mix)


class SkewKL(Divergence):
    """KL(p_t || alpha p_t + (1 - alpha) p_s), skew KL (DistiLLM, Ko et al. 2024, "DistiLLM: Towards
    Streamlined Distillation for Large Language Models"); bounded by log(1 / alpha), unlike forward KL.

    Args:
        alpha: skew in [0, 1] (0: forward KL).
    """

    name = "skew_kl"

    def __init__(self, alpha: float = 0.1) -> None:
        require(0 <= alpha <= 1, "alpha", alpha, "in [0, 1]")
        self.alpha = alpha

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return kl(teacher_logp, log_mix(teacher_logp, student_logp, self.alpha))


class SkewReverseKL(Divergence):
    """KL(p_s || (1 - alpha) p_t + alpha p_s), skew reverse KL (DistiLLM, Ko et al. 2024).

    Args:
        alpha: skew in [0, 1] (0: reverse KL).
    """

    name = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1) -> None:
        require(0 <= alpha <= 1, "alpha", alpha, "in [0, 1]")
        self.alpha = alpha

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return kl(student_logp, log_mix(student_logp, teacher_logp, self.alpha))


class TVD(Divergence):
    """Total variation 0.5 sum_v |p_t - p_s| (Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation")."""

    name = "tvd"

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def get_divergence(spec: str | Divergence, **params: float) -> Divergence:
    """A divergence object from a name (with its parameters) or an object (returned as is).

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a bad parameter.
    """
    if isinstance(spec, Divergence):
        require(not params, "params", params, f"empty when an object ({spec!r}) is given")
        return spec
    require(isinstance(spec, str) and spec in DIVERGENCES, "loss", spec,
            f"a Divergence or one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[spec](**params)


def divergence_per_token(divergence: Divergence, student_logits: Tensor, teacher_logits: Tensor,
                         temperature: float = 1.0, student_logp: Tensor | None = None) -> Tensor:
    """Per-token divergence between tempered softmaxes, already multiplied by ``temperature**2``.

    Args:
        divergence: the divergence.
        student_logits: (B, T, V) or (N, V) logits, any float dtype.
        teacher_logits: same shape as ``student_logits``.
        temperature: T > 0; both logits are divided by T.
        student_logp: the student's log-probs at ``temperature`` (N, V) when the caller already has them.

    Returns:
        (N,) per-token values in at least float32, N = B * T.
    """
    require(isinstance(divergence, Divergence), "divergence", divergence, "a Divergence",
            "e.g. get_divergence(name, **params)")
    shape = tuple(student_logits.shape)
    require(teacher_logits.shape == shape, "teacher_logits", tuple(teacher_logits.shape), f"of shape {shape}")
    student_logp = log_probs(student_logits, temperature) if student_logp is None else student_logp  # (N, V)
    teacher_logp = log_probs(teacher_logits, temperature)  # (N, V)
    return divergence.per_token(student_logp, teacher_logp) * temperature**2  # (N,)


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
