"""Corpus sources: what a ``corpus`` argument may name, and the documents it holds.

- ``builtin:python-docs``: the documentation topics that ship with CPython (``pydoc_data.topics``, ~80 docs).
- ``builtin:shakespeare``: ~16 KB of Shakespeare (public domain) shipped in this package: out-of-domain text for
  measuring what a student keeps of the teacher's general skill (``ood_corpus``).
- ``builtin:smollm2-writing``: 144 documents (29k tokens) the embedded teacher wrote itself, requests and answers
  alike (:mod:`lightning_distill.data.writing`; ``lightning-distill write --documents 144 --out
  lightning_distill/assets/smollm2_writing.jsonl`` writes it, its settings beside it): general text to mix into
  training beside an in-domain corpus (``val_sources`` keeps it out of validation).
- a text file or a glob (``docs/**/*.md``): one file is one document, read as UTF-8 (a few bad bytes replaced; a
  binary file is an error).
- a JSONL file (``*.jsonl``): one line is one document, its text in the field ``text_field``.
- a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``: its "train" split or only split),
  memory-mapped and opened once per process (:func:`load_hf_dataset`).

A corpus prepared for streaming (:func:`lightning_distill.data.prepare_corpus`) is not a source but a corpus of its
own: :class:`~lightning_distill.data.DistillDataModule` streams it (:mod:`lightning_distill.data.streaming`).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from lightning_distill import checks, files

BUILTIN_CORPORA = ("builtin:python-docs", "builtin:shakespeare", "builtin:smollm2-writing")
SHAKESPEARE = Path(__file__).parent.parent / "assets" / "shakespeare.txt"
WRITING = Path(__file__).parent.parent / "assets" / "smollm2_writing.jsonl"
_HF_DATASETS: dict[str, tuple[str, Any]] = {}  # dataset folder -> (its state digest, the dataset opened from it)


def expand_sources(corpus: str | list[str]) -> list[tuple[str, str]]:
    """Resolve a corpus into ``(kind, location)`` pairs, kind one of ``builtin``, ``text``, ``jsonl``, ``hf``.

    Globs are expanded (sorted, ``**`` recursive). A glob matching no file, a missing path, a folder that is
    not a saved Hugging Face dataset or an unknown builtin raises ``ValueError``.
    """
    entries = [corpus] if isinstance(corpus, str) else corpus
    checks.require(isinstance(entries, list) and bool(entries) and all(isinstance(e, str) and e for e in entries),
                   "corpus", corpus, "a source or a non-empty list of sources (strings)")
    sources: list[tuple[str, str]] = []
    for entry in entries:
        if entry.startswith("builtin:"):
            known = ", ".join(BUILTIN_CORPORA)
            checks.require(entry in BUILTIN_CORPORA, "corpus", entry, f"a known builtin corpus ({known})")
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
    """What the tokens of a source depend on: builtin name + Python version (the Python docs) or + a hash of the file
    shipped in this package; file path + size + mtime; or dataset path + a hash of its ``state.json``/
    ``dataset_dict.json`` files (holding its fingerprints)."""
    if kind == "builtin":
        shipped = {"builtin:shakespeare": SHAKESPEARE, "builtin:smollm2-writing": WRITING}.get(where)
        return {"builtin": where, "python": sys.version} if shipped is None else {
            "builtin": where, "sha256": files.sha256(shipped.read_bytes())}
    if kind == "hf":
        return {"hf": where, "state": _hf_state(where), "text_field": text_field}
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
        if kind == "builtin":
            found = builtin_documents(where)
        elif kind == "jsonl":
            found = _read_jsonl(Path(where), text_field)
        elif kind == "hf":
            found = [t for t in load_hf_dataset(where, text_field)[text_field] if isinstance(t, str)]
        else:
            found = [read_text(Path(where))]
        found = [t for t in found if t.strip()]
        if not found:
            raise ValueError(f"corpus source {where!r} holds no text (empty or whitespace only): fill it or "
                             "remove it from corpus")
        texts += found
    return texts


def builtin_documents(name: str) -> list[str]:
    """The documents of a builtin corpus (a name in :data:`BUILTIN_CORPORA`), always in the same order."""
    if name == "builtin:shakespeare":
        return [SHAKESPEARE.read_text(encoding="utf-8")]
    if name == "builtin:smollm2-writing":
        return _read_jsonl(WRITING, "text")
    from pydoc_data.topics import topics

    return [topics[topic] for topic in sorted(topics)]


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a few bad bytes replaced); a file that is not text (NUL bytes, or more than 1% of it
    undecodable: a binary file, or another encoding) raises ``ValueError``."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad, nul = text.count("\ufffd"), b"\x00" in data
    if nul or bad > max(8, len(text) // 100):
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({bad} of {len(data)} bytes undecodable"
                         f"{', NUL bytes' if nul else ''}): convert it to UTF-8 text, or remove it from corpus")
    return text


def load_hf_dataset(where: str, text_field: str) -> Any:
    """A dataset folder written by ``save_to_disk`` (a ``DatasetDict``: its "train" split or only split),
    memory-mapped and opened once per process (again when the folder was saved anew).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: the folder holds several splits and none is "train", or the dataset has no column
            ``text_field``.
    """
    state, cached = _hf_state(where), _HF_DATASETS.get(where)
    if cached is None or cached[0] != state:
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
        _HF_DATASETS[where] = (state, dataset)
    dataset = _HF_DATASETS[where][1]
    if text_field not in dataset.column_names:
        raise ValueError(f"{where} has no column text_field={text_field!r} (columns: "
                         f"{dataset.column_names}): set text_field to the column holding the text")
    return dataset


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    with path.open(encoding="utf-8") as lines:
        numbered = [(f"{path}, line {number}", line) for number, line in enumerate(lines, start=1) if line.strip()]
    return [files.record_text(files.json_record(line, where), text_field, where) for where, line in numbered]


def _hf_state(where: str) -> str:
    """A hash of a dataset folder's ``state.json``/``dataset_dict.json`` files, which hold its fingerprints."""
    digest = hashlib.sha256()
    for state in sorted(Path(where).rglob("*.json")):
        if state.name in ("state.json", "dataset_dict.json"):
            digest.update(str(state.relative_to(where)).encode() + state.read_bytes())
    return digest.hexdigest()
