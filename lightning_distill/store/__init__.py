"""The label store: the teacher's signal over a corpus, written once, read by any number of students.

:mod:`~lightning_distill.store.format` (record layout, encoding, manifest, shards),
:mod:`~lightning_distill.store.writer` (:class:`StoreWriter`, and :class:`LabelWriter`, the callback of
``lightning-distill predict``),
:mod:`~lightning_distill.store.reader` (:class:`LabelStore`, checksums verified, records memory-mapped).
"""

from lightning_distill.store.format import (
           FORMAT,
           KINDS,
           decode,
           encode,
           read_manifest,
           record_dtype,
           to_records,
)
from lightning_distill.store.reader import LabelStore, SplitLabels
from lightning_distill.store.writer import LabelWriter, StoreWriter

__all__ = ["FORMAT", "KINDS", "LabelStore", "LabelWriter", "SplitLabels", "StoreWriter", "decode", "encode",
           "read_manifest", "record_dtype", "to_records"]
