"""The compact binary answer of ``POST /v1/distill``: the teacher's signal of a batch of token ids, laid out exactly
as a label store's records (:mod:`lightning_distill.store.format`), so that a served teacher and a stored one give
the same targets bit for bit.

A request is JSON (:func:`distill_request`)::

    {"input_ids": [[...], ...], "attention_mask": null or [[...], ...], "kind": "topk" | "sampled" | "tokens",
     "k": 32, "num_samples": 12, "temperature": 1.0, "value_dtype": "float16", "seed": 0}

An answer is ``MAGIC``, the length of a JSON header (uint32, little-endian), the header, then B records packed
little-endian (``numpy`` structured array, one record per row)::

    header = {"format": FORMAT, "tokenizer": "<fingerprint>", "vocab_size": V, "kind": ..., "rows": B,
              "positions": T, "k": ..., "num_samples": ..., "temperature": ..., "value_dtype": ...,
              "record": [[name, dtype, shape], ...]}

Kinds: ``topk`` and ``sampled`` are the store's records (:func:`~lightning_distill.store.format.record_dtype`:
top-k ids, their log-probs and ``covered``, the log of the mass they hold; or draws and their counts, the arg-max
and the entropy), 130 and 40 bytes per token at K = 32 and S = 12 in float16; ``tokens`` is the teacher's float32
log-prob of each next token (on-policy scoring), 4 bytes per token. The tokenizer fingerprint in every header lets
a client refuse a teacher whose tokenizer is not its own.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill import checks
from lightning_distill.store.format import VALUE_DTYPES, decode, encode, record_dtype, to_records

FORMAT = "lightning_distill.serve/1"
MAGIC = b"LDSERVE1"
KINDS = ("topk", "sampled", "tokens")
_LENGTH = struct.Struct("<I")


def distill_request(input_ids: Tensor, *, kind: str = "topk", k: int = 32, num_samples: int = 12,
                    temperature: float = 1.0, value_dtype: str = "float16", seed: int = 0,
                    attention_mask: Tensor | None = None) -> dict[str, Any]:
    """The JSON body asking for the teacher's signal of ``input_ids`` (B, T) (``attention_mask`` (B, T): 0 on left
    padding)."""
    return {"input_ids": input_ids.tolist(), "attention_mask": None if attention_mask is None else
            attention_mask.tolist(), "kind": kind, "k": k, "num_samples": num_samples, "temperature": temperature,
            "value_dtype": value_dtype, "seed": seed}


def check_request(body: Any, vocab_size: int, max_logprobs: int, max_positions: int | None) -> dict[str, Any]:
    """A ``/v1/distill`` request checked on the server: ``ValueError`` naming the field otherwise (an HTTP 400)."""
    checks.require(isinstance(body, dict), "request", type(body).__name__, "a JSON object")
    kind = checks.choice("kind", body.get("kind", "topk"), KINDS)
    ids = _rows("input_ids", body.get("input_ids"), vocab_size)
    positions = len(ids[0])
    if max_positions is not None:
        checks.require(positions <= max_positions, "input_ids", f"{len(ids)} rows of {positions} tokens",
                       f"at most {max_positions} tokens per row (the teacher's positions)")
    mask = body.get("attention_mask")
    if mask is not None:
        mask = _rows("attention_mask", mask, 2)
        checks.require(len(mask) == len(ids) and len(mask[0]) == positions, "attention_mask",
                       f"{len(mask)} x {len(mask[0])}", f"{len(ids)} x {positions} (as input_ids)")
    k = checks.integer("k", body.get("k", 32), f"in [1, {max_logprobs}] (this server's --max-logprobs)",
                       lambda v: 1 <= v <= min(max_logprobs, vocab_size), "32")
    num_samples = checks.integer("num_samples", body.get("num_samples", 12), "in [1, 255]",
                                 lambda v: 1 <= v <= 255, "12")
    temperature = checks.number("temperature", body.get("temperature", 1.0), "> 0", lambda v: v > 0, "1.0")
    value_dtype = checks.choice("value_dtype", body.get("value_dtype", "float16"), VALUE_DTYPES)
    seed = checks.integer("seed", body.get("seed", 0), ">= 0", lambda v: v >= 0, "0")
    return {"input_ids": torch.tensor(ids), "attention_mask": None if mask is None else torch.tensor(mask),
            "kind": kind, "k": k, "num_samples": num_samples, "temperature": temperature,
            "value_dtype": value_dtype, "seed": seed}


def _rows(name: str, rows: Any, bound: int) -> list[list[int]]:
    """``rows`` as a non-empty rectangular list of lists of ints in [0, bound)."""
    ok = (isinstance(rows, list) and len(rows) > 0 and all(isinstance(r, list) and r for r in rows)
          and len({len(r) for r in rows}) == 1)
    checks.require(ok, name, _short(rows), "a non-empty list of equally long, non-empty lists of token ids")
    flat = [v for r in rows for v in r]
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < bound for v in flat)
    checks.require(ok, name, _short(rows), f"integers in [0, {bound})")
    return rows


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def layout(kind: str, positions: int, vocab_size: int, k: int, num_samples: int, value_dtype: str) -> np.dtype:
    """The record of one row: the label store's for ``topk`` and ``sampled``, float32 log-probs for ``tokens``."""
    if kind == "tokens":
        return np.dtype([("logprobs", "<f4", (positions,))])
    return record_dtype(kind, positions, vocab_size, k=k, num_samples=num_samples, value_dtype=value_dtype)


