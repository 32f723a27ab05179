"""Token ids of a corpus: tokenized once, cached on disk, split by document and packed into blocks.

Documents are tokenized by the tokenizer of the model being trained (no special tokens) and cached as one flat
int32 array plus document offsets, keyed by source identity and tokenizer fingerprint. They are split into
train/validation by document from a seed; each split is packed (:func:`pack`): documents joined into one stream
with EOS after each, cut into non-overlapping blocks, the remainder dropped, served by :class:`BlockDataset`.
Cache: ``$LIGHTNING_DISTILL_DATA_CACHE`` or ``~/.cache/lightning_distill/tokens``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from lightning_distill import backbone
from lightning_distill.data.sources import documents, expand_sources, source_identity
from lightning_distill.files import atomic_write

SPLITS = ("train", "validation")  # the splits of every corpus, in this order (that of split_documents' result)
CACHE_VERSION = 2  # bump when the cache layout or the tokenization changes
PROGRESS_ABOVE = 1000  # show a progress bar when tokenizing more documents than this
TOKENIZE_BATCH = 256  # documents per tokenizer call


def cached_tokens(corpus: str | list[str], tokenizer: PreTrainedTokenizerBase, *, text_field: str = "text",
                  max_documents: int | None = None, val_fraction: float = 0.1, seed: int = 0) -> Path:
    """The cache file of a corpus' token ids (``tokens`` (N,), ``offsets`` (D+1,), ``doc_ids`` (D,),
    ``doc_entries`` (D,): the index of each document's entry in ``corpus``, ``meta``), tokenizing on a cache miss.
    With ``max_documents`` only the documents :func:`split_documents` keeps are tokenized."""
    key = {
        "version": CACHE_VERSION,
        "sources": [source_identity(kind, at, text_field) for kind, at in expand_sources(corpus)],
        "tokenizer": backbone.tokenizer_fingerprint(tokenizer),
        # with max_documents only the selected documents are tokenized, and the selection follows the seed
        "selection": None if max_documents is None else [max_documents, seed],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = token_cache_dir() / f"tokens-{digest}.npz"
    if path.exists():
        return path
    entries = [corpus] if isinstance(corpus, str) else list(corpus)
    per_entry = [documents(entry, text_field) for entry in entries]
    texts = [text for found in per_entry for text in found]
    entry_of = np.repeat(np.arange(len(entries)), [len(found) for found in per_entry])  # (all documents,)
    if max_documents is None:
        doc_ids = np.arange(len(texts), dtype=np.int64)  # (D,)
    else:
        train_ids, val_ids = split_documents(len(texts), val_fraction, seed, max_documents)
        doc_ids = np.sort(np.concatenate([train_ids, val_ids])).astype(np.int64)  # (D,) in source order
    ids = tokenize_documents(tokenizer, [texts[i] for i in doc_ids])
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)  # (D+1,)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    tokens = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])  # (N,)
    meta = np.array(json.dumps({**key, "n_docs": len(texts), "corpus": corpus}))
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens, offsets=offsets, doc_ids=doc_ids, doc_entries=entry_of[doc_ids], meta=meta)
    atomic_write(path, buffer.getvalue())
    rank_zero_info(f"[lightning_distill] tokenized {len(ids)} documents ({len(tokens)} tokens) into {path}")
    return path


def split_documents(
    n_docs: int, val_fraction: float, seed: int, max_documents: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices of the train and validation documents.

    The document order is shuffled by a generator seeded with ``seed``; the first ``max_documents`` are kept
    (all when ``None``) and the last ``ceil(val_fraction * kept)`` of those, at least one, go to validation.

    Returns:
        ``(train_ids, val_ids)``: disjoint int64 arrays, in shuffled order.
    """
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).numpy()
    if max_documents is not None:
        order = order[:max_documents]
    n_val = max(1, math.ceil(val_fraction * len(order)))
    if len(order) - n_val < 1:
        raise ValueError(
            f"{len(order)} document(s) leave none for training with val_fraction={val_fraction}: add "
            "documents (e.g. split a long text into several files or JSONL lines) or lower val_fraction"
        )
    return order[:-n_val], order[-n_val:]


def pack(token_docs: Sequence[Sequence[int] | np.ndarray | torch.Tensor], block_size: int,
         eos_id: int) -> torch.Tensor:
    """Join documents into one stream, EOS after each, and cut it into non-overlapping blocks.

    Args:
        token_docs: the token ids of each document, without special tokens.
        block_size: tokens per block, T.
        eos_id: the id appended after every document.

    Returns:
        LongTensor (num_blocks, T); the tail shorter than a block is dropped (num_blocks may be 0).
    """
    eos = torch.tensor([eos_id], dtype=torch.long)
    pieces = [p for doc in token_docs for p in (torch.as_tensor(np.asarray(doc), dtype=torch.long), eos)]
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)  # (L,)
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].view(n_blocks, block_size)  # (num_blocks, T)


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, no special tokens added; a progress bar above ``PROGRESS_ABOVE`` texts."""
    from tqdm.auto import tqdm

    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc="tokenizing", unit="doc", disable=len(texts) <= PROGRESS_ABOVE) as bar:
        for start in range(0, len(texts), TOKENIZE_BATCH):
            batch = list(texts[start : start + TOKENIZE_BATCH])
            ids += tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            bar.update(len(batch))
    return ids


def token_cache_dir() -> Path:
    """Where token caches are kept: ``$LIGHTNING_DISTILL_DATA_CACHE``, else ``cache_dir() / "tokens"``."""
    root = os.environ.get("LIGHTNING_DISTILL_DATA_CACHE")
    return Path(root) if root else backbone.cache_dir() / "tokens"


class BlockDataset(Dataset):
    """Items ``{"input_ids": (T,), "labels": (T,), "block_idx": int}`` of packed blocks (N, T), and ``"source"``:
    the index of the block's corpus entry, when ``sources`` (N,) is given (a corpus of several entries)."""

    def __init__(self, blocks: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        self.blocks, self.sources = blocks, sources  # (N, T), (N,)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]  # (T,)
        item = {"input_ids": block, "labels": block.clone(), "block_idx": index}
        if self.sources is not None:
            item["source"] = int(self.sources[index])
        return item


class PlannedBlocks(IterableDataset):
    """The items of :class:`BlockDataset` for the given block indices, in order, each DataLoader worker taking
    every n-th one. Iterable, so that Lightning does not split it again over ranks: it already is this rank's
    share (see :meth:`DistillDataModule.plan_predict`)."""

    def __init__(self, blocks: torch.Tensor, indices: list[int]) -> None:
        self.dataset, self.indices = BlockDataset(blocks), list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        worker = get_worker_info()
        mine = self.indices if worker is None else self.indices[worker.id :: worker.num_workers]
        return (self.dataset[i] for i in mine)
