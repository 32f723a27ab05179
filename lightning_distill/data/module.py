"""DistillDataModule: a corpus -> token ids (tokenized once, cached) -> packed blocks (B, T).

Sources are in :mod:`lightning_distill.data.sources`, tokenizing, caching, splitting and packing in
:mod:`lightning_distill.data.tokens`. The data module knows nothing of teachers: stored teacher labels are joined
with its blocks by ``block_idx`` on the model's side (:class:`~lightning_distill.signals.StoredLabels`), which
checks a store against :meth:`DistillDataModule.corpus_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_distill import backbone, checks
from lightning_distill.data.prepare import is_prepared
from lightning_distill.data.sampler import ResumableLoader, ResumableSampler, check_position, train_position
from lightning_distill.data.sources import expand_sources
from lightning_distill.data.tokens import SPLITS, BlockDataset, PlannedBlocks, cached_tokens, pack, split_documents


class DistillDataModule(L.LightningDataModule):
    """Packed blocks of a text corpus, tokenized by the model being trained.

    Batches are dicts: ``input_ids`` (B, T) long; ``labels`` (B, T) long, equal to ``input_ids`` (the model
    shifts); ``block_idx`` (B,) long, the index of each block within its split, by which stored teacher labels
    are joined; with a corpus of several entries, ``source`` (B,) long: the index in ``corpus`` of the entry each
    block comes from (each entry is packed apart, so a block never mixes two; several teachers route by it).
    ``val_dataloader`` and ``test_dataloader`` serve the validation split in order; ``predict_dataloader``
    serves the train split in order, or the blocks a label writer planned (:meth:`plan_predict`).

    Args:
        corpus: a source or a list of sources: ``"builtin:python-docs"``, a text file, a glob, a ``.jsonl``
            file, or a Hugging Face dataset folder written by ``save_to_disk``; or a prepared corpus, streamed
            instead of held in memory (a folder written by :func:`~lightning_distill.data.prepare_corpus`, or
            its copy on object storage, ``s3://...``: see :mod:`lightning_distill.data.streaming`).
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
        ood_corpus: a second validation corpus (e.g. ``builtin:shakespeare``): every method logs its metrics on
            it under ``val_ood/``.
        val_sources: the entries of ``corpus`` the validation split is drawn from (``val_fraction`` of their
            documents, split as if they were the whole corpus); every document of the other entries trains: text
            mixed in for training only, such as ``builtin:smollm2-writing`` beside an in-domain corpus. ``None``:
            every entry.
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
        ood_corpus: str | list[str] | None = None,
        val_sources: list[str] | None = None,
    ) -> None:
        super().__init__()
        checks.integer("block_size", block_size, ">= 2", lambda v: v >= 2, example="128")
        checks.integer("batch_size", batch_size, ">= 1", lambda v: v >= 1, example="8")
        checks.integer("num_workers", num_workers, ">= 0", lambda v: v >= 0, example="0 (load in the main process)")
        checks.require(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an integer",
                       "use any integer, e.g. seed=0")
        if max_documents is not None:
            checks.integer("max_documents", max_documents, ">= 2 (or None to keep every document)", lambda v: v >= 2,
                           example="1000")
        checks.number("val_fraction", val_fraction, "strictly between 0 and 1", lambda v: 0 < v < 1, example="0.1")
        checks.require(isinstance(text_field, str) and bool(text_field), "text_field", text_field,
                       "a non-empty field name such as 'text'")
        checks.require(tokenizer is None or (isinstance(tokenizer, str) and bool(tokenizer)), "tokenizer", tokenizer,
                       "a model name or path, or None for the model's")
        self._stream = _streamed(corpus)  # a prepared corpus: streamed, never packed in memory
        if self._stream is None:
            expand_sources(corpus)  # fail fast on unknown builtins, missing files and empty globs
        if ood_corpus is not None:
            expand_sources(ood_corpus)
        if val_sources is not None:
            check_val_sources(val_sources, corpus, self._stream is not None, max_documents)
        self.save_hyperparameters()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._max_positions: int | None = None
        self._train_blocks: torch.Tensor | None = None  # (N_train, T)
        self._val_blocks: torch.Tensor | None = None  # (N_val, T)
        self._ood_blocks: torch.Tensor | None = None  # (N_ood, T)
        self._sources: dict[str, torch.Tensor] = {}  # split -> corpus entry of each block (N,), several entries
        self._plan: dict[str, list[int]] | None = None  # split -> blocks predict serves (label writer)
        self._resume_at: dict[str, int] | None = None  # {"epoch", "batches"} restored from a checkpoint

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase, max_positions: int | None = None) -> None:
        """Use this tokenizer (e.g. in a notebook); ``max_positions`` bounds ``block_size``."""
        checks.require(isinstance(tokenizer, PreTrainedTokenizerBase), "set_tokenizer's tokenizer", type(tokenizer),
                       "a transformers tokenizer (PreTrainedTokenizerBase)", "load one with "
                       "lightning_distill.load_tokenizer(name), or pass DistillDataModule(tokenizer=name)")
        self._tokenizer, self._max_positions = tokenizer, max_positions
        self._train_blocks = self._val_blocks = self._ood_blocks = None
        self._sources = {}

    @property
    def train_blocks(self) -> torch.Tensor:
        """Packed train blocks, LongTensor (N_train, T), built by :meth:`setup` (a prepared corpus: random access
        to its blocks on disk, :class:`~lightning_distill.data.streaming.StreamedBlocks`)."""
        return _built(self._train_blocks)

    @property
    def streamed(self) -> bool:
        """Whether the corpus is a prepared one, streamed (its blocks record no source)."""
        return self._stream is not None

    @property
    def val_blocks(self) -> torch.Tensor:
        """Packed validation blocks, LongTensor (N_val, T), built by :meth:`setup` (a prepared corpus: as
        :attr:`train_blocks`)."""
        return _built(self._val_blocks)

    def prepare_data(self) -> None:
        """Read and tokenize the corpus into the token cache, unless the cache already holds it."""
        if self._stream is None:
            self._cached_tokens(self.hparams.corpus, self.hparams.max_documents)
        if self.hparams.ood_corpus is not None:
            self._cached_tokens(self.hparams.ood_corpus, None)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokens, split them by document and pack both splits into blocks."""
        if self._train_blocks is None:
            self._build_blocks()

    def corpus_fingerprint(self) -> str:
        """A hash of the packed train and validation blocks: equal fingerprints mean every ``block_idx`` holds
        the same tokens, which stored labels rely on."""
        if self._stream is not None:
            return self._stream.fingerprint(self.hparams.block_size)
        digest = hashlib.sha256()
        for blocks in (self.train_blocks, self.val_blocks):
            digest.update(repr(tuple(blocks.shape)).encode() + blocks.to(torch.int32).numpy().tobytes())
        return digest.hexdigest()[:16]

    def corpus_settings(self) -> dict[str, Any]:
        """What the blocks are made from, for label manifests and error messages."""
        hp = self.hparams
        settings = {"corpus": hp.corpus, "max_documents": hp.max_documents, "seed": hp.seed,
                    "val_fraction": hp.val_fraction, "text_field": hp.text_field}
        return settings if hp.val_sources is None else {**settings, "val_sources": hp.val_sources}

    def plan_predict(self, plan: dict[str, list[int]] | None) -> None:
        """Make :meth:`predict_dataloader` serve only these blocks, one loader per split in this order (the
        share of a label writer on this rank); ``None`` restores the train split in order."""
        for split in plan or {}:
            checks.choice("plan_predict's split", split, SPLITS)
        self._plan = plan
        # every rank keeps one loader per split, so a rank's share of a split may be empty
        self.allow_zero_length_dataloader_with_multiple_devices = plan is not None

    def chunk_starts(self, split: str) -> list[int] | None:
        """The first block of each chunk of a prepared corpus' split (label shards never straddle chunks);
        ``None`` for a corpus held in memory."""
        return None if self._stream is None else self._stream.chunk_starts(split, self.hparams.block_size)

    def _build_blocks(self) -> None:
        if self._stream is not None:  # blocks stay on disk: random access for labelling, streams for training
            tokenizer, hp = self._resolve_tokenizer(), self.hparams
            self._stream.check(tokenizer, hp.block_size, hp.val_fraction, hp.max_documents)
            self._train_blocks, self._val_blocks = (self._stream.blocks(s, hp.block_size) for s in SPLITS)
            return self._build_ood_blocks(tokenizer)
        tokenizer, cache = self._cached_tokens(self.hparams.corpus, self.hparams.max_documents)
        with np.load(cache) as data:
            tokens, offsets, doc_ids = data["tokens"], data["offsets"], data["doc_ids"]  # (N,) (D+1,) (D,)
            entries = data["doc_entries"]  # (D,)
            n_docs = int(json.loads(str(data["meta"]))["n_docs"])
        hp = self.hparams
        row = {int(doc): i for i, doc in enumerate(doc_ids)}  # source index -> row in the cache
        corpus = [hp.corpus] if isinstance(hp.corpus, str) else list(hp.corpus)
        splits = self._split(n_docs, entries[[row[i] for i in range(n_docs)]] if hp.val_sources else None, corpus)
        blocks = []
        for name, ids in zip(SPLITS, splits, strict=True):
            packed = []  # each entry's documents packed apart: a block never mixes two entries
            for entry in range(len(corpus)):
                docs = [tokens[offsets[row[i]] : offsets[row[i] + 1]] for i in ids if entries[row[i]] == entry]
                packed.append(pack(docs, hp.block_size, tokenizer.eos_token_id))  # (N_e, T)
                if len(corpus) > 1 and docs and len(packed[-1]) == 0:
                    rank_zero_warn(f"corpus entry {corpus[entry]!r} gives no {name} block: its {len(docs)} {name} "
                                   f"document(s) hold fewer than block_size={hp.block_size} tokens")
            blocks.append(torch.cat(packed))  # (N, T)
            if len(corpus) > 1:
                self._sources[name] = torch.cat([torch.full((len(b),), e) for e, b in enumerate(packed)])
            if len(blocks[-1]) == 0:
                held = sum(int(offsets[row[i] + 1] - offsets[row[i]]) + 1 for i in ids)  # with an EOS each
                raise ValueError(
                    f"the {name} split of corpus {hp.corpus!r} has {held} tokens "
                    f"({len(ids)} documents), fewer than one block of block_size={hp.block_size}: use a "
                    "smaller block_size or more text"
                )
        self._train_blocks, self._val_blocks = blocks
        self._build_ood_blocks(tokenizer)

    def _split(self, n_docs: int, entry_of: np.ndarray | None, corpus: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation document indices: :func:`split_documents` over every document, or with
        ``val_sources`` over the documents of those entries only (``entry_of`` (D,): each document's entry), the
        other entries' documents all training."""
        hp = self.hparams
        if entry_of is None:
            return split_documents(n_docs, hp.val_fraction, hp.seed, hp.max_documents)
        validated = np.isin(entry_of, [i for i, entry in enumerate(corpus) if entry in hp.val_sources])  # (D,)
        candidates = np.flatnonzero(validated)  # source order, as if those entries were the whole corpus
        train, val = split_documents(len(candidates), hp.val_fraction, hp.seed)
        return np.concatenate([candidates[train], np.flatnonzero(~validated)]), candidates[val]

    def _build_ood_blocks(self, tokenizer: PreTrainedTokenizerBase) -> None:
        hp = self.hparams
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

    def train_dataloader(self) -> DataLoader:
        """Train blocks in an order that is a function of (seed, epoch), each rank its slice of every global batch
        (:class:`~lightning_distill.data.sampler.ResumableSampler`); after :meth:`load_state_dict`, from the
        position a checkpoint recorded. A prepared corpus is streamed by litdata's ``StreamingDataLoader``, whose
        position Lightning keeps in the checkpoint itself."""
        hp = self.hparams
        if self._stream is not None:
            # the epoch to serve: a checkpoint's position (at an epoch's end Lightning restores no loader state, and
            # trainer.current_epoch is not yet advanced when the loader is requested), else the trainer's
            at = self._resume_at or {"epoch": self.trainer.current_epoch if self.trainer is not None else 0}
            self._resume_at, epoch = None, at["epoch"]
            return self._stream.loader("train", hp.block_size, batch_size=hp.batch_size, num_workers=hp.num_workers,
                                       shuffle=True, seed=hp.seed, epoch=epoch)
        dataset = BlockDataset(self.train_blocks, self._sources.get("train"))
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        at = self._resume_at or {"epoch": 0, "batches": 0}
        sampler = ResumableSampler(dataset, replicas, rank, seed=self.hparams.seed, epoch=at["epoch"],
                                   start=at["batches"] * self.hparams.batch_size, batch_size=self.hparams.batch_size)
        self._resume_at = None  # used once: a later loader (another fit) starts afresh
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation blocks in order; with ``ood_corpus``, a second loader over its blocks."""
        val = self._in_order("validation")
        return val if self._ood_blocks is None else [val, self._loader(BlockDataset(self._ood_blocks))]

    def test_dataloader(self) -> DataLoader:
        """The validation blocks in order (there is no separate test split)."""
        return self._in_order("validation")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """Train blocks in order, to label the corpus with a teacher (``block_idx`` keys the labels); after
        :meth:`plan_predict`, one loader per planned split over its planned blocks."""
        if self._plan is None:
            return self._in_order("train")
        blocks = {"train": self.train_blocks, "validation": self.val_blocks}
        return [self._loader(PlannedBlocks(blocks[split], indices)) for split, indices in self._plan.items()]

    def _in_order(self, split: str) -> DataLoader:
        """A split's blocks in order (a prepared corpus: streamed, split over ranks by litdata)."""
        hp = self.hparams
        if self._stream is not None:
            return self._stream.loader(split, hp.block_size, batch_size=hp.batch_size, num_workers=hp.num_workers)
        blocks = self.train_blocks if split == "train" else self.val_blocks
        return self._loader(BlockDataset(blocks, self._sources.get(split)))

    def _loader(self, dataset: Dataset, sampler: ResumableSampler | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        # its own generator: starting an iterator never draws from the global random state, which a checkpoint
        # restores (a resumed run starts iterators at other moments than the uninterrupted one)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        loader = DataLoader if sampler is None else ResumableLoader
        return loader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        """The position in the training order (saved in every checkpoint written during ``fit``)."""
        if self.trainer is None or self.trainer.state.fn != "fit":
            return {}
        return {"train_position": train_position(self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where a checkpoint recorded it (Lightning calls this before asking for the
        train loader)."""
        if "train_position" in state_dict:
            self._resume_at = check_position(state_dict["train_position"])

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

    def _cached_tokens(self, corpus: str | list[str], max_documents: int | None):
        """The tokenizer and the token cache file of a corpus (tokenizing on a cache miss)."""
        tokenizer = self._resolve_tokenizer()
        hp = self.hparams
        return tokenizer, cached_tokens(corpus, tokenizer, text_field=hp.text_field, max_documents=max_documents,
                                        val_fraction=hp.val_fraction, seed=hp.seed)


def check_val_sources(val_sources: Any, corpus: Any, streamed: bool, max_documents: int | None) -> None:
    """``val_sources`` must name entries of an in-memory ``corpus`` of several entries (without ``max_documents``)."""
    entries = [corpus] if isinstance(corpus, str) else corpus
    checks.require(not streamed and len(entries) > 1, "val_sources", val_sources,
                   "given only with a corpus of several entries held in memory (not a prepared, streamed one)",
                   "leave val_sources=None, or pass corpus as a list of sources")
    checks.require(isinstance(val_sources, list) and bool(val_sources) and all(v in entries for v in val_sources),
                   "val_sources", val_sources, f"a non-empty list of entries of corpus ({entries})",
                   f"e.g. val_sources={entries[:1]}")
    checks.require(max_documents is None, "max_documents", max_documents, "None when val_sources is given",
                   "leave max_documents=None, or val_sources=None")


def _streamed(corpus: Any) -> Any:
    """A :class:`~lightning_distill.data.streaming.StreamedCorpus` for a prepared corpus, else ``None`` (imported
    only then: it needs the optional ``litdata``)."""
    if not is_prepared(corpus):
        return None
    from lightning_distill.data.streaming import StreamedCorpus

    return StreamedCorpus(corpus)


def _config_max_positions(name: str) -> int | None:
    """``max_position_embeddings`` of a named model's config, ``None`` when it has no readable config."""
    try:
        config = backbone.load_config(name, role="tokenizer")
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)


def _built(blocks: torch.Tensor | None) -> torch.Tensor:
    if blocks is None:
        raise RuntimeError("call setup() first (the Trainer does) to build the blocks")
    return blocks
