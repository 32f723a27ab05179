"""The loss math, in one place: pure torch, no Lightning.

- :mod:`~lightning_distill.losses.divergences`: the conventions every loss follows (shapes, float32 softmax,
  ``-100`` masking, valid-token normalization, ``T**2`` temperature scaling), the divergences (KD terms) as small
  typed objects registered by name, and cross-entropy;
- :mod:`~lightning_distill.losses.sparse`: the teacher kept on a few ids per position (stored top-k or sampled
  labels, the teacher's picks, on-policy sampled tokens) and the per-token losses to it;
- :mod:`~lightning_distill.losses.distill`: ``(1 - ce_weight) * KD + ce_weight * CE`` of a batch, from logits or
  from hidden states chunk by chunk (the fused head loss);
- :mod:`~lightning_distill.losses.cross_tokenizer`: a student and a teacher with different tokenizers, compared on
  the text spans both spell: ULD and the GOLD-style hybrid.

Everything a user or a method needs is importable from here::

    from lightning_distill.losses import GeneralizedJSD, chunked_distill_loss
    loss = GeneralizedJSD(beta=0.3)(student_logits, teacher_logits, labels, temperature=2.0)
"""

from lightning_distill.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    GOLD,
    ULD,
    AlignedTeacher,
    CrossTokenizerLoss,
    cross_tokenizer_loss,
    get_cross_tokenizer_loss,
    uld_distance,
)
from lightning_distill.losses.distill import (
    DEFAULT_CHUNK_SIZE,
    TeacherHidden,
    chunked_distill_loss,
    distill_loss,
)
from lightning_distill.losses.divergences import (
    DIVERGENCES,
    IGNORE_INDEX,
    TVD,
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    cross_entropy,
    get_divergence,
    reduce_tokens,
)
from lightning_distill.losses.sparse import SparseTargets, sample_teacher, sampled_kl, topk_forward_kl, topk_teacher

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "GOLD",
    "IGNORE_INDEX",
    "TVD",
    "ULD",
    "AlignedTeacher",
    "CrossTokenizerLoss",
    "Divergence",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "SparseTargets",
    "TeacherHidden",
    "chunked_distill_loss",
    "cross_entropy",
    "cross_tokenizer_loss",
    "distill_loss",
    "get_cross_tokenizer_loss",
    "get_divergence",
    "reduce_tokens",
    "sample_teacher",
    "sampled_kl",
    "topk_forward_kl",
    "topk_teacher",
    "uld_distance",
]
