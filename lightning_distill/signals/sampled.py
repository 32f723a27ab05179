"""On-policy distillation: the student writes, the teacher grades every token.

Off-policy KD trains the student on text it would not have written; at generation time its own early mistakes lead
it into states it never trained on. Here the student samples continuations of prompts (batched, KV cache, in eval
mode, no gradient through sampling) and learns from the teacher's signal on its own tokens (GKD, Agarwal et al.
2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", with its on-policy
fraction ``lmbda``; MiniLLM, Gu et al. 2024; "On-Policy Distillation", Thinking Machines 2025). Two losses on the
generated positions (prompt positions and everything after the first EOS are masked):

- a divergence over the full distributions (default reverse KL), from the scoring teacher's distribution;
- ``"sampled_token"``: only the teacher's log-prob of each sampled token, the per-token reverse-KL estimate used as
  a negative advantage on the student's log-probs (:func:`lightning_distill.losses.sparse._sampled_token`), which a
  teacher behind a server or a store can serve cheaply.

Under DDP each rank generates its own share.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from torch import Tensor

from lightning_distill import generation
from lightning_distill.backbone import Run
from lightning_distill.losses import IGNORE_INDEX, ReverseKL, SparseTargets, get_divergence, reduce_tokens
from lightning_distill.metrics import distinct_ngrams
from lightning_distill.options import OnPolicy
from lightning_distill.prompts import PromptFile, positions
from lightning_distill.sharding import is_sharded
from lightning_distill.signals.base import Batch, Distribution, TeacherSignal

SAMPLED_TOKEN = "sampled_token"


class StudentSamples(TeacherSignal):
    """The student's own continuations, scored by a teacher source (a live or a served teacher).

    Args:
        scorer: the source that scores the sequences (its ``distribution`` or ``token_logprobs``).
        options: how often, from when, with which loss and how the student samples (:class:`OnPolicy`).
        seed: seeds which steps are on-policy and which file prompts are drawn.
    """

    def __init__(self, scorer: TeacherSignal, options: OnPolicy, seed: int = 0) -> None:
        self.scorer, self.options, self.seed = scorer, options, seed
        self.settings = generation.GenerationSettings(options.max_new_tokens, True, options.temperature, options.top_p)
        self.divergence = None if options.loss == SAMPLED_TOKEN else get_divergence(options.loss)
        self.prompt_file: PromptFile | None = None

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return self.scorer.needs_teacher

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.scorer.manifest

    def stores(self) -> dict[str | None, dict[str, Any]]:
        return self.scorer.stores()

    def setup(self, run: Run, stage: str, data: Any = None) -> None:
        self.scorer.setup(run, stage, data)
        if self.options.prompts is not None and self.prompt_file is None:
            self.prompt_file = PromptFile(self.options.prompts, run.tokenizer, self.options.prompt_tokens)

    def teardown(self) -> None:
        self.scorer.teardown()

    def chooses(self, step: int) -> bool:
        """Whether the batch of optimizer step ``step`` is on-policy: never before ``start``, then a seeded coin with
        P(heads) = ``lmbda`` (a function of the step alone, so a resumed run chooses as an uninterrupted one)."""
        lmbda = self.options.lmbda
        if lmbda == 0 or step < self.options.start:
            return False
        return lmbda == 1 or random.Random(f"{self.seed}-{step}").random() < lmbda

    def rollout(self, run: Run, batch: Batch) -> dict[str, Any]:
        """The student's continuations of the batch's prompts: ``input_ids`` (B, P + N); ``labels`` (B, P + N): the
        sampled tokens up to and including the first EOS, -100 elsewhere; ``attention_mask`` and ``position_ids``
        for left-padded file prompts (else ``None``); ``generated``: the number of sampled tokens and
        ``seconds``: the time sampling took; where each prompt comes from (several teachers route by it): the
        batch's ``source``, or ``source_names``: each file prompt's file."""
        device, prompt_tokens = batch["input_ids"].device, self.options.prompt_tokens
        if self.prompt_file is None:
            prompts, mask = batch["input_ids"][:, :prompt_tokens], None  # (B, P), equal lengths
            where = {key: batch[key] for key in ("source",) if key in batch}  # several teachers route by it
        else:
            seed = hash((self.seed, run.step, run.rank)) % 2**62
            drawn = self.prompt_file.batch(batch["input_ids"].shape[0], seed=seed)
            prompts, mask = drawn["input_ids"].to(device), drawn["attention_mask"].to(device)
            where = {"source_names": drawn["source_names"]}
        start = time.perf_counter()
        eos = run.tokenizer.eos_token_id
        new = generation.generate(run.student, prompts, self.settings, eos, attention_mask=mask,
                                  synced_gpus=is_sharded(run.student))  # (B, N)
        seconds = time.perf_counter() - start
        sequences, labels = generation.training_sequences(prompts, new, eos, run.tokenizer.pad_token_id)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(sequences[:, prompts.shape[1]:])], 1)  # (B, P + N)
        return {"input_ids": sequences, "labels": labels, "attention_mask": mask,
                "position_ids": None if mask is None else positions(mask), "generated": new.numel(),
                "seconds": seconds, **where}

    def distribution(self, run: Run, batch: Batch, split: str = "train") -> Distribution:
        """Off-policy batches: the scorer's distribution of the corpus text, as without on-policy training."""
        return self.scorer.distribution(run, batch, split)

    def target(self, run: Run, rollout: Batch) -> Distribution:
        """The loss target on a rollout: the scorer's distribution, or (``sampled_token``) the student's tokens with
        the scorer's log-probs of them."""
        if self.divergence is None:
            return SparseTargets.from_token_logprobs(rollout["input_ids"], self.scorer.token_logprobs(run, rollout))
        return self.scorer.distribution(run, rollout)

    def loss_inputs(self, run: Run, rollout: Batch, temperature: float) -> dict[str, Any]:
        """Everything :meth:`~lightning_distill.modules.DistillModule.student_loss` needs for an on-policy step on a
        :meth:`rollout`: its sequences, target and loss settings (no CE term: the labels are the student's own
        tokens)."""
        return {"input_ids": rollout["input_ids"], "targets": rollout["labels"],
                "teacher": self.target(run, rollout), "ce_weight": 0.0,
                "divergence": self.divergence or "forward_kl", "temperature": temperature if self.divergence else 1.0,
                "attention_mask": rollout["attention_mask"], "position_ids": rollout["position_ids"]}

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        return self.scorer.validation_metrics(run, batch, student_logits, labels, dataloader_idx)


