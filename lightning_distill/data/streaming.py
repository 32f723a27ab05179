"""A prepared corpus (:mod:`lightning_distill.data.prepare`) streamed for training with Lightning's ``litdata``.

Nothing holds the corpus in memory: each split is a ``litdata.StreamingDataset`` over ``TokensLoader`` blocks of T
tokens, cut from each chunk's token stream (a chunk's last ``tokens % T`` tokens are not used). Block ``i`` of a split
is the i-th block in chunk order, the same in every process, so ``block_idx`` joins stored teacher labels with the
batches as it does for the in-memory corpus. The train split is shuffled (chunk order, then blocks within windows,
reseeded every epoch) and split over DDP ranks and DataLoader workers by litdata; its ``StreamingDataLoader`` is
stateful, so Lightning puts the position in the stream into every checkpoint and a resumed fit continues with the
batches an uninterrupted one would have seen.

Local folders are memory-mapped in place; object-storage URIs (``s3://bucket/corpus``) are downloaded chunk by
chunk into a cache (``$LIGHTNING_DISTILL_DATA_CACHE/streamed``), within litdata's cache budget.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_distill.backbone import tokenizer_fingerprint
from lightning_distill.data.prepare import FORMAT, MANIFEST, REMOTE, require_litdata
from lightning_distill.data.tokens import SPLITS, token_cache_dir
from lightning_distill.files import atomic_write

litdata = require_litdata()
from litdata.streaming.sampler import ChunkedIndex  # noqa: E402 (after the check that litdata is installed)


class BlockStream(litdata.StreamingDataset):
    """litdata's ``StreamingDataset`` of T-token blocks, each served as ``{"input_ids": (T,), "labels": (T,),
    "block_idx": int}`` like :class:`~lightning_distill.data.BlockDataset`; ``block_idx`` is the block's place in
    its split."""

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:
        block = super().__getitem__(index)  # (T,) uint16 or int32
        ids = torch.from_numpy(np.asarray(block).astype(np.int64))  # (T,)
        position = index.index if isinstance(index, ChunkedIndex) else int(index)
        return {"input_ids": ids, "labels": ids.clone(), "block_idx": position}


class BlockLoader(litdata.StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` (stateful: Lightning saves its ``state_dict`` in checkpoints and restores it
    on resume), with the restored position replayed in the resumed epoch only.

    litdata clears its "restoring" flag when an epoch's iterator runs to its end, but Lightning stops an epoch after
    ``len(loader)`` batches without exhausting it, so the epoch after a resumed one would replay the restored
    position instead of starting a new, reshuffled epoch (litData issues #760 and #770 are this bug in
    ``ParallelStreamingDataset``). Here a restored position serves one ``iter()`` only.
    """

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._served_restored = False

    def __iter__(self) -> Any:
        if self.restore and getattr(self, "_served_restored", False):
            self.restore = False  # the restored epoch was served: this iter() starts the next epoch
        self._served_restored = self.restore
        return super().__iter__()


class StreamedBlocks:
    """Random access to the blocks of one split: ``len()`` and ``[i]`` -> LongTensor (T,) (labelling and checks;
    training streams instead)."""

    def __init__(self, dataset: BlockStream, num_blocks: int, block_size: int) -> None:
        self.dataset, self.num_blocks, self.block_size = dataset, num_blocks, block_size

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_blocks, self.block_size)

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= int(index) < self.num_blocks:
            raise IndexError(f"block {index} is outside the {self.num_blocks} blocks of this split")
        return self.dataset[int(index)]["input_ids"]  # (T,)


