"""Reading a complete label store: manifest checked, shards verified (checksums, and the records the manifest
describes), records by block index (memory-mapped)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lightning_distill.files import sha256
from lightning_distill.store.format import decode, locate, read_manifest, record_dtype, split_starts

OPEN_SHARDS = 16  # memory maps kept open per split and process: what a store's reader holds stays flat with its size


class LabelStore:
    """A complete label store, opened for reading: manifest checked, every shard's checksum verified.

    Args:
        path: the store's folder.
        verify: check each shard's SHA-256 against the manifest (reads every byte once).
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(path)
        if not self.manifest.get("complete"):
            raise ValueError(f"label store {str(path)!r} is unfinished (an interrupted or running labelling): run "
                             "the same `lightning-distill predict` again, it resumes where it stopped")
        if verify:
            self.verify()

    def record_dtype(self) -> np.dtype | None:
        """The records the manifest's ``record`` layout describes, checked against its kind, k or num_samples,
        value dtype, block size and vocabulary (an edited ``k`` no longer fits); ``None`` for a manifest without
        a layout."""
        m, where = self.manifest, f"label store {str(self.path)!r}"
        if "record" not in m:
            return None
        try:
            layout = np.dtype([(name, kind, tuple(shape)) for name, kind, shape in m["record"]])
            described = record_dtype(m["kind"], m["block_size"], m["vocab_size"], k=m.get("k") or 1,
                                     num_samples=m.get("num_samples") or 1, value_dtype=m["value_dtype"],
                                     new_tokens=(m.get("generation") or {}).get("max_new_tokens", 0))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: manifest.json is damaged or edited ({error}): label the corpus again "
                             "(lightning-distill predict ... with overwrite: true)") from None
        if layout != described:
            raise ValueError(f"{where}: manifest.json says kind={m['kind']!r}, k={m.get('k')}, num_samples="
                             f"{m.get('num_samples')}, value_dtype={m['value_dtype']!r}, block_size={m['block_size']}, "
                             f"but its records are laid out as {layout.descr}: the manifest was edited; label the "
                             "corpus again (lightning-distill predict ... with overwrite: true)")
        return layout

    def verify(self) -> None:
        """Raise ``ValueError`` naming the first shard whose file is missing, fails its checksum, or holds other
        records than the manifest describes (an edited ``k``, ``kind`` or ``value_dtype``)."""
        expected, m = self.record_dtype(), self.manifest
        for split in m["splits"].values():
            for shard in split["shards"]:
                file = self.path / shard["file"]
                if not file.exists() or sha256(file.read_bytes()) != shard["sha256"]:
                    problem = "is missing" if not file.exists() else "fails its checksum (corrupt or changed)"
                    raise ValueError(f"label store {str(self.path)!r}: shard {shard['file']} {problem}: label "
                                     "the corpus again (lightning-distill predict ... with overwrite: true)")
                held = np.load(file, mmap_mode="r").dtype
                if expected is not None and held != expected:
                    raise ValueError(f"label store {str(self.path)!r}: manifest.json describes records of "
                                     f"{expected.itemsize} bytes {expected.descr}, but shard {shard['file']} holds "
                                     f"records of {held.itemsize} bytes {held.descr}: the manifest was edited or the "
                                     "shards are another store's: label the corpus again")

    def check(self, *, tokenizer: str, block_size: int, corpus: str, description: dict[str, Any]) -> None:
        """Refuse a store made for other data, saying which of tokenizer, block size or corpus differs.

        Args:
            tokenizer: fingerprint of the tokenizer in use (:func:`backbone.tokenizer_fingerprint`).
            block_size: T of the data module.
            corpus: the data module's corpus fingerprint (a hash of its train and validation blocks).
            description: the data module's corpus settings, shown in the error.
        """
        m, where = self.manifest, f"label store {str(self.path)!r}"
        if m["tokenizer"] != tokenizer:
            raise ValueError(f"{where} was labelled by {m['teacher']!r} with another tokenizer (fingerprint "
                             f"{m['tokenizer']}, here {tokenizer}): train a student sharing the teacher's tokenizer, "
                             "or label the corpus with this one")
        if m["block_size"] != block_size:
            raise ValueError(f"{where} holds blocks of block_size={m['block_size']}, the data module makes "
                             f"block_size={block_size}: set block_size={m['block_size']} or label again")
        if m["corpus"] != corpus:
            raise ValueError(f"{where} was labelled on another corpus or split ({m['corpus_settings']}, blocks "
                             f"{ {s: v['blocks'] for s, v in m['splits'].items()} }); the data module has "
                             f"{description}: use the store's corpus settings (same corpus, max_documents, seed, "
                             "val_fraction) or label again")

    def split(self, name: str) -> SplitLabels | None:
        """The stored labels of one split, None when the store does not hold it."""
        entry = self.manifest["splits"].get(name)
        return None if entry is None else SplitLabels(self.path, entry, self.manifest)


class SplitLabels:
    """Random access to the labels of one split's blocks; shards are memory-mapped on first use in each process
    (DataLoader workers open their own maps), the ``OPEN_SHARDS`` most recently used kept open."""

    def __init__(self, path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.files = [path / shard["file"] for shard in entry["shards"]]
        self.blocks, self.shard_blocks, self.manifest = entry["blocks"], manifest["shard_blocks"], manifest
        self.starts = split_starts(entry, manifest["shard_blocks"])  # first block of each shard
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, block: int) -> dict[str, Tensor]:
        if not 0 <= block < self.blocks:
            raise IndexError(f"block {block} is outside the {self.blocks} stored blocks")
        shard, row = locate(self.starts, block)
        if shard not in self._maps:
            self._maps[shard] = np.load(self.files[shard], mmap_mode="r")
            if len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)  # unmapped once no record of it is referenced
        self._maps.move_to_end(shard)
        return decode(self._maps[shard][row], self.manifest)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}  # maps are per process, not pickled into workers
