"""Work units of a preparation: the pieces of the sources one worker reads, and reading them.

A unit is a text file or builtin corpus, up to 8 MB of a JSONL file, or 10,000 rows of a saved Hugging Face
dataset. Units are read in order and a document belongs to the unit it starts in, so how the sources are cut does
not change the token stream (:mod:`lightning_distill.data.prepare`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_distill import files
from lightning_distill.data.sources import builtin_documents, load_hf_dataset, read_text

UNIT_BYTES = 8 * 2**20  # most bytes of a JSONL file per work unit (fewer for small corpora: 4 units per worker)
MIN_UNIT_BYTES = 2**20
UNIT_ROWS = 10_000  # rows of a Hugging Face dataset per work unit


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one source that one worker reads: a whole file or builtin, or ``[start, stop)`` of its bytes
    (JSONL) or rows (dataset)."""

    source: int  # position of the source in the corpus
    kind: str  # builtin, text, jsonl or hf
    where: str
    start: int = 0
    stop: int = 0


def work_units(sources: list[tuple[str, str]], text_field: str, num_workers: int = 1) -> list[WorkUnit]:
    """Cut ``expand_sources`` pairs into work units of similar size, enough for ``num_workers`` workers (how the
    sources are cut does not change the token stream: units are read in order, a document in the unit it starts in).

    A dataset folder is opened here (:func:`~lightning_distill.data.sources.load_hf_dataset`), so that one without
    the column ``text_field`` is refused before any worker starts.
    """
    jsonl = sum(os.path.getsize(where) for kind, where in sources if kind == "jsonl")
    step = min(UNIT_BYTES, max(MIN_UNIT_BYTES, -(-jsonl // (4 * num_workers))))
    units: list[WorkUnit] = []
    for index, (kind, where) in enumerate(sources):
        if kind == "jsonl":
            size = os.path.getsize(where)
            units += [WorkUnit(index, kind, where, s, min(s + step, size)) for s in range(0, size, step)]
        elif kind == "hf":
            rows = len(load_hf_dataset(where, text_field))
            units += [WorkUnit(index, kind, where, s, min(s + UNIT_ROWS, rows)) for s in range(0, rows, UNIT_ROWS)]
        else:
            units.append(WorkUnit(index, kind, where))
    return units


def read_unit(unit: WorkUnit, text_field: str, keep: Callable[[int], bool]) -> Iterator[str]:
    """The non-empty documents of a unit whose key (its place within the source) ``keep`` accepts; the key is
    tested before the document is parsed."""
    if unit.kind == "builtin":
        texts = builtin_documents(unit.where)
        found: Iterator[tuple[int, Any]] = ((i, text) for i, text in enumerate(texts) if keep(i))
    elif unit.kind == "text":
        found = iter([(0, Path(unit.where))] if keep(0) else [])
    elif unit.kind == "jsonl":
        found = jsonl_lines(unit, keep)
    else:
        dataset = load_hf_dataset(unit.where, text_field)
        found = ((row, dataset[row][text_field]) for row in range(unit.start, unit.stop) if keep(row))
    for key, item in found:
        if isinstance(item, Path):
            text = read_text(item)  # as documents() reads it: a binary file is an error
        elif isinstance(item, bytes):
            text = jsonl_text(item, text_field, unit.where, key)
        else:
            text = item
        if isinstance(text, str) and text.strip():
            yield text


def jsonl_lines(unit: WorkUnit, keep: Callable[[int], bool]) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, raw line)`` of the lines starting in ``[start, stop)``; only kept lines are returned whole."""
    with open(unit.where, "rb") as file:
        if unit.start > 0:
            file.seek(unit.start - 1)
            file.readline()  # the line that started before this unit belongs to the previous one
        while (offset := file.tell()) < unit.stop:
            line = file.readline()
            if not line:
                return
            if line.strip() and keep(offset):
                yield offset, line


def jsonl_text(line: bytes, text_field: str, where: str, offset: int) -> str:
    return files.record_text(files.json_record(line, f"{where}, byte {offset}"), text_field, f"{where}, byte {offset}")
