"""DistillDataModule: text sources -> token ids (tokenized once, cached) -> packed blocks (B, T).

A corpus is one source or a list of sources:

- ``builtin:python-docs``: the documentation topics that ship with CPython (``pydoc_data.topics``, ~80 docs).
- ``builtin:shakespeare``: ~16 KB of Shakespeare (public domain) shipped in this package: out-of-domain text for
  measuring what a student keeps of the teacher's general skill (``ood_corpus``).
- a text file or a glob (``docs/**/*.md``): one file is one document, read as UTF-8 (bad bytes replaced).
- a JSONL file (``*.jsonl``): one line is one document, its text in the field ``text_field``.
- a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``: its "train" split or only split).

Documents are tokenized once by the tokenizer of the model being trained (no special tokens) and cached as
one flat int32 array plus document offsets, keyed by source identity and tokenizer fingerprint. They are split
into train/validation by document from ``seed``; each split is packed: documents joined into one stream with
EOS after each, cut into non-overlapping blocks of ``block_size`` tokens, the remainder dropped. Empty
documents are skipped. Cache: ``$LIGHTNING_DISTILL_DATA_CACHE`` or ``~/.cache/lightning_distill/tokens``.

With ``labels=PATH`` (or a module with ``labels=PATH``) each block also carries the teacher's stored signal
(:mod:`lightning_distill.labels`), joined by ``block_idx``; a store made for another tokenizer, block size or
corpus, or with a corrupt shard, is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from lightning_distill import backbone
from lightning_distill.labels import SPLITS, LabelStore, SplitLabels

BUILTIN_CORPORA = ("builtin:python-docs", "builtin:shakespeare")
SHAKESPEARE = Path(__file__).parent / "assets" / "shakespeare.txt"
CACHE_VERSION = 1  # bump when the cache layout or the tokenization changes
PROGRESS_ABOVE = 1000  # show a progress bar when tokenizing more documents than this
TOKENIZE_BATCH = 256  # documents per tokenizer call


class DistillDataModule(L.LightningDataModule):
    """Packed blocks of a text corpus, tokenized by the model being trained.

    Batches are dicts: ``input_ids`` (B, T) long; ``labels`` (B, T) long, equal to ``input_ids`` (the model
    shifts); ``block_idx`` (B,) long, the index of each block within its split, by which stored teacher labels
    are joined; with stored labels, ``teacher``: a dict of tensors (:mod:`lightning_distill.labels`).
    ``val_dataloader`` and ``test_dataloader`` serve the validation split in order; ``predict_dataloader``
    serves the train split in order, or the blocks a label writer planned (:meth:`plan_predict`).

    Args:
        corpus: a source or a list of sources: ``"builtin:python-docs"``, a text file, a glob, a ``.jsonl``
            file, or a Hugging Face dataset folder written by ``save_to_disk``.
        tokenizer: model name or path whose tokenizer to use (:func:`backbone.load_tokenizer`). ``None``: the
            one given to :meth:`set_tokenizer`, else ``trainer.lightning_module.tokenizer``.
        block_size: tokens per block, T; at most the model's maximum positions when known: from the config
            of ``tokenizer``, ``set_tokenizer(..., max_positions=)`` or the module's ``max_positions``.
        batch_size: blocks per batch, B.
        val_fraction: share of documents held out for validation, in (0, 1); at least one document.
        seed: seeds the document shuffle (split and ``max_documents``) and the train loader's shuffle.
        num_workers: ``DataLoader`` worker processes.
        text_field: field (JSONL) or column (Hugging Face dataset) holding the text.
        max_documents: keep the first N documents after the seeded shuffle (quick runs); ``None`` keeps all.
        labels: folder of a label store (:mod:`lightning_distill.labels`) whose records are attached to the
            blocks of both splits by ``block_idx`` (the validation split's when the store holds it). ``None``:
            the ``labels`` of the attached module, if any. The store must match the tokenizer, ``block_size``
            and the corpus blocks (corpus, ``max_documents``, ``seed``, ``val_fraction``); checksums are
            verified when it is opened.
    """

    def __init__(
        self,
        corpus: str | list[str] = "builtin:python-docs",
        tokenizer: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        text_field: str = "text",
        max_documents: int | None = None,
        labels: str | None = None,
        ood_corpus: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        _check_int("block_size", block_size, 2, "use e.g. block_size=128")
        _check_int("batch_size", batch_size, 1, "use e.g. batch_size=8")
        _check_int("num_workers", num_workers, 0, "use num_workers=0 to load in the main process")
        _check_int("seed", seed, None, "use any integer, e.g. seed=0")
        if max_documents is not None:
            _check_int("max_documents", max_documents, 2, "use None to keep every document")
        if (
            not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool)
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction must be a number strictly between 0 and 1 (e.g. 0.1), "
                             f"got {val_fraction!r}")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty field name such as 'text', got {text_field!r}")
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer):
            raise ValueError(f"tokenizer must be a model name or path, or None for the model's, "
                             f"got {tokenizer!r}")
        if labels is not None and (not isinstance(labels, str) or not labels):
            raise ValueError(f"labels must be the folder of a label store, or None, got {labels!r}")
        expand_sources(corpus)  # fail fast on unknown builtins, missing files and empty globs
        if ood_corpus is not None:
            expand_sources(ood_corpus)
        self.save_hyperparameters()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._max_positions: int | None = None
        self._train_blocks: torch.Tensor | None = None  # (N_train, T)
        self._val_blocks: torch.Tensor | None = None  # (N_val, T)
        self._ood_blocks: torch.Tensor | None = None  # (N_ood, T)
        self._stored: dict[str, SplitLabels | None] = {}  # split -> stored labels
        self._store_path: str | None = None
        self.label_manifest: dict[str, Any] | None = None
        self._plan: dict[str, list[int]] | None = None  # split -> blocks predict serves (label writer)

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase, max_positions: int | None = None) -> None:
        """Use this tokenizer (e.g. in a notebook); ``max_positions`` bounds ``block_size``."""
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"set_tokenizer needs a transformers tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer, self._max_positions = tokenizer, max_positions
        self._train_blocks = self._val_blocks = self._ood_blocks = None

    @property
    def train_blocks(self) -> torch.Tensor:
        """Packed train blocks, LongTensor (N_train, T), built by :meth:`setup`."""
        return _built(self._train_blocks)

    @property
    def val_blocks(self) -> torch.Tensor:
        """Packed validation blocks, LongTensor (N_val, T), built by :meth:`setup`."""
        return _built(self._val_blocks)

    def prepare_data(self) -> None:
        """Read and tokenize the corpus into the token cache, unless the cache already holds it."""
        self._cached_tokens(self.hparams.corpus, self.hparams.max_documents)
        if self.hparams.ood_corpus is not None:
            self._cached_tokens(self.hparams.ood_corpus, None)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokens, split them by document and pack both splits into blocks; open the label
        store, if any."""
        if self._train_blocks is None:
            self._build_blocks()
        self._attach_labels()

    def corpus_fingerprint(self) -> str:
        """A hash of the packed train and validation blocks: equal fingerprints mean every ``block_idx`` holds
        the same tokens, which stored labels rely on."""
        digest = hashlib.sha256()
        for blocks in (self.train_blocks, self.val_blocks):
            digest.update(repr(tuple(blocks.shape)).encode() + blocks.to(torch.int32).numpy().tobytes())
        return digest.hexdigest()[:16]

    def corpus_settings(self) -> dict[str, Any]:
        """What the blocks are made from, for label manifests and error messages."""
        hp = self.hparams
        return {"corpus": hp.corpus, "max_documents": hp.max_documents, "seed": hp.seed,
                "val_fraction": hp.val_fraction, "text_field": hp.text_field}

    def plan_predict(self, plan: dict[str, list[int]] | None) -> None:
        """Make :meth:`predict_dataloader` serve only these blocks, one loader per split in this order (the
        share of a label writer on this rank); ``None`` restores the train split in order."""
        if plan is not None and not set(plan) <= set(SPLITS):
            raise ValueError(f"plan_predict takes splits among {SPLITS}, got {sorted(plan)}")
        self._plan = plan
        # every rank keeps one loader per split, so a rank's share of a split may be empty
        self.allow_zero_length_dataloader_with_multiple_devices = plan is not None

    def _build_blocks(self) -> None:
        tokenizer, cache = self._cached_tokens(self.hparams.corpus, self.hparams.max_documents)
        with np.load(cache) as data:
            tokens, offsets, doc_ids = data["tokens"], data["offsets"], data["doc_ids"]  # (N,) (D+1,) (D,)
            n_docs = int(json.loads(str(data["meta"]))["n_docs"])
        hp = self.hparams
        row = {int(doc): i for i, doc in enumerate(doc_ids)}  # source index -> row in the cache
        splits = split_documents(n_docs, hp.val_fraction, hp.seed, hp.max_documents)
        blocks = []
        for name, ids in zip(("train", "validation"), splits, strict=True):
            docs = [tokens[offsets[row[i]] : offsets[row[i] + 1]] for i in ids]
            blocks.append(pack(docs, hp.block_size, tokenizer.eos_token_id))  # (N, T)
            if len(blocks[-1]) == 0:
                raise ValueError(
                    f"the {name} split of corpus {hp.corpus!r} has {sum(len(d) + 1 for d in docs)} tokens "
                    f"({len(ids)} documents), fewer than one block of block_size={hp.block_size}: use a "
                    "smaller block_size or more text"
                )
        self._train_blocks, self._val_blocks = blocks
        if hp.ood_corpus is not None:
            _, ood_cache = self._cached_tokens(hp.ood_corpus, None)
            with np.load(ood_cache) as data:
                tokens, offsets = data["tokens"], data["offsets"]
            docs = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            self._ood_blocks = pack(docs, hp.block_size, tokenizer.eos_token_id)  # (N_ood, T)
            if len(self._ood_blocks) == 0:
                raise ValueError(f"ood_corpus {hp.ood_corpus!r} is shorter than one block of "
                                 f"block_size={hp.block_size}: use more text or a smaller block_size")
        rank_zero_info(f"[lightning_distill] {len(self.train_blocks)} train / {len(self.val_blocks)} "
                       f"validation blocks of {hp.block_size} tokens")

    def _attach_labels(self) -> None:
        """Open the label store (own ``labels``, else the module's) and check it was made for these blocks."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        own, theirs = self.hparams.labels, getattr(module, "labels", None)
        theirs = theirs if isinstance(theirs, str) else None
        if own and theirs and Path(own).resolve() != Path(theirs).resolve():
            raise ValueError(f"the data module's labels={own!r} differs from the model's labels={theirs!r}: set "
                             "it on the model only (the data module takes the model's)")
        path = own or theirs
        if path is None or path == self._store_path:
            return
        store = LabelStore(path)
        store.check(tokenizer=backbone.tokenizer_fingerprint(self._resolve_tokenizer()),
                    block_size=self.hparams.block_size, corpus=self.corpus_fingerprint(),
                    description=self.corpus_settings())
        self._stored = {split: store.split(split) for split in SPLITS}
        self._store_path, self.label_manifest = path, store.manifest

    def train_dataloader(self) -> DataLoader:
        """Train blocks in a seeded shuffled order."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader(BlockDataset(self.train_blocks, self._stored.get("train")), generator)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation blocks in order; with ``ood_corpus``, a second loader over its blocks."""
        val = self._loader(BlockDataset(self.val_blocks, self._stored.get("validation")))
        return val if self._ood_blocks is None else [val, self._loader(BlockDataset(self._ood_blocks))]

    def test_dataloader(self) -> DataLoader:
        """The validation blocks in order (there is no separate test split)."""
        return self._loader(BlockDataset(self.val_blocks, self._stored.get("validation")))

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """Train blocks in order, to label the corpus with a teacher (``block_idx`` keys the labels); after
        :meth:`plan_predict`, one loader per planned split over its planned blocks."""
        if self._plan is None:
            return self._loader(BlockDataset(self.train_blocks))
        blocks = {"train": self.train_blocks, "validation": self.val_blocks}
        return [self._loader(PlannedBlocks(blocks[split], indices)) for split, indices in self._plan.items()]

    def _loader(self, dataset: Dataset, shuffle_with: torch.Generator | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle_with is not None,
                          generator=shuffle_with, num_workers=workers, persistent_workers=workers > 0)

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: ``set_tokenizer``'s, else the ``tokenizer`` name's, else the attached module's."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        module_tokenizer = getattr(module, "tokenizer", None)
        if self._tokenizer is None and self.hparams.tokenizer is not None:
            self._tokenizer = backbone.load_tokenizer(self.hparams.tokenizer)
            self._max_positions = _config_max_positions(self.hparams.tokenizer)
        tokenizer = self._tokenizer if self._tokenizer is not None else module_tokenizer
        if tokenizer is None:
            raise ValueError(
                "DistillDataModule has no tokenizer: pass tokenizer='model name or path', call "
                "set_tokenizer(tokenizer), or attach it to a Trainer whose LightningModule has a .tokenizer"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; documents cannot be separated when packing")
        if module_tokenizer is not None and module_tokenizer is not tokenizer and (
            backbone.tokenizer_fingerprint(module_tokenizer) != backbone.tokenizer_fingerprint(tokenizer)
        ):
            raise ValueError(f"tokenizer={self.hparams.tokenizer!r} differs from the tokenizer of the model "
                             "being trained: leave tokenizer=None to use the model's")
        limits = [p for p in (self._max_positions, getattr(module, "max_positions", None)) if p is not None]
        if limits and self.hparams.block_size > min(limits):
            raise ValueError(f"block_size={self.hparams.block_size} is larger than the model's maximum of "
                             f"{min(limits)} positions: use block_size <= {min(limits)}")
        return tokenizer

    def _cached_tokens(
        self, corpus: str | list[str], max_documents: int | None
    ) -> tuple[PreTrainedTokenizerBase, Path]:
        """The tokenizer and the cache file of a corpus' token ids, tokenizing on a cache miss."""
        tokenizer = self._resolve_tokenizer()
        hp = self.hparams
        key = {
            "version": CACHE_VERSION,
            "sources": [source_identity(kind, at, hp.text_field) for kind, at in expand_sources(corpus)],
            "tokenizer": backbone.tokenizer_fingerprint(tokenizer),
            # with max_documents only the selected documents are tokenized, and the selection follows the seed
            "selection": None if max_documents is None else [max_documents, hp.seed],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = token_cache_dir() / f"tokens-{digest}.npz"
        if path.exists():
            return tokenizer, path
        texts = documents(corpus, hp.text_field)
        if max_documents is None:
            doc_ids = np.arange(len(texts), dtype=np.int64)  # (D,)
        else:
            train_ids, val_ids = split_documents(len(texts), hp.val_fraction, hp.seed, max_documents)
            doc_ids = np.sort(np.concatenate([train_ids, val_ids])).astype(np.int64)  # (D,) in source order
        ids = tokenize_documents(tokenizer, [texts[i] for i in doc_ids])
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)  # (D+1,)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        tokens = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])  # (N,)
        meta = np.array(json.dumps({**key, "n_docs": len(texts), "corpus": corpus}))
        _save_atomic(path, tokens=tokens, offsets=offsets, doc_ids=doc_ids, meta=meta)
        rank_zero_info(f"[lightning_distill] tokenized {len(ids)} documents ({len(tokens)} tokens) "
                       f"into {path}")
        return tokenizer, path


class BlockDataset(Dataset):
    """Items ``{"input_ids": (T,), "labels": (T,), "block_idx": int}`` of packed blocks (N, T), plus
    ``"teacher"`` (a dict of tensors) when stored labels are given."""

    def __init__(self, blocks: torch.Tensor, stored: SplitLabels | None = None) -> None:
        self.blocks = blocks  # (N, T)
        self.stored = stored

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]  # (T,)
        item = {"input_ids": block, "labels": block.clone(), "block_idx": index}
        if self.stored is not None:
            item["teacher"] = self.stored[index]
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


def expand_sources(corpus: str | list[str]) -> list[tuple[str, str]]:
    """Resolve a corpus into ``(kind, location)`` pairs, kind one of ``builtin``, ``text``, ``jsonl``, ``hf``.

    Globs are expanded (sorted, ``**`` recursive). A glob matching no file, a missing path, a folder that is
    not a saved Hugging Face dataset or an unknown builtin raises ``ValueError``.
    """
    entries = [corpus] if isinstance(corpus, str) else corpus
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"corpus must be a source or a non-empty list of sources (strings), got {corpus!r}")
    sources: list[tuple[str, str]] = []
    for entry in entries:
        if entry.startswith("builtin:"):
            if entry not in BUILTIN_CORPORA:
                raise ValueError(f"unknown builtin corpus {entry!r}; known: {list(BUILTIN_CORPORA)}")
            sources.append(("builtin", entry))
            continue
        paths = [os.path.expanduser(entry)]
        if glob.has_magic(entry):
            paths = sorted(p for p in glob.glob(paths[0], recursive=True) if os.path.isfile(p))
            if not paths:
                raise ValueError(f"corpus glob {entry!r} matches no file: check the pattern and the working "
                                 "directory")
        for path in map(Path, paths):
            if path.is_dir() and not any((path / f).exists() for f in ("state.json", "dataset_dict.json",
                                                                           "dataset_info.json")):
                raise ValueError(f"corpus entry {entry!r} is a folder but not a saved Hugging Face dataset; "
                                 f"to read its files pass a glob such as '{entry.rstrip('/')}/**/*.txt'")
            if not path.exists():
                raise ValueError(f"corpus entry {entry!r} does not exist: check the path")
            kind = "hf" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "text"
            sources.append((kind, str(path.resolve())))
    return sources


