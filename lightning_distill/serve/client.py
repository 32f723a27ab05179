"""The client side of a served teacher: :class:`TeacherClient` asks one or several servers for the teacher's signal
of a batch of token ids, over our binary endpoint (``lightning-distill serve``) or vLLM's completions API, and
gives it back as the tensors a label store gives (:func:`lightning_distill.store.format.decode`).

- **Checks before any work** (:meth:`TeacherClient.connect`): every server answers ``/v1/models``; ours carries
  its tokenizer's fingerprint, which must be the run's; a vLLM server is asked to ``/tokenize`` a probe text, which
  must give the run's ids; k must be at most the server's ``max_logprobs``.
- **Concurrency**: a batch's rows are split over the servers, one request each, sent at once.
- **Failures**: a request that cannot connect, times out or gets 502/503/504 is retried with exponential backoff
  (on the next server, if there are several) for ``retry_for`` seconds, then :class:`ServerUnavailableError` names the
  URL and the last error; a 4xx/500 answer is a ``ValueError`` with what the server said (401: the API key); an
  answer that is short or malformed is a ``ValueError``: nothing is trained on it.

Only the standard library talks HTTP (``http.client``, one kept-alive connection per thread and server). The API
key comes from ``$LIGHTNING_DISTILL_API_KEY``, so that it is never in a model's hyperparameters or checkpoints.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from lightning_distill.serve import openai, wire
from lightning_distill.store.format import decode, record_dtype, to_records

API_KEY_ENV = "LIGHTNING_DISTILL_API_KEY"
RETRY_STATUS = (502, 503, 504)
FIRST_BACKOFF, MAX_BACKOFF = 0.25, 8.0  # seconds between retries: doubling from the first, capped
PROTOCOLS = ("auto", "binary", "openai")


class ServerUnavailableError(ConnectionError):
    """A server could not be reached (or kept failing) for the whole retry time."""


def normalize(url: str) -> str:
    """``http(s)://host:port`` without a trailing ``/`` or ``/v1`` (an OpenAI ``base_url`` is accepted)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def is_url(value: Any) -> bool:
    """Whether ``value`` names a served teacher: an ``http://`` or ``https://`` URL, or a non-empty list of them."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, str) and v.startswith(("http://", "https://")) for v in values)


class TeacherClient:
    """Asks served teachers for their signal.

    Args:
        urls: one or several ``http://host:port`` of servers of the same teacher.
        protocol: ``"binary"`` (``lightning-distill serve``), ``"openai"`` (vLLM's ``/v1/completions``), or
            ``"auto"``: binary when the server says it is ours.
        timeout: seconds one request may take.
        retry_for: seconds a failing request is retried before :class:`ServerUnavailableError`.
    """

    def __init__(self, urls: str | list[str], protocol: str = "auto", timeout: float = 30.0,
                 retry_for: float = 120.0) -> None:
        self.urls = [normalize(u) for u in ([urls] if isinstance(urls, str) else list(urls))]
        self.protocol, self.timeout, self.retry_for = protocol, timeout, retry_for
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self.cards: list[dict[str, Any]] = []
        self.fingerprint: str | None = None  # the run's tokenizer's, which every binary answer must carry
        self.model: str | None = None
        self.vocab_size: int | None = None
        self.bytes_received = 0  # answer bytes on the wire, for benchmarks
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.urls)), thread_name_prefix="served-teacher")

    # ---------------------------------------------------------------------------------------------- checks
    def connect(self, tokenizer_fingerprint: str, probe_ids: list[int], probe_text: str, k: int) -> None:
        """Ask every server who it is and refuse, before any work, one that serves another tokenizer, cannot give
        k log-probs, or (``protocol="binary"``) is not ours. Sets :attr:`protocol` when it was ``"auto"``."""
        self.cards = []
        for url in self.urls:
            listing = self._json("GET", url, "/v1/models")
            entries = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
                raise ValueError(f"{url}/v1/models answered {str(listing)[:120]!r}, not a model list: is it a "
                                 "teacher server (lightning-distill serve, or vllm serve)?")
            self.cards.append(entries[0])
        ours = [isinstance(card.get("lightning_distill"), dict) for card in self.cards]
        if self.protocol == "auto":
            self.protocol = "binary" if all(ours) else "openai"
        if self.protocol == "binary" and not all(ours):
            url = self.urls[ours.index(False)]
            raise ValueError(f"protocol='binary' needs lightning-distill serve, but {url} is another server: use "
                             "protocol='openai' (vLLM's completions API)")
        self.model = self.cards[0].get("id")
        self.fingerprint = tokenizer_fingerprint if all(ours) else None
        for url, card, mine in zip(self.urls, self.cards, ours, strict=True):
            if mine:  # a fingerprint to check, whatever the protocol
                self._check_ours(url, card["lightning_distill"], tokenizer_fingerprint, k)
            else:
                self._check_openai(url, card, probe_ids, probe_text)

    def _check_ours(self, url: str, card: dict[str, Any], fingerprint: str, k: int) -> None:
        if card.get("format") != wire.FORMAT:
            raise ValueError(f"{url} speaks {card.get('format')!r}, this client {wire.FORMAT!r}: use the same "
                             "lightning_distill version on both sides")
        if card.get("tokenizer") != fingerprint:
            raise ValueError(f"{url} serves {card.get('teacher')!r} with tokenizer fingerprint "
                             f"{card.get('tokenizer')}, this run's tokenizer has {fingerprint}: the token ids would "
                             "not mean the same. Serve a teacher with the student's tokenizer, or set tokenizer= to "
                             "the served teacher's")
        if k > card.get("max_logprobs", 0):
            raise ValueError(f"served.k must be at most {url}'s --max-logprobs {card.get('max_logprobs')}, got {k}: "
                             f"lower served.k or restart the server with --max-logprobs {k}")
        vocab = card.get("vocab_size")
        if self.vocab_size is not None and vocab != self.vocab_size:
            raise ValueError(f"{url} serves a vocabulary of {vocab}, {self.urls[0]} one of {self.vocab_size}: "
                             "every URL must serve the same teacher")
        self.vocab_size = vocab

    def _check_openai(self, url: str, card: dict[str, Any], probe_ids: list[int], probe_text: str) -> None:
        """A vLLM server has no fingerprint: it must split the probe text into the run's ids."""
        answer = self._json("POST", url, "/tokenize", {"model": card.get("id"), "prompt": probe_text})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if tokens != probe_ids:
            raise ValueError(f"{url} ({card.get('id')!r}) splits a probe text into {str(tokens)[:80]}, this run's "
                             f"tokenizer into {str(probe_ids)[:80]}: the token ids would not mean the same. Serve a "
                             "teacher with the student's tokenizer, or set tokenizer= to the served teacher's")

    # ------------------------------------------------------------------------------------------- answers
    def submit(self, kind: str, input_ids: Tensor, attention_mask: Tensor | None = None, **settings: Any
               ) -> Future[dict[str, Tensor]]:
        """Ask for the signal of ``input_ids`` (B, T) in the background: a future of :meth:`ask`'s answer."""
        return self._pool.submit(self.ask, kind, input_ids, attention_mask, **settings)

    def ask(self, kind: str, input_ids: Tensor, attention_mask: Tensor | None = None, **settings: Any
            ) -> dict[str, Tensor]:
        """The teacher's signal of ``input_ids`` (B, T) on the CPU, as a store gives it: ``kind="topk"``:
        ``topk_ids`` / ``topk_logprobs`` (B, T, K), ``argmax`` (B, T); ``"sampled"``: ``sample_ids``,
        ``sample_weights`` (B, T, S), ``argmax``, ``entropy``; ``"tokens"``: ``token_logprobs`` (B, T). The rows
        are split over the servers, asked at once."""
        input_ids = input_ids.detach().cpu()
        mask = None if attention_mask is None else attention_mask.detach().cpu()
        parts = np.array_split(np.arange(input_ids.shape[0]), min(len(self.urls), input_ids.shape[0]))
        jobs = [(i, rows) for i, rows in enumerate(parts)]
        if len(jobs) == 1:
            answers = [self._ask_rows(0, kind, input_ids, mask, settings)]
        else:
            futures = [self._pool.submit(self._ask_rows, i, kind, input_ids[rows],
                                         None if mask is None else mask[rows], settings) for i, rows in jobs]
            answers = [f.result() for f in futures]
        out = {name: torch.cat([a[name] for a in answers]) for name in answers[0]}
        expected = tuple(input_ids.shape)
        for name, value in out.items():
            if tuple(value.shape[:2]) != expected:
                raise ValueError(f"{self.urls[0]} answered {name} of shape {tuple(value.shape)} for input_ids of "
                                 f"shape {expected}: a short answer, nothing is trained on it")
        return out

    def records(self, kind: str, input_ids: Tensor, **settings: Any) -> np.ndarray:
        """The (B,) records of ``input_ids`` (B, T) as a label store keeps them (``topk`` or ``sampled``, our
        server only: :func:`lightning_distill.serve.wire.layout`), for writing a store from the server."""
        if self.protocol != "binary":
            raise ValueError(f"{self.urls[0]} speaks vLLM's completions API: a label store is written from "
                             "lightning-distill serve (protocol='binary'), or from the teacher itself")
        input_ids = input_ids.detach().cpu()
        parts = np.array_split(np.arange(input_ids.shape[0]), min(len(self.urls), input_ids.shape[0]))
        futures = [self._pool.submit(self._binary, i, kind, input_ids[rows], None, settings)
                   for i, rows in enumerate(parts)]
        return np.concatenate([f.result()[2] for f in futures])

    def _ask_rows(self, first: int, kind: str, input_ids: Tensor, mask: Tensor | None,
                  settings: dict[str, Any]) -> dict[str, Tensor]:
        if self.protocol == "binary":
            where, header, records = self._binary(first, kind, input_ids, mask, settings)
            return wire.targets(header, records, where)
        return self._ask_openai(first, kind, input_ids, mask, settings)

    def _binary(self, first: int, kind: str, input_ids: Tensor, mask: Tensor | None,
                settings: dict[str, Any]) -> tuple[str, dict[str, Any], np.ndarray]:
        """Where it was answered, the header and the records of a ``/v1/distill`` request (checked: a teacher of
        this run's tokenizer, as many records as rows, of the kind asked)."""
        body = wire.distill_request(input_ids, kind=kind, attention_mask=mask, **settings)
        url, answer = self._post(first, "/v1/distill", json.dumps(body).encode())
        where = f"{url}/v1/distill"
        header, records = wire.unpack(answer, where)
        if header["kind"] != kind or header["rows"] != input_ids.shape[0]:
            raise ValueError(f"{where} answered {header['rows']} {header['kind']!r} records for "
                             f"{input_ids.shape[0]} {kind!r} rows: nothing is trained on it")
        if self.fingerprint is not None and header.get("tokenizer") != self.fingerprint:
            raise ValueError(f"{where} answered for tokenizer {header.get('tokenizer')}, this run's is "
                             f"{self.fingerprint}: the server changed teacher; nothing is trained on it")
        return where, header, records

    def _ask_openai(self, first: int, kind: str, input_ids: Tensor, mask: Tensor | None,
                    settings: dict[str, Any]) -> dict[str, Tensor]:
        """vLLM's prompt log-probs, turned into the store's fields through its own encoding (so the two protocols
        give the same targets for the same log-probs)."""
        rows = [row[m.bool()].tolist() if mask is not None else row.tolist()
                for row, m in zip(input_ids, mask if mask is not None else input_ids, strict=True)]
        k = settings.get("k", 32) if kind == "topk" else 0
        body = openai.request(rows, k, self.model)
        url, answer = self._post(first, "/v1/completions", json.dumps(body).encode())
        try:
            parsed = json.loads(answer)
        except ValueError:
            raise ValueError(f"{url}/v1/completions answered {len(answer)} bytes that are not JSON: a malformed "
                             "answer, nothing is trained on it") from None
        ids, logprobs, own = openai.parse(parsed, rows, k, f"{url}/v1/completions")
        if mask is not None:  # back to the left-padded layout
            ids, logprobs, own = (_left_pad(t, mask) for t in (ids, logprobs, own))
        if kind == "tokens":
            return {"token_logprobs": own}
        value_dtype = settings.get("value_dtype", "float16")
        fields = {"ids": ids, "logprobs": logprobs, "covered": logprobs.logsumexp(-1).clamp(max=0)}  # as encode()
        dtype = record_dtype("topk", input_ids.shape[1], 2**31 - 1, k=k, value_dtype=value_dtype)  # int32 ids
        rows = [decode(record, {"kind": "topk", "value_dtype": value_dtype})
                for record in to_records(fields, dtype, value_dtype)]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    # ---------------------------------------------------------------------------------------------- HTTP
    def _post(self, first: int, path: str, body: bytes) -> tuple[str, bytes]:
        """POST ``body`` (JSON) to ``path`` of server ``first``, retrying (on the next server) as the module
        docstring says; the URL that answered and its answer."""
        start, attempt, wait, last = time.monotonic(), 0, FIRST_BACKOFF, ""
        while True:
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                status, answer = self._send(url, "POST", path, body)
            except (OSError, http.client.HTTPException) as error:
                status, answer, last = None, b"", f"{type(error).__name__}: {error}"
            if status is not None and status not in RETRY_STATUS:
                self.bytes_received += len(answer)
                if status != 200:
                    raise ValueError(_refusal(url + path, status, answer))
                return url, answer
            if status is not None:
                last = f"HTTP {status}: {answer[:200].decode(errors='replace')}"
            attempt += 1
            if time.monotonic() - start + wait > self.retry_for:
                seconds = time.monotonic() - start
                raise ServerUnavailableError(
                    f"{url}{path} failed {attempt} time(s) over {seconds:.0f} s (served.retry_for={self.retry_for}); "
                    f"last: {last}. Is the server running? Restart it (lightning-distill serve ...), then resume the "
                    "fit with --ckpt_path last")
            time.sleep(wait)
            wait = min(2 * wait, MAX_BACKOFF)

    def _json(self, method: str, url: str, path: str, body: Any = None) -> Any:
        """A JSON request to one server (retried like :meth:`_post`)."""
        index = self.urls.index(url)
        if method == "GET":
            start, wait = time.monotonic(), FIRST_BACKOFF
            while True:
                try:
                    status, answer = self._send(url, "GET", path, None)
                    break
                except (OSError, http.client.HTTPException) as error:
                    if time.monotonic() - start + wait > self.retry_for:
                        raise ServerUnavailableError(f"{url}{path}: {type(error).__name__}: {error} for "
                                                f"{time.monotonic() - start:.0f} s (served.retry_for="
                                                f"{self.retry_for}). Is the server running (lightning-distill "
                                                "serve ...)?") from None
                    time.sleep(wait)
                    wait = min(2 * wait, MAX_BACKOFF)
            if status != 200:
                raise ValueError(_refusal(url + path, status, answer))
        else:
            _, answer = self._post(index, path, json.dumps(body).encode())
        try:
            return json.loads(answer)
        except ValueError:
            raise ValueError(f"{url}{path} answered {answer[:80]!r}, which is not JSON") from None

    def _send(self, url: str, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """One HTTP exchange on this thread's kept-alive connection to ``url`` (reopened after a failure)."""
        connections = self._local.__dict__.setdefault("connections", {})
        connection = connections.get(url)
        if connection is None:
            parts = urlsplit(url)
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connection = connections[url] = kind(parts.hostname, parts.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            connection.request(method, urlsplit(url).path + path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except BaseException:
            connection.close()
            connections.pop(url, None)
            raise

    def close(self) -> None:
        """Stop the background threads (requests under way finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _refusal(where: str, status: int, answer: bytes) -> str:
    """The error of a refused request: the URL, the status and what the server said."""
    try:
        detail = json.loads(answer).get("detail", answer.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = answer[:300].decode(errors="replace")
    hint = (f": set ${API_KEY_ENV} to the server's --api-key" if status == 401 else "")
    return f"{where} refused the request (HTTP {status}): {detail}{hint}"


def _left_pad(value: Tensor, mask: Tensor) -> Tensor:
    """Rows right-filled by :func:`~lightning_distill.serve.openai.parse` moved back under ``mask`` (B, T): each
    row's values at its valid positions, its first value on the left padding."""
    out = torch.empty((*mask.shape, *value.shape[2:]), dtype=value.dtype)
    for row, m in enumerate(mask.bool()):
        n = int(m.sum())
        out[row, m] = value[row, :n]
        out[row, ~m] = value[row, 0]
    return out
