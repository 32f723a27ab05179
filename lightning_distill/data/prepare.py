"""Preparing a corpus for streaming: tokenized once, in parallel worker processes, into binary chunks on disk.

:func:`prepare_corpus` reads the sources :class:`~lightning_distill.data.DistillDataModule` reads (builtin corpora,
text files and globs, JSONL, saved Hugging Face datasets) and writes them with Lightning's ``litdata``
(``optimize`` into the ``TokensLoader`` layout, the way litgpt prepares its pretraining corpora)::

    out_dir/
      corpus.json            format, tokenizer fingerprint, split settings, and every chunk with its token count
                             and SHA-256; written last, so a folder without it is an unfinished preparation
      train/index.json       litdata's index of the train chunks
      train/chunk-W-I.bin    token ids (uint16 when the vocabulary fits, else int32): documents joined with an EOS
      ...                    after each, the way :func:`~lightning_distill.data.pack` joins them
      validation/...

A document goes to validation by a seeded hash of its place in the sources (``val_fraction`` of them in
expectation), so its split does not depend on how many documents there are or on which worker reads it. Work is
cut into units (a text file, up to 8 MB of a JSONL file, 10,000 rows of a dataset), read in order; each worker
tokenizes a contiguous run of units on one thread (workers are the parallelism), so the token stream is the same
for any number of workers, only its cut into chunks differs. The folder, or a copy of it on object storage
(``s3://...``), is then
a ``corpus`` of :class:`~lightning_distill.data.DistillDataModule`, streamed by
:mod:`lightning_distill.data.streaming`. ``lightning-distill prepare`` runs :func:`prepare_corpus` (:func:`main`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from lightning_distill import backbone, checks
from lightning_distill.data.sources import expand_sources, source_identity
from lightning_distill.data.tokens import SPLITS
from lightning_distill.data.units import WorkUnit, read_unit, work_units
from lightning_distill.files import atomic_write

FORMAT = "lightning_distill.corpus/1"
MANIFEST = "corpus.json"
REMOTE = ("s3://", "gs://", "azure://", "r2://", "local:")  # URIs litdata streams from ("local:" is for tests)
BATCH_CHARS = 2**20  # characters of text per tokenizer call
INSTALL = "pip install 'lightning-distill[scale]'"


def require_litdata() -> Any:
    """The ``litdata`` module, or an ``ImportError`` saying how to install it."""
    try:
        import litdata
    except ImportError as error:
        raise ImportError(f"prepared (streamed) corpora are read and written with litdata: {INSTALL}") from error
    return litdata


def is_prepared(corpus: Any) -> bool:
    """Whether ``corpus`` names a prepared corpus: a folder holding ``corpus.json``, or an object-storage URI; a
    folder that an interrupted preparation left (chunks, no ``corpus.json``) raises ``ValueError``."""
    if not isinstance(corpus, str):
        return False
    folder = Path(corpus).expanduser()
    if not corpus.startswith(REMOTE) and not (folder / MANIFEST).is_file() and (folder / ".prepare.lock").exists():
        raise ValueError(f"corpus {corpus!r} is an unfinished preparation (no {MANIFEST}): run the same "
                         "prepare_corpus / `lightning-distill prepare` again")
    return corpus.startswith(REMOTE) or (folder / MANIFEST).is_file()


class Tokenize:
    """The function litdata's workers run on each work unit: the unit's documents of one split, tokenized on one
    thread, each followed by EOS, yielded as flat arrays of at most ``piece_tokens`` ids.

    Args:
        tokenizer: the tokenizer of the models that will train on the corpus.
        split: ``"train"`` or ``"validation"``: the documents to keep.
        val_fraction: share of documents that go to validation, in (0, 1).
        seed: seeds the hash that assigns documents to splits.
        text_field: field (JSONL) or column (dataset) holding the text.
        piece_tokens: most ids per yielded array.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, split: str, val_fraction: float, seed: int,
                 text_field: str, piece_tokens: int) -> None:
        self.tokenizer, self.split, self.val_fraction, self.seed = tokenizer, split, val_fraction, seed
        self.text_field, self.piece_tokens = text_field, piece_tokens
        self.dtype = token_dtype(len(tokenizer))

    def __call__(self, unit: WorkUnit) -> Iterator[np.ndarray]:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
        batch: list[str] = []
        for text in read_unit(unit, self.text_field, lambda key: self.wanted(unit.source, key)):
            batch.append(text)
            if sum(map(len, batch)) >= BATCH_CHARS:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    def wanted(self, source: int, key: int) -> bool:
        """Whether the document at ``key`` of source ``source`` belongs to this split."""
        return (split_of(source, key, self.val_fraction, self.seed) == "validation") == (self.split == "validation")

    def _encode(self, texts: list[str]) -> Iterator[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        stream = np.empty(sum(len(x) + 1 for x in ids), dtype=self.dtype)  # (L,)
        at = 0
        for doc in ids:
            stream[at : at + len(doc)] = doc
            stream[at + len(doc)] = self.tokenizer.eos_token_id
            at += len(doc) + 1
        for start in range(0, len(stream), self.piece_tokens):
            yield stream[start : start + self.piece_tokens]


def split_of(source: int, key: int, val_fraction: float, seed: int) -> str:
    """The split of the document at ``key`` in source number ``source``: validation with probability
    ``val_fraction``, by a seeded hash."""
    digest = hashlib.blake2b(f"{seed}/{source}/{key}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def prepare_corpus(corpus: str | list[str], out_dir: str, tokenizer: str | PreTrainedTokenizerBase, *,
                   block_size: int = 1024, num_workers: int = 1, val_fraction: float = 0.1, seed: int = 0,
                   text_field: str = "text", chunk_tokens: int = 2**22, overwrite: bool = False) -> str:
    """Tokenize a corpus once into a streamable folder (see the module docstring); returns ``out_dir``.

    A folder already prepared with the same settings is returned as it is; one prepared with other settings is
    refused unless ``overwrite``; an unfinished one (no ``corpus.json``: an interrupted run) is prepared again.

    Args:
        corpus: a source or a list of sources, as ``DistillDataModule(corpus=...)`` takes them.
        out_dir: a local folder to write to (copy it to object storage afterwards to stream from there).
        tokenizer: model name or path, or a tokenizer: the one of the models that will train on the corpus.
        block_size: the block size training will most likely use; chunks hold a multiple of it.
        num_workers: worker processes tokenizing in parallel, >= 1 (one thread each: use the number of cores).
        val_fraction: share of documents held out for validation, in (0, 1).
        seed: seeds the assignment of documents to splits.
        text_field: field (JSONL) or column (Hugging Face dataset) holding the text.
        chunk_tokens: tokens per chunk, at least ``block_size``: the unit of streaming, of shuffling and of the label
            store's shards (4M tokens: 8 MB of uint16 ids).
        overwrite: replace a folder prepared with other settings.
    """
    checks.integer("block_size", block_size, ">= 2", lambda v: v >= 2, example="1024")
    checks.integer("num_workers", num_workers, ">= 1", lambda v: v >= 1, example="1")
    checks.integer("chunk_tokens", chunk_tokens, f">= block_size={block_size}", lambda v: v >= block_size,
                   example=str(2**22))
    checks.number("val_fraction", val_fraction, "strictly between 0 and 1", lambda v: 0 < v < 1, example="0.1")
    checks.require(isinstance(out_dir, str) and bool(out_dir) and not out_dir.startswith(REMOTE), "out_dir", out_dir,
                   "a local folder", "prepare locally, then copy the folder to object storage (e.g. aws s3 sync) to "
                   "stream it from there")
    if is_prepared(corpus):
        raise ValueError(f"corpus {corpus!r} is already prepared: pass it to DistillDataModule(corpus=...)")
    out = Path(out_dir).expanduser()
    tok = backbone.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    sources = expand_sources(corpus)
    settings = {"format": FORMAT, "corpus": corpus, "sources": [source_identity(k, w, text_field) for k, w in sources],
                "tokenizer": backbone.tokenizer_fingerprint(tok), "vocab_size": len(tok), "eos_id": tok.eos_token_id,
                "dtype": token_dtype(len(tok)).name, "val_fraction": val_fraction, "seed": seed,
                "text_field": text_field, "block_size": block_size, "chunk_tokens": chunk_tokens}
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / ".prepare.lock"):  # processes preparing the same folder (e.g. DDP ranks): one does the work
        if not _already_prepared(out, settings, overwrite):
            _prepare(corpus, out, tok, sources, settings, num_workers)
    return str(out)


