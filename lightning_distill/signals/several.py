"""Several named teachers in one run (:class:`~lightning_distill.options.Teachers`), behind the one seam.

Each named teacher is a signal of its own (live, served or a label store), asked with a
:class:`~lightning_distill.backbone.Run` whose ``teacher`` is that teacher's model. A rule says which grades what:

- **per source** (``sources``): each block names its corpus entry (``batch["source"]``, an index into
  ``data.corpus``), each on-policy continuation its prompt file (``batch["source_names"]``); the rows of a batch are
  split by teacher and each teacher answers for its rows only. Distributions come back as :class:`Routed` (the
  method's loss runs once per teacher on its rows and takes the token-weighted mean), picks and log-probs as one
  tensor filled row by row. Multi-teacher on-policy distillation is this rule with prompt files.
- **a mixture** (``weights``): every position is graded by ``p = sum_i w_i p_i`` of the live teachers' tempered
  distributions, made as logits ``T * log p`` (so that the loss's ``softmax(z / T)`` gives back ``p`` exactly).

Validation logs each teacher's metrics beside the routed ones: ``val/kl_<name>``, ``val/agreement_<name>``,
``val/teacher_ppl_<name>`` (per source: on that teacher's blocks; a mixture, or a loader without sources such as
``val_ood/``: on every block).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_distill import checks, metrics
from lightning_distill.backbone import Run
from lightning_distill.generation import GenerationSettings
from lightning_distill.losses import IGNORE_INDEX
from lightning_distill.options import Served, Teachers
from lightning_distill.serve.client import is_url
from lightning_distill.signals.base import Batch, Distribution, TeacherSignal
from lightning_distill.signals.live import LiveTeacher
from lightning_distill.signals.served import ServedTeacher


@dataclasses.dataclass
class Routed:
    """A batch's teacher distribution when different teachers grade different rows: ``parts`` holds, for each
    teacher with rows in the batch, the row indices (R,) long and its distribution of those rows only."""

    parts: list[tuple[Tensor, Distribution]]


class SeveralTeachers(TeacherSignal):
    """Named teacher signals and the rule that picks which grades which tokens.

    Args:
        teachers: the teachers and their rule, as given.
        signals: one signal per teacher name (the same order as ``teachers.models``).
        temperature: the KD temperature (a mixture is made of the tempered distributions).
    """

    def __init__(self, teachers: Teachers, signals: dict[str, TeacherSignal], temperature: float = 1.0) -> None:
        self.teachers, self.signals, self.temperature = teachers, signals, temperature
        self.corpus: list[str] = []  # the data module's corpus entries: batch["source"] indexes these
        if teachers.weights is not None:
            not_live = [name for name, signal in signals.items() if not isinstance(signal, LiveTeacher)]
            if not_live:
                raise ValueError(f"teacher.weights={teachers.weights} mixes whole distributions, which teachers "
                                 f"{not_live} (a server's or a store's top-k) do not hold: name their models, or route "
                                 "per source with teacher.sources")
            total = sum(teachers.weights.get(name, 0.0) for name in signals)
            self.log_weights = {name: math.log(teachers.weights[name] / total) for name in signals
                                if name in teachers.weights}

    # --------------------------------------------------------------------------------------------- set-up
    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return any(signal.needs_teacher for signal in self.signals.values())

    def stores(self) -> dict[str | None, dict[str, Any]]:
        return {name: signal.manifest for name, signal in self.signals.items() if signal.manifest is not None}

    def setup(self, run: Run, stage: str, data: Any = None) -> None:
        """Learn the corpus entries (per source: each must have a teacher), then set up every teacher."""
        corpus = getattr(getattr(data, "hparams", None), "corpus", None)
        if corpus is not None:
            self.corpus = [corpus] if isinstance(corpus, str) else list(corpus)
        sources = self.teachers.sources
        if sources is not None and corpus is not None:
            if getattr(data, "streamed", False) and len(self.corpus) > 1:
                raise ValueError(f"teacher.sources routes per corpus entry, but data.corpus={corpus!r} is a prepared "
                                 "(streamed) corpus, whose blocks do not record their source: route a corpus held in "
                                 "memory (a list of sources), or use teacher.weights")
            missing = [entry for entry in self.corpus if entry not in sources]
            if missing:
                raise ValueError(f"data.corpus entries {missing} have no teacher in teacher.sources={sources}: name "
                                 f"one of {list(self.teachers.models)} for each")
        for name, signal in self.signals.items():
            signal.setup(self.run_of(run, name), stage, data)

    def teardown(self) -> None:
        for signal in self.signals.values():
            signal.teardown()

    def run_of(self, run: Run, name: str) -> Run:
        """``run`` as teacher ``name``'s signal sees it: its model as the teacher."""
        return dataclasses.replace(run, teacher=run.teachers.get(name), teacher_name=self.teachers.models[name])

    # --------------------------------------------------------------------------------------------- routing
    def rows(self, batch: Batch) -> list[tuple[str, Tensor]]:
        """Which rows (R,) long of ``batch`` each teacher grades (teachers with no row left out). A batch without
        sources goes whole to the teacher of the corpus' one entry, or (the out-of-domain loader of a corpus of
        several entries, a mixture) to the main teacher."""
        size = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        names = batch.get("source_names")
        if names is None and batch.get("source") is not None and self.corpus:
            names = [self.corpus[i] for i in batch["source"].tolist()]
        if names is None:
            entry = self.corpus[0] if len(self.corpus) == 1 else None
            names = [entry] * size
        sources = self.teachers.sources or {}
        owners = [sources.get(name, self.teachers.main) for name in names]
        return [(teacher, torch.tensor([i for i, o in enumerate(owners) if o == teacher], device=device))
                for teacher in self.signals if teacher in owners]

    def _routed(self, run: Run, batch: Batch, ask: str, *args: Any) -> list[tuple[Tensor, Any]]:
        """Each teacher's answer to ``ask`` for its rows."""
        return [(rows, getattr(self.signals[name], ask)(self.run_of(run, name), select(batch, rows), *args))
                for name, rows in self.rows(batch)]

    def _filled(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One tensor (B, ...) from each teacher's rows."""
        size = sum(len(rows) for rows, _ in parts)
        first = parts[0][1]
        out = first.new_empty((size, *first.shape[1:]))
        for rows, value in parts:
            out[rows] = value.to(out.dtype)
        return out

    # --------------------------------------------------------------------------------------------- answers
    def distribution(self, run: Run, batch: Batch, split: str = "train") -> Distribution:
        if self.teachers.weights is not None:
            return self.temperature * self.mixture(run, batch, self.temperature)
        parts = self._routed(run, batch, "distribution", split)
        return parts[0][1] if len(parts) == 1 else Routed(parts)

    @torch.no_grad()
    def mixture(self, run: Run, batch: Batch, temperature: float = 1.0,
                logits: dict[str, Tensor] | None = None) -> Tensor:
        """``log sum_i w_i softmax(z_i / T)``: the mixture's log-probs (B, T, V) at temperature ``T`` (``T`` times
        them: logits whose tempered softmax is the mixture); from each teacher's ``logits`` when given."""
        logits = logits if logits is not None else self.teacher_logits(run, batch)
        logs = [weight + torch.log_softmax(logits[name].float() / temperature, -1)
                for name, weight in self.log_weights.items()]  # each (B, T, V)
        return torch.logsumexp(torch.stack(logs), 0)

    def teacher_logits(self, run: Run, batch: Batch) -> dict[str, Tensor]:
        """Each mixed teacher's logits (B, T, V) of ``batch``, one forward each."""
        return {name: LiveTeacher.logits(self.run_of(run, name), batch) for name in self.log_weights}

    def picks(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        if self.teachers.weights is not None:
            return self.mixture(run, batch).argmax(-1)  # (B, T)
        return self._filled(self._routed(run, batch, "picks", split))

    def token_logprobs(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        if self.teachers.weights is not None:
            following = batch["input_ids"].roll(-1, dims=1).unsqueeze(-1)  # (B, T, 1): the token at t + 1
            return self.mixture(run, batch).gather(-1, following).squeeze(-1)  # (B, T)
        return self._filled(self._routed(run, batch, "token_logprobs", split))

    def continuations(self, run: Run, batch: Batch, prompt_tokens: int, settings: GenerationSettings,
                      split: str = "train") -> Tensor:
        raise ValueError("several teachers do not write continuations: use HardDistill(mode='top1') or SoftDistill "
                         "with teacher=Teachers(...), or one teacher with mode='generate'")

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        """Each teacher's metrics as ``<metric>_<name>`` (per source, on the in-domain loader: on its rows only;
        else on every row), and the run's: against the mixture, or per source the token-weighted mean of each
        teacher's on its rows."""
        if self.teachers.weights is not None:  # each teacher's forward once, for its metrics and the mixture's
            logits = self.teacher_logits(run, batch)
            out = {f"{key}_{name}": value for name, z in logits.items()
                   for key, value in metrics.against_logits(student_logits, z[:, :-1], labels).items()}
            return {**out, **metrics.against_logits(student_logits, self.mixture(run, batch, logits=logits)[:, :-1],
                                                    labels)}
        out: dict[str, Tensor] = {}
        routed = self.teachers.sources is not None and dataloader_idx == 0
        shares = self.rows(batch) if routed else [(name, None) for name in self.signals]
        for name, rows in shares:
            part = batch if rows is None else select(batch, rows)
            values = self.signals[name].validation_metrics(
                self.run_of(run, name), part, student_logits if rows is None else student_logits[rows],
                labels if rows is None else labels[rows], dataloader_idx)
            out.update({f"{key}_{name}": value for key, value in values.items()})
        if routed:
            counts = self.metric_tokens(batch, labels, dataloader_idx)
            total = sum(float(counts[f"kl_{name}"]) for name, _ in shares)
            for key in metrics.PER_TEACHER:
                if all(f"{key}_{name}" in out for name, _ in shares):
                    out[key] = sum(out[f"{key}_{name}"] * float(counts[f"kl_{name}"]) for name, _ in shares) / max(
                        total, 1.0)
        else:  # the out-of-domain loader, per source: the main teacher's
            out.update({key: out[f"{key}_{self.teachers.main}"] for key in metrics.PER_TEACHER
                        if f"{key}_{self.teachers.main}" in out})
        return out

    def metric_tokens(self, batch: Batch, labels: Tensor, dataloader_idx: int) -> dict[str, Tensor]:
        """The valid tokens behind each teacher's metrics: its rows' when routed per source, else the batch's."""
        valid = (labels != IGNORE_INDEX).sum(-1)  # (B,)
        if self.teachers.sources is None or dataloader_idx != 0:
            return {f"{key}_{name}": valid.sum() for name in self.signals for key in metrics.PER_TEACHER}
        return {f"{key}_{name}": valid[rows].sum() for name, rows in self.rows(batch) for key in metrics.PER_TEACHER}

    def cannot(self, question: str) -> str:
        return "ask each teacher alone"

    def state_dict(self) -> dict[str, Any]:
        return {name: signal.state_dict() for name, signal in self.signals.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, signal in self.signals.items():
            signal.load_state_dict(state.get(name, {}))


def several_signal(teachers: Teachers, served: Served, default: Served, local: Callable[[str], TeacherSignal],
                   tail: str = "bucket", temperature: float = 1.0) -> SeveralTeachers:
    """The signal of several named teachers: a server's URL is asked as a served teacher (``served``'s options,
    without prefetch: each teacher is asked for its own rows at its step), the others as ``local(name)`` (a live
    teacher, or the store ``teacher.labels`` names)."""
    checks.require(isinstance(teachers, Teachers), "teacher", teachers, "Teachers(models=..., sources=...)")
    urls = [name for name, spec in teachers.models.items() if is_url(spec)]
    stored_urls = [name for name in urls if name in (teachers.labels or {})]
    checks.require(not stored_urls, "teacher.labels", stored_urls, "stores of teachers that are not servers",
                   "a served teacher is asked, a store read: drop one of the two for " + ", ".join(stored_urls))
    if not urls and served != default:
        raise ValueError(f"served={served} sets how a teacher server is asked, but no teacher of teacher.models="
                         f"{teachers.models} is a server's URL: leave served out")
    signals = {name: ServedTeacher(spec, dataclasses.replace(served, prefetch=False), tail, temperature)
               if is_url(spec) else local(name) for name, spec in teachers.models.items()}
    return SeveralTeachers(teachers, signals, temperature)


def select(batch: Batch, rows: Tensor) -> Batch:
    """The rows of a batch: every tensor or list with one entry per row, indexed; the rest as it is."""
    size = batch["input_ids"].shape[0]
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out
