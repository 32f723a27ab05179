"""Validation metrics shared by every method, logged under the same names: ``val/`` (held-out corpus) and
``val_ood/`` (the second validation loader: out-of-domain text).

- ``ce`` (and ``ppl``): the student's next-token cross-entropy on the real text;
- ``kl``: KL(teacher || student) at temperature 1; ``agreement``: share of positions where the student's arg-max
  is the teacher's; ``teacher_ce`` (and ``teacher_ppl``): the teacher's own cross-entropy. From a live teacher's
  logits (:func:`against_logits`), or from stored labels (:func:`against_stored`), where the KL is the exact KL of
  both distributions coarse-grained to the stored ids + the rest (top-k) or an unbiased estimate (sampled);
- with ``validation.new_tokens > 0`` (on-policy view, :func:`lightning_distill.signals.sampled.greedy_scores`):
  ``teacher_logprob``, the teacher's mean log-prob of the student's own greedy continuations of held-out prompts,
  and ``on_policy_rkl``, KL(student || teacher) on them; and what keeps that score honest (a student that writes
  little, or loops on text the teacher finds likely, scores well too): ``length``, the mean continuation length in
  tokens up to its first EOS, and ``distinct_2`` / ``distinct_4``, the mean share of distinct 2- and 4-grams
  within a continuation (:func:`distinct_ngrams`; 1: no repeats);
- with several teachers (:mod:`lightning_distill.signals.several`), each teacher's ``kl``, ``agreement`` and
  ``teacher_ce`` (``teacher_ppl``) again as ``<metric>_<teacher name>``.

Each is a mean over valid target tokens (the continuation statistics: over continuations), accumulated over the
validation run by :class:`ValidationMetrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_distill.losses import IGNORE_INDEX, ForwardKL, cross_entropy, reduce_tokens, sampled_kl, topk_forward_kl

#: token-weighted validation means; ``ce`` and ``teacher_ce`` are also logged as perplexities
NAMES = ("ce", "kl", "agreement", "teacher_ce", "teacher_logprob", "on_policy_rkl", "length", "distinct_2",
         "distinct_4")
PREFIXES = ("val", "val_ood")
PER_TEACHER = ("kl", "agreement", "teacher_ce")  # logged again per named teacher as <name>_<teacher>


def agreement(student_logits: Tensor, teacher_picks: Tensor, labels: Tensor) -> Tensor:
    """Share of valid positions where the student's arg-max (B, T, V) equals the teacher's pick (B, T)."""
    mask = labels != IGNORE_INDEX  # (B, T)
    agree = (student_logits.argmax(-1) == teacher_picks) & mask
    return agree.sum() / mask.sum().clamp(min=1)


def distinct_ngrams(tokens: Tensor, mask: Tensor, n: int) -> Tensor:
    """Per sequence, the share of its n-grams that are distinct (1: none repeats; a loop drives it toward 0).

    Args:
        tokens: (B, N) token ids; mask: (B, N) bool, True on the tokens that count (a prefix of each row).
        n: the n-gram length, >= 1.

    Returns:
        (B,) float shares; a row with fewer than ``n`` counted tokens has share 1.
    """
    shares = []
    for row, keep in zip(tokens.tolist(), mask.tolist(), strict=True):
        row = row[: sum(keep)]
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        shares.append(len(set(grams)) / len(grams) if grams else 1.0)
    return torch.tensor(shares)


def against_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``kl``, ``agreement`` and ``teacher_ce`` of float student logits (B, T, V) against teacher logits."""
    teacher_logits = teacher_logits.float()
    return {"kl": ForwardKL()(student_logits, teacher_logits, labels),
            "agreement": agreement(student_logits, teacher_logits.argmax(-1), labels),
            "teacher_ce": cross_entropy(teacher_logits, labels)}


def against_stored(student_logits: Tensor, stored: dict[str, Tensor], labels: Tensor,
                   temperature: float) -> dict[str, Tensor]:
    """``agreement`` (every per-position store) and ``kl`` (top-k and sampled stores at temperature 1) against a
    batch's stored labels (:func:`lightning_distill.store.decode`, aligned with ``labels``)."""
    out: dict[str, Tensor] = {}
    if "argmax" in stored:
        out["agreement"] = agreement(student_logits, stored["argmax"], labels)
    if temperature != 1.0:
        return out
    if "topk_ids" in stored:
        out["kl"] = topk_forward_kl(student_logits, stored["topk_ids"], stored["topk_logprobs"], labels, tail="bucket")
    elif "sample_ids" in stored:
        cross = sampled_kl(student_logits, stored["sample_ids"], stored["sample_weights"], labels)
        out["kl"] = cross - reduce_tokens(stored["entropy"].reshape(-1).float(), labels)
    return out


class ValidationMetrics(torch.nn.Module):
    """Token-weighted means of :data:`NAMES` under each prefix of :data:`PREFIXES`.

    Args:
        teachers: names of several teachers, whose :data:`PER_TEACHER` metrics are kept too.
    """

    def __init__(self, teachers: tuple[str, ...] = ()) -> None:
        super().__init__()
        names = NAMES + tuple(f"{n}_{t}" for t in teachers for n in PER_TEACHER)
        self.means = torch.nn.ModuleDict({f"{p}/{n}": MeanMetric() for p in PREFIXES for n in names})

    def reset(self) -> None:
        """Fresh states as normal tensors: states created under inference mode (by ``trainer.validate``) could
        not be updated later by the validation inside ``trainer.fit``."""
        with torch.inference_mode(False):
            for metric in self.means.values():
                metric.reset()

    def update(self, prefix: str, values: dict[str, Tensor], tokens: Tensor,
               weights: dict[str, Tensor] | None = None) -> None:
        """Add one batch's means, weighted by its number of valid ``tokens`` (or by ``weights[name]``: the tokens
        a metric is a mean over, when that is fewer)."""
        for name, value in values.items():
            weight = (weights or {}).get(name, tokens)
            self.means[f"{prefix}/{name}"].update(value.detach().float(), weight.float())

    def compute(self) -> dict[str, Tensor]:
        """The means of every updated metric, plus ``ppl`` / ``teacher_ppl`` (exp of the clamped CE)."""
        out = {}
        for key, metric in self.means.items():
            if not metric.update_called:
                continue
            out[key] = value = metric.compute()
            prefix, name = key.split("/")
            if name == "ce" or name.startswith("teacher_ce"):
                ppl = "ppl" if name == "ce" else "teacher_ppl" + name.removeprefix("teacher_ce")
                out[f"{prefix}/{ppl}"] = torch.exp(value.clamp(max=30))
        return out
