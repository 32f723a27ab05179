"""Stored teacher signal: the teacher runs over the corpus once, any number of students train from disk.

A label store is a folder, written by :class:`~lightning_distill.callbacks.LabelWriter` under ``lightning-distill
predict`` (``configs/label_soft.yaml``) and read by ``DistillDataModule(labels=PATH)``::

    manifest.json         teacher, tokenizer and corpus fingerprints, block size, kind and its settings, record
                          layout and dtypes, blocks per split, shards with a SHA-256 each; "complete": true once
                          every shard is written (an unfinished store is resumed, a complete one never rewritten)
    train-00000.npy       a shard: the records of ``shard_blocks`` consecutive blocks of one split (the last shard
    ...                   may be shorter), a 1-D NumPy structured array, memory-mapped when read
    validation-00000.npy

A record holds one block of T positions; position t is the teacher's prediction of token t + 1, aligned with
``input_ids`` like logits. Ids are uint16 when the vocabulary fits (else int32), values are ``value_dtype``
(float16, bfloat16 kept as its raw 16 bits, or float32). Kinds:

- ``topk``: ``ids`` (T, K) and ``logprobs`` (T, K), the teacher's K most likely next tokens and their log-probs
  at ``temperature`` (of the full distribution, not renormalized), and ``covered`` (T,): the log of the mass the
  K ids hold, taken in float32 before rounding. The reader rescales the rounded log-probs to that mass, so the
  missing tail 1 - exp(covered) that ``tail="bucket"`` matches is exact to the precision of one number
  (:func:`lightning_distill.losses.topk_forward_kl`). 2K + 1 values: 130 bytes per token at K = 32 in fp16.
- ``sampled``: ``ids`` (T, S) and ``counts`` (T, S): S draws with replacement from the teacher at
  ``temperature``, duplicates merged, count 0 in empty slots. Weights count / S make the loss an unbiased
  estimate of the forward KL's gradient (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs"). Also ``argmax`` (T,) and ``entropy`` (T,) for validation metrics: 40 bytes per token
  at S = 12.
- ``top1``: ``ids`` (T,), the teacher's arg-max next token (hard labels): 2 bytes per token.
- ``generate``: ``continuation`` (N,), the teacher's continuation of the block's first ``prompt_tokens`` tokens,
  EOS-padded (HardDistill's sequence-level mode; its live mode keeps using :class:`GenerationCache`).

Read back, a block is a dict of tensors (batched by the DataLoader into ``batch["teacher"]``): ``topk_ids``
(T, K) long and ``topk_logprobs`` (T, K) float32; ``sample_ids`` (T, S) long, ``sample_weights`` (T, S) float32
and ``entropy`` (T,); ``argmax`` (T,) long for every per-position kind; ``continuation`` (N,) long.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_distill import losses
from lightning_distill.backbone import cache_dir, tokenizer_fingerprint

FORMAT = "lightning_distill.labels/1"
MANIFEST = "manifest.json"
KINDS = ("topk", "sampled", "top1", "generate")
SPLITS = ("train", "validation")
VALUE_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}  # bfloat16: its raw bits
VALUE_FIELDS = ("logprobs", "covered", "entropy")
IGNORE_INDEX = -100
CPU_CHUNK_ROWS = 16  # positions reduced at a time on CPUs (16 x 49152 fp32 = 3 MB)


# ------------------------------------------------------------------------------------------------ format
def record_dtype(kind: str, block_size: int, vocab_size: int, *, k: int = 32, num_samples: int = 12,
                 value_dtype: str = "float16", new_tokens: int = 0) -> np.dtype:
    """The NumPy structured dtype of one block's record (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    ids, value, T = ("<u2" if vocab_size <= 2**16 else "<i4"), VALUE_DTYPES[value_dtype], block_size
    if kind == "topk":
        fields = [("ids", ids, (T, k)), ("logprobs", value, (T, k)), ("covered", value, (T,))]
    elif kind == "sampled":
        counts = "u1" if num_samples < 2**8 else "<u2"
        fields = [("ids", ids, (T, num_samples)), ("counts", counts, (T, num_samples)), ("argmax", ids, (T,)),
                  ("entropy", value, (T,))]
    elif kind == "top1":
        fields = [("ids", ids, (T,))]
    else:
        fields = [("continuation", ids, (new_tokens,))]
    return np.dtype(fields)


