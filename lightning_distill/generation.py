"""Sequence generation shared by sequence-level KD (HardDistill ``generate``) and on-policy work: batched
continuations of equal-length prompts, training sequences with everything after the first EOS masked, and the
on-disk cache of a live teacher's continuations."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill import checks
from lightning_distill.backbone import cache_dir, tokenizer_fingerprint
from lightning_distill.files import atomic_write
from lightning_distill.losses import IGNORE_INDEX


@dataclass(frozen=True)
class GenerationSettings:
    """How continuations are sampled.

    Args:
        max_new_tokens: length N of each continuation, >= 1.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature > 0 (with ``do_sample``).
        top_p: nucleus mass in (0, 1] (with ``do_sample``).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        checks.integer("max_new_tokens", self.max_new_tokens, ">= 1", lambda v: v >= 1, "64")
        checks.number("temperature", self.temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1, "1.0")


@torch.no_grad()
def generate(model: PreTrainedModel, prompts: Tensor, settings: GenerationSettings, eos_id: int,
             attention_mask: Tensor | None = None, synced_gpus: bool = False) -> Tensor:
    """Continuations of prompts by ``model`` (batched, KV cache, in eval mode, no gradient).

    Args:
        model: a causal LM (its train/eval mode is restored afterwards).
        prompts: (M, P) token ids: equal-length prompts, or left-padded ones with ``attention_mask``.
        settings: sampling settings.
        eos_id: end-of-sequence id, also used to pad rows that stopped early.
        attention_mask: (M, P), 0 on left padding; ``None``: no padding.
        synced_gpus: keep every rank stepping until all are done (needed when the model is sharded).

    Returns:
        (M, N) new token ids on the CPU, N = ``settings.max_new_tokens``, EOS-padded.
    """
    was_training = model.training
    model.eval()
    sample = settings.do_sample
    mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
    out = model.generate(
        prompts, attention_mask=mask, max_new_tokens=settings.max_new_tokens, do_sample=sample,
        temperature=settings.temperature if sample else None, top_p=settings.top_p if sample else None,
        pad_token_id=eos_id, synced_gpus=synced_gpus,
    )
    model.train(was_training)
    new = out[:, prompts.shape[1]:]  # (M, <= N)
    width = settings.max_new_tokens
    if new.shape[1] < width:  # every row stopped early
        new = torch.cat([new, new.new_full((new.shape[0], width - new.shape[1]), eos_id)], 1)
    return new.cpu()



def continue_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   settings: GenerationSettings, synced: bool = False) -> list[str]:
    """Continue each text prompt, one at a time (no padding), on the model's device; only the new text is
    returned. ``synced``: every rank takes every step (a sharded model)."""
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)  # (1, P)
        new = generate(model, ids, settings, tokenizer.eos_token_id, synced_gpus=synced)  # (1, N)
        texts.append(tokenizer.decode(new[0], skip_special_tokens=True))
    return texts

def training_sequences(prompts: Tensor, continuations: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Training sequences from prompts (B, P) and continuations (B, N).

    Returns:
        ``sequences`` (B, P + N) token ids (padded after the first EOS) and ``targets`` (B, P + N): the
        continuation's tokens up to and including its first EOS, -100 on the prompt and after that EOS.
    """
    continuations = continuations.to(prompts.device)
    is_eos = (continuations == eos_id).long()  # (B, N)
    after_eos = is_eos.cumsum(-1) - is_eos > 0  # past the first EOS
    targets = continuations.masked_fill(after_eos, IGNORE_INDEX)
    targets = torch.cat([torch.full_like(prompts, IGNORE_INDEX), targets], 1)
    return torch.cat([prompts, continuations.masked_fill(after_eos, pad_id)], 1), targets


class GenerationCache:
    """Teacher continuations keyed by the prompt's token ids, one small file per prompt, written atomically: a
    live teacher's continuations (HardDistill ``generate``), reused across epochs and runs (a ``generate`` label
    store is the offline form, read by block).

    Args:
        root: folder of this cache (one folder per teacher + generation settings).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, Tensor] = {}

    @classmethod
    def for_settings(cls, settings: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                     root: str | Path | None = None) -> GenerationCache:
        """The cache for these generation settings: ``root`` (default ``<cache>/generations``) / a hash of the
        settings and the tokenizer, with the settings written beside the files for humans."""
        settings = {**settings, "tokenizer": tokenizer_fingerprint(tokenizer)}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = Path(root or cache_dir() / "generations") / digest
        cache = cls(folder)
        info = folder / "settings.json"
        if not info.exists():
            atomic_write(info, json.dumps(settings, indent=2, sort_keys=True, default=str).encode())
        return cache

    @staticmethod
    def key(prompt: Tensor) -> str:
        """Hash of a prompt's token ids (1-D)."""
        return hashlib.sha1(prompt.to(torch.int64).cpu().numpy().tobytes()).hexdigest()

    def get_many(self, prompts: Tensor) -> list[Tensor | None]:
        """Stored continuations (N,) for each prompt row of (B, P), None where not generated yet."""
        found: list[Tensor | None] = []
        for prompt in prompts:
            key = self.key(prompt)
            if key not in self._memory and (self.root / f"{key}.pt").exists():
                self._memory[key] = torch.load(self.root / f"{key}.pt", weights_only=True)
            found.append(self._memory.get(key))
        return found

    def put_many(self, prompts: Tensor, continuations: Tensor) -> None:
        """Store continuations (B, N) of prompts (B, P)."""
        for prompt, continuation in zip(prompts, continuations, strict=True):
            key = self.key(prompt)
            value = continuation.detach().cpu().clone()
            self._memory[key] = value
            buffer = io.BytesIO()
            torch.save(value, buffer)
            atomic_write(self.root / f"{key}.pt", buffer.getvalue())

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.pt"))