def _prepare(corpus: str | list[str], out: Path, tok: PreTrainedTokenizerBase, sources: list[tuple[str, str]],
             settings: dict[str, Any], num_workers: int) -> None:
    """Write both splits with litdata's ``optimize``, then the manifest."""
    litdata = require_litdata()
    units = work_units(sources, settings["text_field"], num_workers)
    block_size, chunk_tokens = settings["block_size"], settings["chunk_tokens"]
    chunk = chunk_tokens - chunk_tokens % block_size
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
        litdata.optimize(
            fn=Tokenize(tok, split, settings["val_fraction"], settings["seed"], settings["text_field"],
                        piece_tokens=max(block_size, chunk // 16)),
            inputs=units, output_dir=str(out / split), chunk_size=chunk, num_workers=min(num_workers, len(units)),
            item_loader=litdata.TokensLoader(), keep_data_ordered=True, reorder_files=False, verbose=False,
            start_method="fork" if sys.platform == "linux" else None,
        )
    splits = {split: _chunk_entries(out, split) for split in SPLITS}
    for split, chunks in splits.items():
        if sum(c["tokens"] for c in chunks) < block_size:
            raise ValueError(f"the {split} split of corpus {corpus!r} has fewer than block_size={block_size} tokens: "
                             "use more text, or a val_fraction that leaves both splits a block")
    manifest = {**settings, "num_workers": num_workers, "splits": {s: {"chunks": c} for s, c in splits.items()},
                "complete": True}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    tokens = {split: sum(c["tokens"] for c in chunks) for split, chunks in splits.items()}
    rank_zero_info(f"[lightning_distill] prepared {tokens['train']} train + {tokens['validation']} validation tokens "
                   f"in {sum(len(c) for c in splits.values())} chunks into {out}")


def _already_prepared(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True when ``out`` holds a complete preparation with these settings; clears what an old one left."""
    if (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text())
        differ = [key for key in settings if old.get(key) != settings[key]]
        if not differ:
            rank_zero_info(f"[lightning_distill] {out} is already prepared with these settings")
            return True
        if not overwrite:
            raise FileExistsError(f"{out} holds a corpus prepared with other settings ({', '.join(differ)} differ): "
                                  "use another out_dir, or overwrite=True")
        (out / MANIFEST).unlink()
    return False


def _chunk_entries(out: Path, split: str) -> list[dict[str, Any]]:
    """The chunks litdata wrote for a split, in index order, with their token counts and checksums."""
    index = json.loads((out / split / "index.json").read_text())
    entries = []
    for chunk in index["chunks"]:
        digest = hashlib.sha256()
        with open(out / split / chunk["filename"], "rb") as file:
            for block in iter(lambda: file.read(2**23), b""):
                digest.update(block)
        entries.append({"file": f"{split}/{chunk['filename']}", "tokens": int(chunk["dim"]),
                        "sha256": digest.hexdigest()})
    return entries


def main(argv: list[str] | None = None) -> str:
    """``lightning-distill prepare --corpus SOURCE [SOURCE ...] --out DIR --tokenizer NAME``: :func:`prepare_corpus`."""
    parser = argparse.ArgumentParser(prog="lightning-distill prepare", description=main.__doc__)
    parser.add_argument("--corpus", nargs="+", required=True, help="builtin:..., files, globs, .jsonl, datasets")
    parser.add_argument("--out", required=True, help="local folder to write the prepared corpus to")
    parser.add_argument("--tokenizer", required=True, help="model name or path whose tokenizer to use")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--chunk-tokens", type=int, default=2**22)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    corpus = args.corpus[0] if len(args.corpus) == 1 else args.corpus
    path = prepare_corpus(corpus, args.out, args.tokenizer, block_size=args.block_size, num_workers=args.num_workers,
                          val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                          chunk_tokens=args.chunk_tokens, overwrite=args.overwrite)
    print(f"prepared {path}: train with DistillDataModule(corpus={path!r})")
    return path
