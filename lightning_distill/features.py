"""Feature (intermediate-layer) distillation: each student layer's hidden states matched to a teacher layer's.

The logit loss matches only what the student says; this term also matches how it gets there, layer by layer, as
DistilBERT (Sanh et al. 2019: a cosine loss on hidden states), TinyBERT (Jiao et al. 2020: an MSE through a learned
projection) and Minitron (Muralidharan et al. 2024: logit KD plus intermediate-state losses) do. Student layer s is
matched to teacher layer ``layer_map[s]``: by default the teacher layer it was copied from (a ``from_teacher``
student, :func:`lightning_distill.pruning.counterparts`), else evenly spaced ones, or a map given by the user.

Per token, on the output of a layer (the residual stream, before the final norm):

- ``cosine``: ``1 - cos(h_s, h_t)``;
- ``mse``: the mean squared difference of the two states, each layer-normalized first (zero mean, unit variance
  over the hidden size, no learned scale), so that the residual stream's growing scale does not weigh deep layers
  more.

When the widths differ, the student's states go through one learned linear map (H_s -> H_t, shared by all layers,
as TinyBERT's ``W_h``): it belongs to the distillation module (trained, checkpointed), never to the exported student.
The loss is a mean over the valid (not -100) target tokens of the micro-batch, like the logit terms, then over the
matched layers. The teacher's states are detached: gradients reach only the student and the projection.

The states are recorded by forward hooks on the matched layers during the forward passes the step makes anyway
(:meth:`FeatureMatcher.recording`): no second teacher pass, no ``output_hidden_states``, and nothing at all when the
option is off. Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_distill.losses import IGNORE_INDEX
from lightning_distill.options import Features


def token_feature_loss(student: Tensor, teacher: Tensor, kind: str = "cosine") -> Tensor:
    """Per-token distance of two hidden states, in float32.

    Args:
        student: (..., H) student states (projected to the teacher's width).
        teacher: (..., H) teacher states.
        kind: ``"cosine"`` (1 - cosine similarity) or ``"mse"`` (MSE of the layer-normalized states).

    Returns:
        (...) the distance of each token: 0 where the two agree (``cosine``: in direction).
    """
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if kind == "mse":
        size = (student.shape[-1],)
        return (F.layer_norm(student, size) - F.layer_norm(teacher, size)).pow(2).mean(-1)
    raise ValueError(f"features.loss must be 'cosine' or 'mse', got {kind!r}")


def feature_loss(student: Tensor, teacher: Tensor, mask: Tensor, kind: str = "cosine") -> Tensor:
    """Mean of :func:`token_feature_loss` over the valid tokens; 0 when none is valid.

    Args:
        student: (B, T, H) student states.
        teacher: (B, T, H) teacher states (not differentiated).
        mask: (B, T) bool, True on valid tokens.
        kind: ``"cosine"`` or ``"mse"``.

    Returns:
        A float32 scalar.
    """
    per_token = token_feature_loss(student, teacher.detach(), kind)  # (B, T)
    valid = mask.to(per_token.dtype)
    return (per_token * valid).sum() / valid.sum().clamp(min=1.0)


def valid_positions(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The positions whose states are matched: those with a valid next-token target, as the logit loss counts them.

    Args:
        labels: (B, T) target ids, -100 masked; position t predicts ``labels[t + 1]``.
        attention_mask: (B, T) optional, 0 on padding.

    Returns:
        (B, T - 1) bool, for the states of positions 0 .. T-2.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    return mask if attention_mask is None else mask & attention_mask[:, :-1].bool()


@dataclass
class Recording:
    """The hidden states recorded during one step, by layer index: student ones with their graph, teacher ones as
    the teacher made them (under ``no_grad`` for a frozen teacher)."""

    student: dict[int, Tensor] = field(default_factory=dict)
    teacher: dict[int, Tensor] = field(default_factory=dict)


class FeatureMatcher(nn.Module):
    """The feature term of a distillation module: which layers are matched, the projection, the loss.

    Args:
        options: the loss and the layer map (``layers=None``: each student layer to its counterpart, given to
            :meth:`bind`).
    """

    def __init__(self, options: Features) -> None:
        super().__init__()
        self.kind = options.loss
        self.requested = None if options.layers is None else {int(s): int(t) for s, t in options.layers.items()}
        self.layer_map: dict[int, int] = {}
        self.projection: nn.Linear | None = None

    def bind(self, student_config: Any, teacher_config: Any, counterparts: Sequence[int] | None) -> None:
        """Fix the layer map and make the projection for these models (idempotent).

        Args:
            student_config: the student's config (``num_hidden_layers``, ``hidden_size``).
            teacher_config: the teacher's config.
            counterparts: the teacher layer of each student layer, used when no map was given
                (``None`` when one was).

        Raises:
            ValueError: naming ``features.layers`` for an index outside either model.
        """
        student_layers, teacher_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        layer_map = self.requested if self.requested is not None else dict(enumerate(counterparts))
        bad = {s: t for s, t in layer_map.items() if s >= student_layers or t >= teacher_layers}
        if bad:
            raise ValueError(f"features.layers={layer_map} maps {bad} outside the models: the student has layers "
                             f"0..{student_layers - 1}, the teacher 0..{teacher_layers - 1}")
        self.layer_map = dict(sorted(layer_map.items()))
        widths = (student_config.hidden_size, teacher_config.hidden_size)
        if widths[0] != widths[1] and self.projection is None:
            self.projection = nn.Linear(widths[0], widths[1], bias=False)

    @contextmanager
    def recording(self, student_layers: Sequence[nn.Module], teacher_layers: Sequence[nn.Module]
                  ) -> Iterator[Recording]:
        """Record the outputs of the matched layers of both models during the forward passes made inside.

        Args:
            student_layers: the student's decoder layers.
            teacher_layers: the teacher's decoder layers.

        Yields:
            The :class:`Recording`, filled as the layers run (the last forward of a layer wins).
        """
        record = Recording()

        def keep(store: dict[int, Tensor], index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                store[index] = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            return hook

        handles = [student_layers[s].register_forward_hook(keep(record.student, s)) for s in self.layer_map]
        handles += [teacher_layers[t].register_forward_hook(keep(record.teacher, t))
                    for t in sorted(set(self.layer_map.values()))]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, record: Recording, mask: Tensor) -> Tensor:
        """The feature loss of a step: the mean over matched layers of :func:`feature_loss`.

        Args:
            record: the states recorded by :meth:`recording`, of sequences of length T.
            mask: (B, T') bool, True on the positions to match (T' <= T: the first T' positions,
                :func:`valid_positions`).

        Returns:
            A float32 scalar.
        """
        if not self.layer_map or any(s not in record.student or t not in record.teacher
                                     for s, t in self.layer_map.items()):
            raise RuntimeError("no hidden states were recorded: run both models' forward inside recording()")
        length = mask.shape[1]
        total = []
        for s, t in self.layer_map.items():
            student = record.student[s][:, :length]  # (B, T', H_s)
            if self.projection is not None:
                student = self.projection(student.to(self.projection.weight.dtype))  # (B, T', H_t)
            total.append(feature_loss(student, record.teacher[t][:, :length], mask, self.kind))
        return torch.stack(total).mean()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint's projection is loaded even when :meth:`bind` has not run (exporting without the
        teacher): it is made from the stored weight's shape."""
        weight = state_dict.get(f"{prefix}projection.weight")
        if weight is not None and self.projection is None:
            self.projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