class StreamedCorpus:
    """A prepared corpus opened for reading: its manifest, and litdata datasets and loaders over its splits.

    Args:
        uri: the prepared folder, or its copy on object storage (``s3://...``, ``gs://...``, ``azure://...``).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.remote = self.uri.startswith(REMOTE)
        self.cache = token_cache_dir() / "streamed" / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The corpus' ``corpus.json`` (read on first use; downloaded for a remote corpus)."""
        if self._manifest is None:
            path = Path(self.uri).expanduser() / MANIFEST
            if self.remote:
                path = self.cache / MANIFEST
                path.unlink(missing_ok=True)
                self.cache.mkdir(parents=True, exist_ok=True)
                from litdata.streaming.downloader import get_downloader

                get_downloader(self.uri, str(self.cache), []).download_file(f"{self.uri}/{MANIFEST}", str(path))
            try:
                manifest = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"corpus {self.uri!r} has no readable {MANIFEST} ({error}): prepare it with "
                                 "lightning_distill.data.prepare_corpus or `lightning-distill prepare`") from None
            if manifest.get("format") != FORMAT or not manifest.get("complete"):
                raise ValueError(f"corpus {self.uri!r} is not a complete prepared corpus of format {FORMAT!r}: "
                                 "prepare it (again) with `lightning-distill prepare`")
            self._manifest = manifest
        return self._manifest

    def verify(self) -> None:
        """Check every chunk of a local corpus against the size and SHA-256 ``corpus.json`` records, before any
        block of it is read: a truncated or changed chunk is a ``ValueError`` naming it. Up front, once per copy:
        the size and modification time of each verified chunk are kept in the cache (``verified.json``), and a
        chunk whose size and time have not changed since is not hashed again (hashing reads the whole corpus, about
        0.5 GB/s per core). A remote corpus' chunks are fetched by litdata as they are read and are not hashed."""
        if self.remote:
            return
        root, stamps_file = Path(self.uri).expanduser(), self.cache / "verified.json"
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, json.JSONDecodeError):
            stamps = {}
        for split in SPLITS:
            for chunk in self.manifest["splits"][split]["chunks"]:
                file = root / chunk["file"]
                if not file.is_file():
                    raise ValueError(f"corpus {self.uri!r}: chunk {chunk['file']} is missing: copy the whole "
                                     "prepared folder, or prepare the corpus again (lightning-distill prepare)")
                stat = file.stat()
                stamp = [stat.st_size, stat.st_mtime_ns, chunk["sha256"]]
                if stamps.get(chunk["file"]) == stamp:
                    continue
                if file_sha256(file) != chunk["sha256"]:
                    raise ValueError(f"corpus {self.uri!r}: chunk {chunk['file']} ({stat.st_size} bytes) does not "
                                     f"match the SHA-256 corpus.json records for it (truncated or changed): copy it "
                                     "again from the original, or prepare the corpus again (lightning-distill "
                                     "prepare ... --overwrite)")
                stamps[chunk["file"]] = stamp
        atomic_write(stamps_file, json.dumps(stamps).encode())

    def check(self, tokenizer: PreTrainedTokenizerBase, block_size: int, val_fraction: float,
              max_documents: int | None) -> None:
        """Refuse settings the prepared corpus cannot serve, naming the argument and the fix, and a chunk that
        fails its checksum (:meth:`verify`)."""
        m, where = self.manifest, f"corpus {self.uri!r}"
        self.verify()
        if tokenizer_fingerprint(tokenizer) != m["tokenizer"]:
            raise ValueError(f"{where} was tokenized by another tokenizer (fingerprint {m['tokenizer']}): prepare it "
                             "again with the tokenizer of the model being trained")
        if max_documents is not None:
            raise ValueError(f"max_documents={max_documents} applies to raw sources; {where} is prepared: use "
                             "max_documents=None (or prepare a smaller corpus)")
        if val_fraction != m["val_fraction"]:
            raise ValueError(f"{where} was split at preparation with val_fraction={m['val_fraction']}: pass "
                             f"val_fraction={m['val_fraction']} (or prepare it again)")
        for split in SPLITS:
            if self.num_blocks(split, block_size) == 0:
                raise ValueError(f"the {split} split of {where} holds no block of block_size={block_size}: use a "
                                 "smaller block_size or prepare more text")

    def chunk_blocks(self, split: str, block_size: int) -> list[int]:
        """Blocks of T = ``block_size`` tokens in each chunk of a split, in stream order."""
        return [chunk["tokens"] // block_size for chunk in self.manifest["splits"][split]["chunks"]]

    def chunk_starts(self, split: str, block_size: int) -> list[int]:
        """Index of the first block of each chunk of a split (label shards never straddle these)."""
        return [int(x) for x in np.cumsum([0, *self.chunk_blocks(split, block_size)[:-1]])]

    def num_blocks(self, split: str, block_size: int) -> int:
        return sum(self.chunk_blocks(split, block_size))

    def fingerprint(self, block_size: int) -> str:
        """A hash of the chunks' checksums and the block size: equal fingerprints mean equal blocks."""
        chunks = {split: [c["sha256"] for c in self.manifest["splits"][split]["chunks"]] for split in SPLITS}
        return hashlib.sha256(json.dumps([chunks, block_size]).encode()).hexdigest()[:16]

    def dataset(self, split: str, block_size: int, *, shuffle: bool = False, seed: int = 0) -> BlockStream:
        """litdata's dataset over a split's blocks (created where it is used: it reads the DDP rank then)."""
        where, cache = f"{self.uri}/{split}", None
        if not self.remote:
            where = str(Path(self.uri).expanduser().resolve() / split)
        else:
            cache = str(self.cache / split)
        return BlockStream(where, cache_dir=cache, item_loader=litdata.TokensLoader(block_size=block_size),
                           shuffle=shuffle, seed=seed, drop_last=True if shuffle else None)

    def blocks(self, split: str, block_size: int) -> StreamedBlocks:
        """Random access to a split's blocks."""
        return StreamedBlocks(self.dataset(split, block_size), self.num_blocks(split, block_size), block_size)

    def loader(self, split: str, block_size: int, *, batch_size: int, num_workers: int, shuffle: bool = False,
               seed: int = 0, epoch: int = 0) -> Any:
        """A ``StreamingDataLoader`` (stateful: resumable from a checkpoint) over a split; its first ``iter()`` serves
        epoch ``epoch`` (0-based, the trainer's: the shuffle of a run restored at an epoch's end, where Lightning
        restores no loader state, follows the uninterrupted run's)."""
        dataset = self.dataset(split, block_size, shuffle=shuffle, seed=seed)
        loader = BlockLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        loader.current_epoch = epoch  # litdata counts epochs from 1, adding one at every iter()
        return loader

    def clear_cache(self) -> None:
        """Delete the downloaded chunks of a remote corpus."""
        shutil.rmtree(self.cache, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read 8 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**23), b""):
            digest.update(block)
    return digest.hexdigest()
