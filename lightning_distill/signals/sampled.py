"""On-policy distillation: the student writes, the teacher grades every token.

Off-policy KD trains the student on text it would not have written; at generation time its own early mistakes lead
it into states it never trained on. Here the student samples continuations of prompts (batched, KV cache, in eval
mode, no gradient through sampling) and learns from the teacher's signal on its own tokens (GKD, Agarwal et al.
2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", with its on-policy
fraction ``lmbda``; MiniLLM, Gu et al. 2024; "On-Policy Distillation", Thinking Machines 2025). Two losses on the
generated positions (prompt positions and everything after the first EOS are masked):

- a divergence over the full distributions (default reverse KL), from the scoring teacher's distribution;
- ``"sampled_token"``: only the teacher's log-prob of each sampled token, the per-token reverse-KL estimate used as
  a negative advantage on the student's log-probs (:func:`lightning_distill.sparse._sampled_token`), which a
  teacher behind a server or a store can serve cheaply.

Under DDP each rank generates its own share.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_distill import generation, losses
from lightning_distill.losses import IGNORE_INDEX, Divergence
from lightning_distill.prompts import PromptFile, positions
from lightning_distill.signals.base import Batch, Distribution, TeacherSignal
from lightning_distill.sparse import SparseTargets

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule

SAMPLED_TOKEN = "sampled_token"


class StudentSamples(TeacherSignal):
    """The student's own continuations, scored by a teacher source (a live teacher).

    Args:
        scorer: the source that scores the sequences (its ``distribution`` or ``token_logprobs``).
        lmbda: share of training batches that are on-policy, in [0, 1] (GKD's ``lmbda``): 0 never, 1 always.
        loss: a divergence (name or object) over the full distributions, or ``"sampled_token"``.
        settings: how the student samples (``max_new_tokens``, temperature, top-p).
        prompt_tokens: the prompt is a block's first this-many tokens, or at most this many of a prompt file's.
        prompts: a JSONL prompt file (see :mod:`lightning_distill.prompts`); ``None``: prompts from the corpus.
        seed: seeds which steps are on-policy and which file prompts are drawn.
        start: optimizer steps trained off-policy before the first on-policy batch.
    """

    def __init__(self, scorer: TeacherSignal, lmbda: float, loss: str | Divergence,
                 settings: generation.GenerationSettings, prompt_tokens: int, prompts: str | None = None,
                 seed: int = 0, start: int = 0) -> None:
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy batches), got {lmbda}")
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be an integer >= 1, got {prompt_tokens!r}")
        self.scorer, self.lmbda, self.settings, self.prompt_tokens = scorer, lmbda, settings, prompt_tokens
        self.divergence = None if loss == SAMPLED_TOKEN else losses.divergence_from(loss)
        self.prompts_path, self.seed, self.start = prompts, seed, start
        self.prompt_file: PromptFile | None = None
        self.generated = 0  # tokens generated in the last rollout
        self.seconds = 0.0  # time it took

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return self.scorer.needs_teacher

    def setup(self, module: DistillModule, stage: str) -> None:
        self.scorer.setup(module, stage)
        if self.prompts_path is not None and self.prompt_file is None:
            self.prompt_file = PromptFile(self.prompts_path, module.tokenizer, self.prompt_tokens)

    def chooses(self, step: int) -> bool:
        """Whether the batch of optimizer step ``step`` is on-policy: never before ``start``, then a seeded coin with
        P(heads) = ``lmbda`` (a function of the step alone, so a resumed run chooses as an uninterrupted one)."""
        if self.lmbda == 0 or step < self.start:
            return False
        return self.lmbda == 1 or random.Random(f"{self.seed}-{step}").random() < self.lmbda

    def rollout(self, module: DistillModule, batch: Batch) -> dict[str, Tensor | None]:
        """The student's continuations of the batch's prompts: ``input_ids`` (B, P + N); ``labels`` (B, P + N): the
        sampled tokens up to and including the first EOS, -100 elsewhere; ``attention_mask`` and ``position_ids``
        for left-padded file prompts (else ``None``)."""
        device = batch["input_ids"].device
        if self.prompt_file is None:
            prompts, mask = batch["input_ids"][:, : self.prompt_tokens], None  # (B, P), equal lengths
        else:
            rank = module.global_rank if module._trainer is not None else 0
            drawn = self.prompt_file.batch(batch["input_ids"].shape[0], seed=hash((self.seed, module.global_step,
                                                                                     rank)) % 2**62)
            prompts, mask = drawn["input_ids"].to(device), drawn["attention_mask"].to(device)
        start = time.perf_counter()
        new = generation.generate(module.student, prompts, self.settings, module.tokenizer.eos_token_id,
                                  attention_mask=mask, synced_gpus=_sharded(module))  # (B, N)
        self.seconds, self.generated = time.perf_counter() - start, new.numel()
        sequences, labels = generation.training_sequences(prompts, new, module.tokenizer.eos_token_id,
                                                          module.tokenizer.pad_token_id)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(sequences[:, prompts.shape[1]:])], 1)  # (B, P + N)
        return {"input_ids": sequences, "labels": labels, "attention_mask": mask,
                "position_ids": None if mask is None else positions(mask)}

    def distribution(self, module: DistillModule, batch: Batch, split: str = "train") -> Distribution:
        """Off-policy batches: the scorer's distribution of the corpus text, as without on-policy training."""
        return self.scorer.distribution(module, batch, split)

    def target(self, module: DistillModule, rollout: Batch) -> Distribution:
        """The loss target on a rollout: the scorer's distribution, or (``sampled_token``) the student's tokens with
        the scorer's log-probs of them."""
        if self.divergence is None:
            return SparseTargets.from_token_logprobs(rollout["input_ids"], self.scorer.token_logprobs(module, rollout))
        return self.scorer.distribution(module, rollout)

    def loss_inputs(self, module: DistillModule, batch: Batch, temperature: float) -> dict[str, Any]:
        """Everything :meth:`DistillModule.student_loss` needs for an on-policy step on ``batch``'s prompts: the
        rollout, its target and loss settings (no CE term: the labels are the student's own tokens)."""
        rollout = self.rollout(module, batch)
        return {"input_ids": rollout["input_ids"], "targets": rollout["labels"],
                "teacher": self.target(module, rollout), "ce_weight": 0.0,
                "divergence": self.divergence or "forward_kl", "temperature": temperature if self.divergence else 1.0,
                "attention_mask": rollout["attention_mask"], "position_ids": rollout["position_ids"]}

    def validation_metrics(self, module: DistillModule, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        return self.scorer.validation_metrics(module, batch, student_logits, labels, dataloader_idx)


@torch.no_grad()
def greedy_scores(module: DistillModule, batch: Batch, prompt_tokens: int, new_tokens: int) -> tuple[dict, Tensor]:
    """What on-policy training optimizes, on held-out prompts: the student continues each block's first
    ``prompt_tokens`` greedily for ``new_tokens``; on those tokens (up to the first EOS), ``teacher_logprob``: the
    teacher's mean log-prob of them, and ``on_policy_rkl``: the mean KL(student || teacher) of the full
    distributions.

    Returns:
        The two means and the number of scored tokens (their weight).
    """
    settings = generation.GenerationSettings(max_new_tokens=new_tokens)
    prompts = batch["input_ids"][:, :prompt_tokens]  # (B, P)
    new = generation.generate(module.student, prompts, settings, module.tokenizer.eos_token_id,
                              synced_gpus=_sharded(module))
    sequences, targets = generation.training_sequences(prompts, new, module.tokenizer.eos_token_id,
                                                       module.tokenizer.pad_token_id)  # (B, P + N)
    labels = targets[:, 1:]  # (B, P + N - 1)
    teacher = module.teacher(input_ids=sequences).logits[:, :-1].float()  # (B, P + N - 1, V)
    student = module(sequences)[:, :-1].float()
    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    values = {"teacher_logprob": losses.reduce_tokens(teacher_logp.reshape(-1), labels),
              "on_policy_rkl": losses.reverse_kl(student, teacher, labels)}
    return values, (labels != IGNORE_INDEX).sum()


def _sharded(module: DistillModule) -> bool:
    """Whether the models are sharded across ranks (then every rank must step through generation together)."""
    if module._trainer is None or module.trainer.world_size == 1:
        return False
    return type(module.trainer.strategy).__name__.startswith(("FSDP", "DeepSpeed", "ModelParallel"))