@torch.no_grad()
def greedy_scores(run: Run, batch: Batch, prompt_tokens: int, new_tokens: int) -> tuple[dict[str, Tensor],
                                                                                        dict[str, Tensor]]:
    """What on-policy training optimizes, on held-out prompts: the student continues each block's first
    ``prompt_tokens`` greedily for ``new_tokens``; on those tokens (up to the first EOS), ``teacher_logprob``: the
    teacher's mean log-prob of them, and ``on_policy_rkl``: the mean KL(student || teacher) of the full
    distributions; per continuation, its ``length`` and its ``distinct_2`` / ``distinct_4`` n-gram shares
    (:func:`lightning_distill.metrics.distinct_ngrams`).

    Returns:
        The means, and per name the weight of its mean (scored tokens, or continuations).
    """
    settings = generation.GenerationSettings(max_new_tokens=new_tokens)
    prompts = batch["input_ids"][:, :prompt_tokens]  # (B, P)
    eos = run.tokenizer.eos_token_id
    new = generation.generate(run.student, prompts, settings, eos, synced_gpus=is_sharded(run.student))
    sequences, targets = generation.training_sequences(prompts, new, eos, run.tokenizer.pad_token_id)  # (B, P + N)
    labels = targets[:, 1:]  # (B, P + N - 1)
    teacher = run.teacher(input_ids=sequences).logits[:, :-1].float()  # (B, P + N - 1, V)
    student = run.student(input_ids=sequences).logits[:, :-1].float()
    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    written = targets[:, prompts.shape[1]:] != IGNORE_INDEX  # (B, N): each continuation up to its first EOS
    values = {"teacher_logprob": reduce_tokens(teacher_logp.reshape(-1), labels),
              "on_policy_rkl": ReverseKL()(student, teacher, labels),
              "length": written.sum(-1).float().mean(),
              **{f"distinct_{n}": distinct_ngrams(new, written.cpu(), n).mean() for n in (2, 4)}}
    tokens, rows = (labels != IGNORE_INDEX).sum(), torch.tensor(prompts.shape[0])
    return values, {"teacher_logprob": tokens, "on_policy_rkl": tokens, "length": rows, "distinct_2": rows,
                    "distinct_4": rows}