def source_identity(kind: str, where: str, text_field: str) -> dict[str, Any]:
    """What the tokens of a source depend on: builtin name + Python version; file path + size + mtime; or
    dataset path + a hash of its ``state.json``/``dataset_dict.json`` files (holding its fingerprints)."""
    if kind == "builtin":
        return {"builtin": where, "python": sys.version}
    if kind == "hf":
        digest = hashlib.sha256()
        for state in sorted(Path(where).rglob("*.json")):
            if state.name in ("state.json", "dataset_dict.json"):
                digest.update(str(state.relative_to(where)).encode() + state.read_bytes())
        return {"hf": where, "state": digest.hexdigest(), "text_field": text_field}
    stat = os.stat(where)
    identity: dict[str, Any] = {kind: where, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {**identity, "text_field": text_field} if kind == "jsonl" else identity


def documents(corpus: str | list[str], text_field: str = "text") -> list[str]:
    """The documents of a corpus, in source order; empty (whitespace-only) documents are skipped.

    Raises:
        ValueError: a source that yields no document, a JSONL line that is not an object with a string
            ``text_field``, or a dataset without that column.
        ImportError: a Hugging Face dataset folder when ``datasets`` is not installed.
    """
    texts: list[str] = []
    for kind, where in expand_sources(corpus):
        if where == "builtin:shakespeare":
            found = [SHAKESPEARE.read_text(encoding="utf-8")]
        elif kind == "builtin":
            from pydoc_data.topics import topics

            found = [topics[name] for name in sorted(topics)]
        elif kind == "jsonl":
            found = _read_jsonl(Path(where), text_field)
        elif kind == "hf":
            found = _read_hf(where, text_field)
        else:
            found = [Path(where).read_text(encoding="utf-8", errors="replace")]
        found = [t for t in found if t.strip()]
        if not found:
            raise ValueError(f"corpus source {where!r} holds no text (empty or whitespace only): fill it or "
                             "remove it from corpus")
        texts += found
    return texts


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}, line {number}: no string field text_field={text_field!r} (found "
                                 f"{found}); set text_field to the field holding the text")
            texts.append(record[text_field])
    return texts


def _read_hf(where: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        message = f"{where} is a Hugging Face dataset; reading it needs: pip install datasets"
        raise ImportError(message) from error
    dataset = datasets.load_from_disk(where)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise ValueError(f"{where} has splits {sorted(dataset)} and none is 'train': save the split to "
                             "use on its own")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if text_field not in dataset.column_names:
        raise ValueError(f"{where} has no column text_field={text_field!r} (columns: "
                         f"{dataset.column_names}): set text_field to the column holding the text")
    return [t for t in dataset[text_field] if isinstance(t, str)]


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` to a temporary file, then ``os.replace`` it, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as file:
            np.savez(file, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _config_max_positions(name: str) -> int | None:
    """``max_position_embeddings`` of a named model's config, ``None`` when it has no readable config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(backbone.resolve_model_path(name))
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)


def _built(blocks: torch.Tensor | None) -> torch.Tensor:
    if blocks is None:
        raise RuntimeError("call setup() first (the Trainer does) to build the blocks")
    return blocks


def _check_int(name: str, value: Any, minimum: int | None, fix: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int (not bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}: {fix}")