@torch.no_grad()
def answer(request: dict[str, Any], logits: Tensor, tokenizer: str) -> bytes:
    """The binary answer to a checked request, from the teacher's logits (B, T, V) of its ``input_ids``."""
    kind, ids = request["kind"], request["input_ids"]
    rows, positions, vocab = logits.shape
    dtype = layout(kind, positions, vocab, request["k"], request["num_samples"], request["value_dtype"])
    if kind == "tokens":
        following = ids.roll(-1, dims=1).unsqueeze(-1)  # (B, T, 1): the token at t + 1
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, following).squeeze(-1)  # (B, T)
        records = np.empty(rows, dtype)
        records["logprobs"] = logprobs.numpy()
    else:
        generator = torch.Generator(logits.device).manual_seed(request["seed"])
        fields = encode(kind, logits, k=request["k"], num_samples=request["num_samples"],
                        temperature=request["temperature"], generator=generator)
        records = to_records(fields, dtype, request["value_dtype"])
    header = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab, "kind": kind, "rows": rows,
              "positions": positions, **{key: request[key] for key in ("k", "num_samples", "temperature",
                                                                       "value_dtype")},
              "record": [[n, dtype[n].base.str, list(dtype[n].shape)] for n in dtype.names]}
    return pack(header, records)


def pack(header: dict[str, Any], records: np.ndarray) -> bytes:
    """``MAGIC``, the header's length and JSON, then the records' bytes."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _LENGTH.pack(len(text)) + text + records.tobytes()


def unpack(body: bytes, where: str) -> tuple[dict[str, Any], np.ndarray]:
    """The header and the (B,) records of an answer; ``ValueError`` naming ``where`` (the URL) when it is not one,
    or is cut short."""
    start = len(MAGIC) + _LENGTH.size
    if len(body) < start or not body.startswith(MAGIC):
        raise ValueError(f"{where} answered {len(body)} bytes that are not a lightning_distill answer (they start "
                         f"with {body[:16]!r}): is it `lightning-distill serve`? (a vLLM server: "
                         "protocol='openai')")
    (length,) = _LENGTH.unpack_from(body, len(MAGIC))
    try:
        header = json.loads(body[start:start + length])
        dtype = np.dtype([(name, code, tuple(shape)) for name, code, shape in header["record"]])
        expected = header["rows"] * dtype.itemsize
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{where} answered a malformed header ({error}): nothing is trained on it") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{where} speaks {header.get('format')!r}, this client {FORMAT!r}: use the same "
                         "lightning_distill version on both sides")
    got = len(body) - start - length
    if got != expected:
        raise ValueError(f"{where} answered {got} bytes of records, {header['rows']} records of {dtype.itemsize} "
                         f"bytes are {expected}: a short or malformed answer, nothing is trained on it")
    return header, np.frombuffer(body, dtype, count=header["rows"], offset=start + length)


def targets(header: dict[str, Any], records: np.ndarray, where: str) -> dict[str, Tensor]:
    """The records as the tensors a label store gives (:func:`lightning_distill.store.format.decode`), stacked:
    ``topk_ids`` (B, T, K), ``topk_logprobs`` (B, T, K) rescaled to ``covered``, ``argmax`` (B, T); or
    ``sample_ids``, ``sample_weights``, ``argmax``, ``entropy``; or ``token_logprobs`` (B, T). Values are checked:
    ids in the vocabulary, finite log-probs (``ValueError`` otherwise)."""
    if header["kind"] == "tokens":
        out = {"token_logprobs": torch.from_numpy(np.array(records["logprobs"], dtype=np.float32))}
    else:
        rows = [decode(record, header) for record in records]
        out = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
    check_targets(out, header["vocab_size"], where)
    return out


def check_targets(out: dict[str, Tensor], vocab_size: int, where: str) -> None:
    """``ValueError`` naming ``where`` unless every id is in [0, vocab_size) and every value is finite."""
    for name, value in out.items():
        if value.dtype == torch.long:
            bad = bool(((value < 0) | (value >= vocab_size)).any())
        else:
            bad = not bool(torch.isfinite(value).all())
        if bad:
            allowed = f"[0, {vocab_size})" if value.dtype == torch.long else "the finite numbers"
            raise ValueError(f"{where} answered {name} outside {allowed}: a malformed answer, nothing is trained "
                             "on it")