@torch.no_grad()
def encode(kind: str, signal: Tensor, *, k: int = 32, num_samples: int = 12, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The fields of a batch of records, computed where ``signal`` lives (on the GPU when there is one).

    Args:
        kind: a key of :data:`KINDS`.
        signal: teacher logits (B, T, V), or for ``generate`` its continuations (B, N) long.
        k, num_samples, temperature: the kind's settings.
        generator: for the draws of ``sampled``, on ``signal``'s device.

    Returns:
        Field name -> tensor with a leading B, as :func:`record_dtype` lays them out.
    """
    if kind == "generate":
        return {"continuation": signal}
    if kind == "top1":
        return {"ids": signal.max(-1).indices}  # (B, T); max is faster than argmax on bf16
    positions, rows = signal.shape[:-1], _row_chunks(signal)  # rows: (C, V) each
    if kind == "topk":
        ids, logprobs = map(torch.cat, zip(*(losses.topk_teacher(r, k, temperature) for r in rows), strict=True))
        covered = logprobs.logsumexp(-1).clamp(max=0)  # (N,)
        return {"ids": ids.reshape(*positions, k), "logprobs": logprobs.reshape(*positions, k),
                "covered": covered.reshape(positions)}
    draws, argmax, entropy = [], [], []
    for chunk in rows:
        scaled = chunk.float() if temperature == 1 else chunk.float() / temperature  # (C, V)
        probs = torch.softmax(scaled, -1)  # (C, V)
        top = scaled.argmax(-1, keepdim=True)  # (C, 1)
        log_z = scaled.gather(-1, top) - probs.gather(-1, top).log()  # (C, 1): exact, p_max >= 1 / V
        expected = (probs.unsqueeze(-2) @ scaled.unsqueeze(-1)).squeeze(-1)  # (C, 1) E_p[x / T]
        draws.append(torch.multinomial(probs, num_samples, replacement=True, generator=generator))  # (C, S)
        argmax.append(top)
        entropy.append(log_z - expected)
    ids, weights = losses.merge_draws(torch.cat(draws))  # (N, S) each
    shape = (*positions, num_samples)
    return {"ids": ids.reshape(shape), "counts": (weights * num_samples).round().reshape(shape),
            "argmax": torch.cat(argmax).reshape(positions), "entropy": torch.cat(entropy).reshape(positions)}


def _row_chunks(logits: Tensor) -> tuple[Tensor, ...]:
    """(..., V) logits as chunks of rows (C, V): a few MB each on CPUs, where passes over cache-sized chunks run
    2-3x faster than over the whole batch; large on GPUs, where launches cost more than memory traffic."""
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    return flat.split(CPU_CHUNK_ROWS if flat.device.type == "cpu" else 4096)


def to_records(fields: dict[str, Tensor], dtype: np.dtype, value_dtype: str) -> np.ndarray:
    """Pack the fields of :func:`encode` into a (B,) structured array of ``dtype``, on the CPU."""
    rows = next(iter(fields.values())).shape[0]
    records = np.empty(rows, dtype)
    for name in dtype.names:
        tensor = fields[name].detach()
        if name in VALUE_FIELDS and value_dtype == "bfloat16":
            array = tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        elif name in VALUE_FIELDS:
            array = tensor.to(getattr(torch, value_dtype)).cpu().numpy()
        else:
            array = tensor.cpu().numpy()
        records[name] = array.astype(dtype[name].base, copy=False)
    return records


def decode(record: np.void, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """One block's record as the tensors a batch carries (see the module docstring)."""
    kind, value_dtype = manifest["kind"], manifest["value_dtype"]

    def longs(name: str) -> Tensor:
        return torch.from_numpy(record[name].astype(np.int64))

    def values(name: str) -> Tensor:
        array = np.array(record[name])
        if value_dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(array).float()

    if kind == "topk":
        ids, logprobs = longs("ids"), values("logprobs")  # (T, K)
        logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True) + values("covered").unsqueeze(-1)
        return {"topk_ids": ids, "topk_logprobs": logprobs, "argmax": ids[:, 0]}
    if kind == "sampled":
        counts = torch.from_numpy(record["counts"].astype(np.float32))  # (T, S)
        return {"sample_ids": longs("ids"), "sample_weights": counts / manifest["num_samples"],
                "argmax": longs("argmax"), "entropy": values("entropy")}
    if kind == "top1":
        return {"argmax": longs("ids")}
    return {"continuation": longs("continuation")}


def sparse_targets(stored: dict[str, Tensor]) -> losses.SparseTargets | None:
    """The sparse loss targets in a batch's stored labels (top-k or sampled), None for hard kinds."""
    if "topk_ids" in stored:
        return losses.SparseTargets("topk", stored["topk_ids"], stored["topk_logprobs"])
    if "sample_ids" in stored:
        return losses.SparseTargets("sampled", stored["sample_ids"], stored["sample_weights"])
    return None


