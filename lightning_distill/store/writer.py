"""Writing a label store: :class:`StoreWriter` (atomic shards, checksums, resumable) and :class:`LabelWriter`, the
callback of ``lightning-distill predict`` that feeds it the teacher's signal over the corpus."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_distill import checks
from lightning_distill.backbone import load_config, tokenizer_fingerprint
from lightning_distill.data import SPLITS
from lightning_distill.files import atomic_write, sha256
from lightning_distill.store.format import (
    FORMAT,
    KINDS,
    MANIFEST,
    VALUE_DTYPES,
    encode,
    locate,
    record_dtype,
    shard_ranges,
    shard_starts,
    split_starts,
    to_records,
)


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

    def differences(self) -> list[str] | None:
        """Header keys whose values differ from the existing manifest's (shard lists aside); ``None`` when there
        is no manifest yet."""
        if not (self.path / MANIFEST).exists():
            return None
        old = json.loads((self.path / MANIFEST).read_text())

        def plain(key: str, value: Any) -> Any:
            if key != "splits" or not isinstance(value, dict):
                return value
            return {s: {k: v for k, v in e.items() if k != "shards"} for s, e in value.items()}

        return [key for key in self.header if key != "created" and plain(key, old.get(key)) != plain(key,
                                                                                                 self.header[key])]

    def complete(self) -> bool:
        """Whether the store is already complete with these settings: rerunning the same labelling is a no-op
        (unless ``overwrite``)."""
        differ = self.differences()
        if self.overwrite or differ is None or differ:
            return False
        return bool(json.loads((self.path / MANIFEST).read_text()).get("complete"))

    def prepare(self) -> None:
        """Create the folder and an unfinished manifest, or check the existing one (one process does this)."""
        if (self.path / MANIFEST).exists():
            old = json.loads((self.path / MANIFEST).read_text())
            differ = self.differences() or []
            if old.get("complete") and not self.overwrite:
                if not differ:
                    return  # the same labelling, already done
                raise FileExistsError(f"label store {str(self.path)!r} is complete with other settings "
                                      f"({', '.join(differ)} differ); it is never rewritten silently: write to "
                                      "another path, delete it, or pass overwrite=True")
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
            atomic_write(self.path / MANIFEST, json.dumps({**self.header, "complete": False}, indent=1).encode())

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
        atomic_write(self.path / name, data)
        atomic_write(self.path / f"{name}.sha256", sha256(data).encode())

    def finish(self) -> list[str]:
        """Write the complete manifest if every shard is there; return the missing shards' names."""
        splits, missing = {}, []
        shard_blocks = self.header["shard_blocks"]
        for split, entry in self.header["splits"].items():
            shards = []
            for shard, (start, stop) in enumerate(shard_ranges(split_starts(entry, shard_blocks), entry["blocks"])):
                name = self.shard_name(split, shard)
                checksum = self.path / f"{name}.sha256"
                if not checksum.exists():
                    missing.append(name)
                    continue
                shards.append({"file": name, "blocks": stop - start, "sha256": checksum.read_text().strip()})
            splits[split] = {**entry, "shards": shards}
        if not missing:
            manifest = {**self.header, "splits": splits, "complete": True}
            atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
            for leftover in [*self.path.glob("*.npy.sha256"), *self.path.glob("*.tmp-*")]:
                leftover.unlink()
        return missing

    def nbytes(self) -> int:
        """Bytes on disk of the store (shards and manifest)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


class LabelWriter(L.Callback):
    """The labelling writer of ``lightning-distill predict``: stores the teacher's signal over the corpus once, as a
    label store (:mod:`lightning_distill.store`) that any number of students then train from, teacher absent.

    Under ``trainer.predict`` with a :class:`~lightning_distill.data.DistillDataModule`, every rank labels its share
    of the unwritten shards (the i-th goes to rank i mod world size); the module's ``predict_step`` gives teacher
    logits (HardDistill in ``generate`` mode: continuations), reduced where they are (on the GPU when there is one)
    to the stored kind. A shard is written, atomically and with its checksum, as soon as all its blocks are in;
    rank zero writes the manifest last. A rerun resumes: written shards are skipped, not recomputed. A complete
    store is never rewritten unless ``overwrite``. Predictions are not kept in memory.

    Args:
        path: folder of the store.
        kind: ``"topk"``, ``"sampled"``, ``"top1"``, or ``"generate"`` (with ``HardDistill(mode="generate")``).
        k: ``topk``: ids kept per position, in [1, vocabulary size].
        num_samples: ``sampled``: draws per position, in [1, 65535].
        temperature: > 0: stored log-probs and draws are of softmax(logits / temperature); train at the same.
        value_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``: dtype of stored log-probs and entropies.
        splits: splits to label, among ``"train"`` and ``"validation"`` (stored validation labels give
            ``val/kl`` and ``val/agreement`` when training from the store).
        shard_blocks: blocks per shard, >= 1: the unit of writing, of resuming and of the work split over ranks
            (a prepared corpus' shards also end where its chunks do:
            :func:`~lightning_distill.store.format.shard_starts`).
        seed: seeds the draws of ``sampled`` (per batch: reproducible for the same batch layout).
        overwrite: replace a complete store, or an unfinished one with other settings.
    """

    def __init__(self, path: str, kind: str = "topk", k: int = 32, num_samples: int = 12, temperature: float = 1.0,
                 value_dtype: str = "float16", splits: list[str] | None = None, shard_blocks: int = 256,
                 seed: int = 0, overwrite: bool = False) -> None:
        splits = list(SPLITS) if splits is None else list(splits)
        checks.require(isinstance(path, str) and bool(path), "path", path, "the folder to write the label store to")
        checks.choice("kind", kind, KINDS)
        checks.integer("k", k, "in [1, inf]", lambda v: v >= 1, example="32")
        checks.integer("num_samples", num_samples, f"in [1, {2**16 - 1}]", lambda v: 1 <= v < 2**16, example="12")
        checks.integer("shard_blocks", shard_blocks, "in [1, inf]", lambda v: v >= 1, example="256")
        temperature = checks.number("temperature", temperature, "> 0", lambda v: v > 0, example="1.0")
        checks.choice("value_dtype", value_dtype, VALUE_DTYPES)
        checks.require(bool(splits) and set(splits) <= set(SPLITS) and len(set(splits)) == len(splits), "splits",
                       splits, f"distinct names among {SPLITS}")
        self.path, self.kind, self.k, self.num_samples = path, kind, k, num_samples
        self.temperature, self.value_dtype, self.splits = temperature, value_dtype, splits
        self.shard_blocks, self.seed, self.overwrite = shard_blocks, seed, overwrite
        self.writer: StoreWriter | None = None
        self.already_complete = False  # set up on a store that this labelling already completed
        self._buffers: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Prepare the store (rank zero), then give the data module this rank's share of the unwritten shards."""
        if stage != "predict":
            return
        data = trainer.datamodule
        if not hasattr(data, "plan_predict"):
            raise ValueError("LabelWriter labels a DistillDataModule's blocks by block_idx: run "
                             "trainer.predict(model, datamodule=DistillDataModule(...))")
        served = getattr(pl_module.signal, "label_records", None) is not None  # a server encodes the records
        if not pl_module.needs_teacher() and not served:
            raise ValueError("LabelWriter needs a live teacher: the model has labels= set or no teacher")
        if served and self.kind not in ("topk", "sampled"):
            raise ValueError(f"kind={self.kind!r}: a served teacher labels 'topk' and 'sampled' stores; label "
                             f"{self.kind!r} with the teacher itself")
        settings = pl_module.label_settings()
        if (self.kind == "generate") != ("generation" in settings):
            raise ValueError(f"kind={self.kind!r} does not fit {type(pl_module).__name__} here: 'generate' stores "
                             "come from HardDistill(mode='generate'), the other kinds from a model's logits")
        vocab = _teacher_vocab(pl_module)
        checks.require(self.kind != "topk" or self.k <= vocab, "k", self.k, f"at most the vocabulary size {vocab}")
        self.blocks = {"train": len(data.train_blocks), "validation": len(data.val_blocks)}
        # a prepared corpus: shards also start at every corpus chunk (lightning_distill.store.format.shard_starts)
        chunks = {s: data.chunk_starts(s) if hasattr(data, "chunk_starts") else None for s in self.splits}
        self.starts = {s: shard_starts(self.blocks[s], self.shard_blocks, chunks[s]) for s in self.splits}
        self.ranges = {s: shard_ranges(self.starts[s], self.blocks[s]) for s in self.splits}  # [start, stop) each
        self.block_size = data.hparams.block_size
        new_tokens = settings.get("generation", {}).get("max_new_tokens", 0)
        self.dtype = record_dtype(self.kind, data.hparams.block_size, vocab, k=self.k, num_samples=self.num_samples,
                                  value_dtype=self.value_dtype, new_tokens=new_tokens)
        header = {
            "kind": self.kind, **settings, "tokenizer": tokenizer_fingerprint(pl_module.tokenizer),
            "vocab_size": vocab, "corpus": data.corpus_fingerprint(), "corpus_settings": data.corpus_settings(),
            "block_size": data.hparams.block_size, "temperature": self.temperature,
            "k": self.k if self.kind == "topk" else None,
            "num_samples": self.num_samples if self.kind == "sampled" else None,
            "value_dtype": self.value_dtype, "seed": self.seed, "shard_blocks": self.shard_blocks,
            "record": [[n, self.dtype[n].base.str, list(self.dtype[n].shape)] for n in self.dtype.names],
            "bytes_per_block": self.dtype.itemsize,
            "splits": {s: {"blocks": self.blocks[s], **({} if chunks[s] is None else {"starts": self.starts[s]})}
                       for s in self.splits},
        }
        self.writer = StoreWriter(self.path, header, self.overwrite)
        self._buffers = {}
        trainer.predict_loop.return_predictions = False  # the logits of a whole corpus would not fit in memory
        self.already_complete = self.writer.complete()
        if self.already_complete:  # a rerun of a finished labelling: nothing to do, and it says so
            data.plan_predict({s: [] for s in self.splits})
            rank_zero_info(f"LabelWriter: {self.path} is already complete with these settings; nothing to do "
                           "(overwrite=True relabels it)")
            return
        if trainer.is_global_zero:
            self.writer.prepare()
        trainer.strategy.barrier("LabelWriter.prepare")
        done = self.writer.finished()
        todo = [(s, i) for s in self.splits for i in range(len(self.ranges[s])) if (s, i) not in done]
        mine = todo[trainer.global_rank :: trainer.world_size]
        data.plan_predict({s: [b for split, i in mine if split == s for b in range(*self.ranges[s][i])]
                           for s in self.splits})
        rank_zero_info(f"LabelWriter: {len(todo)} shard(s) of {self.kind!r} labels to write into {self.path} "
                       f"({len(done)} already written)")

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        """Reduce a batch's teacher signal to records and write every shard it completes."""
        split = self.splits[dataloader_idx]
        first = int(prediction["block_idx"][0])
        seed = (self.seed * 1_000_003 + SPLITS.index(split) * 1_000_000_007 + first) % 2**63
        if "records" in prediction:  # a served teacher: the server encodes them, as below, in these settings
            records = prediction["records"](self.kind, k=self.k, num_samples=self.num_samples,
                                            temperature=self.temperature, value_dtype=self.value_dtype, seed=seed)
            if records.dtype != self.dtype:
                raise ValueError(f"the served teacher's records are laid out as {records.dtype}, this store as "
                                 f"{self.dtype}: the server's teacher is not the one this labelling names")
        else:
            records = self._records(prediction, pl_module, seed)  # (B,)
        for row, block in enumerate(prediction["block_idx"].tolist()):
            shard, offset = locate(self.starts[split], block)
            if (split, shard) not in self._buffers:
                start, stop = self.ranges[split][shard]
                rows = stop - start
                self._buffers[split, shard] = (np.empty(rows, self.dtype), np.zeros(rows, dtype=bool))
            buffer, filled = self._buffers[split, shard]
            buffer[offset], filled[offset] = records[row], True
            if filled.all():
                self.writer.write(split, shard, buffer)
                del self._buffers[split, shard]

    def _records(self, prediction: dict[str, Any], pl_module: L.LightningModule, seed: int) -> np.ndarray:
        """The (B,) records of a batch's logits (or continuations), reduced where they are."""
        signal = prediction.get("continuations" if self.kind == "generate" else "logits")
        if signal is None:
            raise ValueError(f"kind={self.kind!r} needs {'continuations' if self.kind == 'generate' else 'logits'} "
                             f"from predict_step; {type(pl_module).__name__} gave {sorted(prediction)}")
        generator = torch.Generator(signal.device).manual_seed(seed)
        fields = encode(self.kind, signal, k=self.k, num_samples=self.num_samples, temperature=self.temperature,
                        generator=generator)
        return to_records(fields, self.dtype, self.value_dtype)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Once every rank is done, rank zero writes the complete manifest (or says what is missing)."""
        trainer.strategy.barrier("LabelWriter.finish")
        if not trainer.is_global_zero or self.writer is None or self.already_complete:
            return
        missing = self.writer.finish()
        if missing:
            rank_zero_warn(f"LabelWriter: {len(missing)} shard(s) of {self.path} are not written yet (e.g. "
                           f"{missing[0]}); run the same command again to resume")
            return
        tokens = sum(self.blocks[s] for s in self.splits) * self.block_size
        rank_zero_info(f"LabelWriter: {self.path} is complete: {self.writer.nbytes() / 2**20:.1f} MiB, "
                       f"{self.writer.nbytes() / tokens:.1f} bytes per token")


def _teacher_vocab(pl_module: L.LightningModule) -> int:
    """The teacher's output size: from its config (read without loading it; a served teacher's local copy), else
    the tokenizer's length."""
    teacher = getattr(pl_module, "teacher", None)
    if teacher is not None:
        return int(teacher.config.vocab_size)
    name = getattr(pl_module, "local_teacher", None)  # a served teacher's local copy, if any
    if isinstance(name, str):
        return int(load_config(name, role="teacher").vocab_size)
    return len(pl_module.tokenizer)
