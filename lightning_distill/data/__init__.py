"""Corpora for distillation: sources, token caches and packed blocks (:class:`DistillDataModule`); corpora prepared
once (:func:`prepare_corpus`) and streamed at scale (:mod:`lightning_distill.data.streaming`)."""

from lightning_distill.data.module import DistillDataModule
from lightning_distill.data.prepare import prepare_corpus
from lightning_distill.data.sources import BUILTIN_CORPORA, documents, expand_sources, source_identity
from lightning_distill.data.tokens import (
           SPLITS,
           BlockDataset,
           PlannedBlocks,
           cached_tokens,
           pack,
           split_documents,
           token_cache_dir,
           tokenize_documents,
)

__all__ = ["BUILTIN_CORPORA", "SPLITS", "BlockDataset", "DistillDataModule", "PlannedBlocks", "cached_tokens",
           "documents", "expand_sources", "pack", "prepare_corpus", "source_identity", "split_documents",
           "token_cache_dir", "tokenize_documents"]
