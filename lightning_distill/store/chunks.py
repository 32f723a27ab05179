"""Where a label store's shards begin: every ``shard_blocks`` blocks, and, for a prepared (streamed) corpus, at every
chunk of the corpus too, so that a shard's labels belong to one corpus chunk and are written, resumed and read with it.

A split's manifest entry may hold ``starts``, the first block of each of its shards (stores of prepared corpora);
without it (stores of in-memory corpora, as before) shard i holds blocks ``[i * shard_blocks, (i + 1) *
shard_blocks)``. Either way a block is found by its ``block_idx`` within the split (:func:`locate`).
"""

from __future__ import annotations

import bisect
from typing import Any


def shard_starts(blocks: int, shard_blocks: int, chunk_starts: list[int] | None = None) -> list[int]:
    """The first block of every shard of a split of ``blocks`` blocks: shards of at most ``shard_blocks`` blocks
    that never straddle a chunk start.

    Args:
        blocks: blocks in the split.
        shard_blocks: most blocks per shard, >= 1.
        chunk_starts: the first block of each corpus chunk (:meth:`DistillDataModule.chunk_starts`), or ``None``.
    """
    bounds = sorted({0, *(start for start in (chunk_starts or []) if 0 < start < blocks)})
    starts: list[int] = []
    for begin, end in zip(bounds, [*bounds[1:], blocks], strict=True):
        starts += range(begin, end, shard_blocks)
    return starts


def split_starts(entry: dict[str, Any], shard_blocks: int) -> list[int]:
    """The shard starts of a split's manifest entry: its ``starts``, or every ``shard_blocks`` blocks."""
    return list(entry["starts"]) if "starts" in entry else list(range(0, entry["blocks"], shard_blocks))


def shard_ranges(starts: list[int], blocks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shard."""
    return list(zip(starts, [*starts[1:], blocks], strict=True))


def locate(starts: list[int], block: int) -> tuple[int, int]:
    """``(shard, row)`` of a block: the shard holding it and its row there."""
    shard = bisect.bisect_right(starts, block) - 1
    return shard, block - starts[shard]
