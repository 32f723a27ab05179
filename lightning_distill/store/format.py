"""The label store's format: the teacher runs over the corpus once, any number of students train from disk.

A label store is a folder, written by :class:`~lightning_distill.store.LabelWriter` under ``lightning-distill
predict`` (``configs/label_soft.yaml``) and read by a method's ``labels=PATH``
(:class:`~lightning_distill.signals.StoredLabels`)::

    manifest.json         teacher, tokenizer and corpus fingerprints, block size, kind and its settings, record
                          layout and dtypes, blocks per split, shards with a SHA-256 each; "complete": true once
                          every shard is written (an unfinished store is resumed, a complete one never rewritten)
    train-00000.npy       a shard: the records of at most ``shard_blocks`` consecutive blocks of one split, a 1-D
    ...                   NumPy structured array, memory-mapped when read
    validation-00000.npy

Shards begin every ``shard_blocks`` blocks and, for a prepared (streamed) corpus, at every chunk of the corpus too,
so that a shard's labels belong to one corpus chunk and are written, resumed and read with it (:func:`shard_starts`).
A split's manifest entry then holds ``starts``, the first block of each of its shards; without it (stores of
in-memory corpora) shard i holds blocks ``[i * shard_blocks, (i + 1) * shard_blocks)``. Either way a block is found
by its ``block_idx`` within the split (:func:`locate`).

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
  EOS-padded (HardDistill's sequence-level mode; its live mode keeps using
  :class:`~lightning_distill.generation.GenerationCache`).

Read back, a block is a dict of tensors (gathered by block into a batch's stored signal): ``topk_ids``
(T, K) long and ``topk_logprobs`` (T, K) float32; ``sample_ids`` (T, S) long, ``sample_weights`` (T, S) float32
and ``entropy`` (T,); ``argmax`` (T,) long for every per-position kind; ``continuation`` (N,) long.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill import checks
from lightning_distill.losses import sparse

FORMAT = "lightning_distill.labels/1"
MANIFEST = "manifest.json"
KINDS = ("topk", "sampled", "top1", "generate")
VALUE_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}  # bfloat16: its raw bits
VALUE_FIELDS = ("logprobs", "covered", "entropy")
CPU_CHUNK_ROWS = 16  # positions reduced at a time on CPUs (16 x 49152 fp32 = 3 MB)


def record_dtype(kind: str, block_size: int, vocab_size: int, *, k: int = 32, num_samples: int = 12,
                 value_dtype: str = "float16", new_tokens: int = 0) -> np.dtype:
    """The NumPy structured dtype of one block's record (see the module docstring)."""
    checks.choice("kind", kind, KINDS)
    checks.choice("value_dtype", value_dtype, VALUE_DTYPES)
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
        ids, logprobs = map(torch.cat, zip(*(sparse.topk_teacher(r, k, temperature) for r in rows), strict=True))
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
    ids, weights = sparse.merge_draws(torch.cat(draws))  # (N, S) each
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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path``; ``ValueError`` when there is none or it is another format."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise ValueError(f"labels={str(path)!r} is not a label store (no {MANIFEST}): write one with "
                         "`lightning-distill predict --config configs/label_soft.yaml`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"labels={str(path)!r}: {MANIFEST} is not valid JSON ({error}); the store is damaged: "
                         "label the corpus again") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"labels={str(path)!r} has format {manifest.get('format')!r}, this version reads "
                         f"{FORMAT!r}: label the corpus again")
    return manifest


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
