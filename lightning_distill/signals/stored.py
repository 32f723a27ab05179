"""The teacher's signal read from a label store (:mod:`lightning_distill.store`), written once by
``lightning-distill predict``: the teacher is never kept in memory.

This is the one place where a store is opened, checked (checksums; the method's settings; tokenizer, block size
and corpus of the data module) and joined with the batches, by each block's ``block_idx`` within its split. Records
are memory-mapped and gathered per batch, so a store is never held in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_distill import checks, metrics
from lightning_distill.backbone import Run, tokenizer_fingerprint
from lightning_distill.data import SPLITS
from lightning_distill.generation import GenerationSettings
from lightning_distill.losses import SparseTargets
from lightning_distill.losses.sparse import TAILS
from lightning_distill.signals.base import Batch, TeacherSignal
from lightning_distill.store import LabelStore, SplitLabels, read_manifest


class StoredLabels(TeacherSignal):
    """Stored teacher labels of the corpus the data module serves.

    Args:
        path: folder of a complete label store.
        tail: ``topk`` stores: how the teacher's missing mass is treated (see
            :func:`lightning_distill.losses.topk_forward_kl`), ``"bucket"`` or ``"renorm"``.
    """

    needs_teacher = False

    def __init__(self, path: str, tail: str = "bucket") -> None:
        checks.require(isinstance(path, str) and bool(path), "labels", path,
                       "the folder of a label store, or None for a live teacher")
        checks.choice("tail", tail, TAILS)
        self.path, self.tail = path, tail
        self.store: LabelStore | None = None
        self.splits: dict[str, SplitLabels | None] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        """The store's manifest (read on first use)."""
        return self.store.manifest if self.store is not None else read_manifest(self.path)

    def setup(self, run: Run, stage: str, data: Any = None) -> None:
        """Open the store (checksums verified) and check it was made for the data module's blocks (the method has
        checked its own settings against :attr:`manifest`)."""
        if self.store is not None:
            return
        self.store = LabelStore(self.path)
        if data is not None and hasattr(data, "corpus_fingerprint"):
            self.store.check(tokenizer=tokenizer_fingerprint(run.tokenizer), block_size=data.hparams.block_size,
                             corpus=data.corpus_fingerprint(), description=data.corpus_settings())
        else:
            rank_zero_warn(f"labels={self.path!r}: no DistillDataModule to check the store against; the batches "
                           "must be its blocks, in order of block_idx")
        self.splits = {split: self.store.split(split) for split in SPLITS}

    def records(self, batch: Batch, split: str) -> dict[str, Tensor]:
        """The stored records of the batch's blocks, stacked, on the batch's device: (B, T, ...) per field."""
        if self.store is None:
            raise RuntimeError(f"labels={self.path!r} is not open: the module's setup() opens it (the Trainer "
                               "calls it)")
        labels = self.splits.get(split)
        if labels is None:
            raise ValueError(f"labels={self.path!r} holds no {split!r} split: label it (LabelWriter(splits=...))")
        blocks = batch["block_idx"].tolist()
        rows = [labels[block] for block in blocks]
        device = batch["input_ids"].device
        return {name: torch.stack([row[name] for row in rows]).to(device) for name in rows[0]}

    def distribution(self, run: Run, batch: Batch, split: str = "train") -> SparseTargets:
        stored = self.records(batch, split)
        if "topk_ids" in stored:
            return SparseTargets("topk", stored["topk_ids"], stored["topk_logprobs"], self.tail)
        if "sample_ids" in stored:
            return SparseTargets("sampled", stored["sample_ids"], stored["sample_weights"])
        raise ValueError(f"labels={self.path!r} is a {self.manifest['kind']!r} store: it holds no distribution")

    def picks(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        stored = self.records(batch, split)
        if "argmax" not in stored:
            raise ValueError(f"labels={self.path!r} is a {self.manifest['kind']!r} store: it holds no picks")
        return stored["argmax"]

    def continuations(self, run: Run, batch: Batch, prompt_tokens: int,
                      settings: GenerationSettings, split: str = "train") -> Tensor:
        stored = self.records(batch, split)
        if "continuation" not in stored:
            raise ValueError(f"labels={self.path!r} is a {self.manifest['kind']!r} store: it holds no "
                             "continuations")
        return stored["continuation"]

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        """Against the stored validation labels (the first validation loader only)."""
        if dataloader_idx != 0 or self.splits.get("validation") is None:
            return {}
        stored = self.records(batch, "validation")
        stored = {name: value if name == "continuation" else value[:, :-1] for name, value in stored.items()}
        return metrics.against_stored(student_logits, stored, labels, self.manifest["temperature"])

    def cannot(self, question: str) -> str:
        return f"labels={self.path!r} is a {self.manifest['kind']!r} store"