def shifted(stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-position stored labels without the last position, like ``logits[:, :-1]``."""
    return {name: value if name == "continuation" else value[:, :-1] for name, value in stored.items()}


def stored_metrics(student_logits: Tensor, stored: dict[str, Tensor], labels: Tensor,
                   temperature: float) -> dict[str, Tensor]:
    """Validation metrics against stored labels, under the names of the live ones.

    ``agreement`` (student arg-max equals the teacher's) from every per-position kind; ``kl`` at temperature 1
    only: the exact KL between both distributions coarse-grained to the K ids + the rest (``topk``, at most the
    dense KL), or the sampled cross-entropy minus the teacher's stored entropy (``sampled``, an unbiased estimate).

    Args:
        student_logits: (B, T', V), already aligned with ``stored`` (see :func:`shifted`) and ``labels``.
        stored: the batch's stored labels (B, T', ...).
        labels: (B, T') targets, -100 masked.
        temperature: the store's temperature.
    """
    mask = labels != IGNORE_INDEX  # (B, T')
    out: dict[str, Tensor] = {}
    if "argmax" in stored:
        agree = (student_logits.argmax(-1) == stored["argmax"]) & mask
        out["agreement"] = agree.sum() / mask.sum().clamp(min=1)
    if temperature != 1.0:
        return out
    targets = sparse_targets(stored)
    if targets is not None and targets.kind == "topk":
        out["kl"] = losses.topk_forward_kl(student_logits, targets.ids, targets.values, labels, tail="bucket")
    elif targets is not None:
        cross = losses.sampled_kl(student_logits, targets.ids, targets.values, labels)
        out["kl"] = cross - losses.reduce_tokens(stored["entropy"].reshape(-1).float(), labels)
    return out


# ------------------------------------------------------------------------------------------------ reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path``; ``ValueError`` when there is none or it is another format."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise ValueError(f"labels={str(path)!r} is not a label store (no {MANIFEST}): write one with "
                         "`lightning-distill predict --config configs/label_soft.yaml`")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"labels={str(path)!r} has format {manifest.get('format')!r}, this version reads "
                         f"{FORMAT!r}: label the corpus again")
    return manifest


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

    def verify(self) -> None:
        """Raise ``ValueError`` naming the first shard whose file is missing or fails its checksum."""
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                file = self.path / shard["file"]
                if not file.exists() or _sha256(file.read_bytes()) != shard["sha256"]:
                    problem = "is missing" if not file.exists() else "fails its checksum (corrupt or changed)"
                    raise ValueError(f"label store {str(self.path)!r}: shard {shard['file']} {problem}: label "
                                     "the corpus again (lightning-distill predict ... with overwrite: true)")

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
    (DataLoader workers open their own maps)."""

    def __init__(self, path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.files = [path / shard["file"] for shard in entry["shards"]]
        self.blocks, self.shard_blocks, self.manifest = entry["blocks"], manifest["shard_blocks"], manifest
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, block: int) -> dict[str, Tensor]:
        if not 0 <= block < self.blocks:
            raise IndexError(f"block {block} is outside the {self.blocks} stored blocks")
        shard, row = divmod(block, self.shard_blocks)
        if shard not in self._maps:
            self._maps[shard] = np.load(self.files[shard], mmap_mode="r")
        return decode(self._maps[shard][row], self.manifest)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # maps are per process, not pickled into workers


# ------------------------------------------------------------------------------------------------ writing
class StoreWriter:
    """Writes a store: each shard atomically (temporary file, then rename) with a ``.sha256`` beside it, and
    the complete manifest last. An unfinished store with the same header is resumed; a complete one is refused
    unless ``overwrite``.

    Args:
        path: the store's folder.
        header: the manifest without its shards (settings, fingerprints, ``splits: {name: {"blocks": n}}``).
        overwrite: replace a complete store, or an unfinished one with other settings.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], overwrite: bool = False) -> None:
        self.path, self.header, self.overwrite = Path(path), {"format": FORMAT, **header}, overwrite

    def prepare(self) -> None:
        """Create the folder and an unfinished manifest, or check the existing one (one process does this)."""
        if (self.path / MANIFEST).exists():
            old = json.loads((self.path / MANIFEST).read_text())
            differ = [key for key in self.header if key != "created" and old.get(key) != self.header[key]]
            if old.get("complete") and not self.overwrite:
                raise FileExistsError(f"label store {str(self.path)!r} is complete; it is never rewritten silently: "
                                      "write to another path, delete it, or pass overwrite=True")
            if differ and not self.overwrite:
                raise ValueError(f"label store {str(self.path)!r} holds an unfinished labelling with other "
                                 f"settings ({', '.join(differ)} differ): use another path or overwrite=True")
            if old.get("complete") or differ:  # overwrite: remove this store's own files, nothing else
                for file in [*self.path.glob("*-[0-9][0-9][0-9][0-9][0-9].npy*"), self.path / MANIFEST]:
                    file.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.tmp-*"):  # left by an interrupted write
            stale.unlink()
        if not (self.path / MANIFEST).exists():
            _atomic_write(self.path / MANIFEST, json.dumps({**self.header, "complete": False}, indent=1).encode())

    @staticmethod
    def shard_name(split: str, shard: int) -> str:
        return f"{split}-{shard:05d}.npy"

    def finished(self) -> set[tuple[str, int]]:
        """``(split, shard)`` pairs already written (data and checksum both present)."""
        done = set()
        for file in self.path.glob("*.npy.sha256"):
            split, number = file.name.removesuffix(".npy.sha256").rsplit("-", 1)
            if (self.path / file.name.removesuffix(".sha256")).exists():
                done.add((split, int(number)))
        return done

    def write(self, split: str, shard: int, records: np.ndarray) -> None:
        """Write one shard's records (a 1-D structured array) atomically, then its checksum."""
        buffer = io.BytesIO()
        np.save(buffer, records, allow_pickle=False)
        data = buffer.getvalue()
        name = self.shard_name(split, shard)
        _atomic_write(self.path / name, data)
        _atomic_write(self.path / f"{name}.sha256", _sha256(data).encode())

    def finish(self) -> list[str]:
        """Write the complete manifest if every shard is there; return the missing shards' names."""
        splits, missing = {}, []
        shard_blocks = self.header["shard_blocks"]
        for split, entry in self.header["splits"].items():
            shards = []
            for shard in range(-(-entry["blocks"] // shard_blocks)):
                name = self.shard_name(split, shard)
                checksum = self.path / f"{name}.sha256"
                if not checksum.exists():
                    missing.append(name)
                    continue
                blocks = min(shard_blocks, entry["blocks"] - shard * shard_blocks)
                shards.append({"file": name, "blocks": blocks, "sha256": checksum.read_text().strip()})
            splits[split] = {**entry, "shards": shards}
        if not missing:
            manifest = {**self.header, "splits": splits, "complete": True}
            _atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
            for leftover in [*self.path.glob("*.npy.sha256"), *self.path.glob("*.tmp-*")]:
                leftover.unlink()
        return missing

    def nbytes(self) -> int:
        """Bytes on disk of the store (shards and manifest)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then ``os.replace``: readers never see a partial file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ live generate mode
class GenerationCache:
    """Teacher continuations keyed by the prompt's token ids, one small file per prompt, written atomically:
    what HardDistill's live ``generate`` mode reuses across epochs and runs (a ``generate`` label store is the
    offline form, read by block).

    Args:
        root: folder of this cache (one folder per teacher + generation settings).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, Tensor] = {}

    @classmethod
    def for_settings(cls, settings: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                     root: str | Path | None = None) -> GenerationCache:
        """The cache for these generation settings: ``root`` (default ``<cache>/generations``) / a hash of the
        settings and the tokenizer, with the settings written beside the files for humans."""
        settings = {**settings, "tokenizer": tokenizer_fingerprint(tokenizer)}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = Path(root or cache_dir() / "generations") / digest
        cache = cls(folder)
        info = folder / "settings.json"
        if not info.exists():
            _atomic_write(info, json.dumps(settings, indent=2, sort_keys=True, default=str).encode())
        return cache

    @staticmethod
    def key(prompt: Tensor) -> str:
        """Hash of a prompt's token ids (1-D)."""
        return hashlib.sha1(prompt.to(torch.int64).cpu().numpy().tobytes()).hexdigest()

    def get_many(self, prompts: Tensor) -> list[Tensor | None]:
        """Stored continuations (N,) for each prompt row of (B, P), None where not generated yet."""
        found: list[Tensor | None] = []
        for prompt in prompts:
            key = self.key(prompt)
            if key not in self._memory and (self.root / f"{key}.pt").exists():
                self._memory[key] = torch.load(self.root / f"{key}.pt", weights_only=True)
            found.append(self._memory.get(key))
        return found

    def put_many(self, prompts: Tensor, continuations: Tensor) -> None:
        """Store continuations (B, N) of prompts (B, P)."""
        for prompt, continuation in zip(prompts, continuations, strict=True):
            key = self.key(prompt)
            value = continuation.detach().cpu().clone()
            self._memory[key] = value
            buffer = io.BytesIO()
            torch.save(value, buffer)
            _atomic_write(self.root / f"{key}.pt", buffer.getvalue())

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.pt"))
