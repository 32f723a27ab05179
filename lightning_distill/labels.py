"""Stored teacher signal.

:class:`GenerationCache`: teacher continuations of prompts (HardDistill ``generate``), kept on disk so that they are
generated once and reused across epochs and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_distill.backbone import cache_dir, tokenizer_fingerprint


class GenerationCache:
    """Teacher continuations keyed by the prompt's token ids, one small file per prompt, written atomically.

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
            _atomic_write_bytes(info, json.dumps(settings, indent=2, sort_keys=True, default=str).encode())
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
            path = self.root / f"{key}.pt"
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            torch.save(value, tmp)
            os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.pt"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
