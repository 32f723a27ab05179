"""A teacher behind a server (``SoftDistill(teacher="http://HOST:PORT")``): each batch's token ids go to one or
several servers (``lightning-distill serve``, or ``vllm serve MODEL --max-logprobs K``), and the answer comes back
as the sparse targets a label store gives, bit for bit: top-k ids with their log-probs rescaled to the mass they
hold (``tail="bucket"`` matches the rest), or sampled ids with their weights. The teacher never enters this
process: a step costs about max(student step, teacher answer) when the two run on different devices.

**Prefetch** (``served.prefetch``): during ``fit``, :meth:`ServedTeacher.setup` wraps the data module's train loader
in a :class:`Lookahead`, which draws each batch one step early and sends its request at once (a background
thread), so the answer travels while the student computes the batch before it. Answers are keyed by the batch's
content (a hash of its token ids), never by position, so the targets of a batch are always that batch's: a batch
nobody asked for ahead (the first one, validation batches, on-policy rollouts, a run resumed mid-epoch, a streamed
corpus whose loader keeps its own position and is not wrapped) is asked for when the step needs it. The loader's
position in the checkpoint is the trainer's count of finished batches, so drawing one batch early changes nothing
on resume. :meth:`ServedTeacher.teardown` unwraps the loader and stops the threads.

Before any work, :meth:`ServedTeacher.setup` checks the server(s) (:meth:`lightning_distill.serve.client.
TeacherClient.connect`): the tokenizer (its fingerprint, or for vLLM the ids of a probe text) must be the run's,
and k at most the server's ``--max-logprobs``. A server that goes away is retried for ``served.retry_for`` seconds,
then the step fails with :class:`~lightning_distill.serve.client.ServerUnavailableError` naming the URL; a short or
malformed answer is a ``ValueError``: nothing is trained on it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_distill import checks, metrics
from lightning_distill.backbone import PROBE_TEXT, Run, tokenizer_fingerprint
from lightning_distill.data.sampler import ResumableLoader
from lightning_distill.losses import SparseTargets
from lightning_distill.losses.sparse import TAILS
from lightning_distill.options import Served
from lightning_distill.serve.client import TeacherClient, is_url
from lightning_distill.signals.base import Batch, TeacherSignal

PENDING = 4  # answers asked ahead and kept until their batch comes (one is enough for a plain train loop)


class ServedTeacher(TeacherSignal):
    """The teacher's signal from one or several servers of it.

    Args:
        urls: ``http://HOST:PORT`` of a server, or a list of URLs of servers of the same teacher (each batch's rows
            are split over them).
        options: what is asked of the server and how failures are waited for (:class:`~lightning_distill.options.
            Served`).
        tail: top-k targets: how the teacher's missing mass is treated, ``"bucket"`` or ``"renorm"``.
        temperature: the log-probs are of softmax(logits / temperature) (vLLM's API serves temperature 1 only).
        seed: mixed into the seed of each batch's draws (``kind="sampled"``).
    """

    needs_teacher = False

    def __init__(self, urls: str | list[str], options: Served = Served(), tail: str = "bucket",
                 temperature: float = 1.0, seed: int = 0) -> None:
        checks.require(is_url(urls), "teacher", urls, "an http:// or https:// URL of a server, or a list of them")
        checks.choice("tail", tail, TAILS)
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.options, self.tail, self.temperature, self.seed = options, tail, temperature, seed
        self.client: TeacherClient | None = None
        self._pending: OrderedDict[bytes, Future[dict[str, Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self._wrapped: tuple[Any, bool, Any] | None = None  # (data module, had its own attribute, that attribute)
        self._vocab_checked = False

    # ------------------------------------------------------------------------------------------- lifecycle
    def setup(self, run: Run, stage: str, data: Any = None) -> None:
        """Connect and check the server(s) (once); during ``fit``, prefetch through the data module's loader."""
        if self.client is None:
            client = TeacherClient(self.urls, self.options.protocol, self.options.timeout, self.options.retry_for)
            client.connect(tokenizer_fingerprint(run.tokenizer), run.tokenizer.encode(PROBE_TEXT), PROBE_TEXT,
                           self.options.k)
            if client.protocol == "openai" and (self.temperature != 1.0 or self.options.kind != "topk"):
                client.close()
                raise ValueError(f"teacher={self.urls[0]!r} speaks vLLM's completions API, which serves top-k "
                                 f"log-probs at temperature 1 only, but temperature={self.temperature} and "
                                 f"served.kind={self.options.kind!r}: set temperature=1.0 and served.kind='topk', "
                                 "or serve the teacher with lightning-distill serve")
            self.client = client
        if stage == "fit" and self.options.prefetch:
            self._wrap_loader(data)

    def teardown(self) -> None:
        """Unwrap the data module's train loader and stop the client's threads."""
        if self._wrapped is not None:
            data, had, attribute = self._wrapped
            if had:
                data.train_dataloader = attribute
            else:
                vars(data).pop("train_dataloader", None)
            self._wrapped = None
        with self._lock:
            self._pending.clear()
        if self.client is not None:
            self.client.close()
            self.client = None

    def _wrap_loader(self, data: Any) -> None:
        if self._wrapped is not None:
            return
        if data is None or not hasattr(data, "train_dataloader"):
            rank_zero_warn(f"teacher={self.urls[0]!r}: no data module to prefetch from; each batch is asked for "
                           "when its step needs it (served.prefetch=False silences this)")
            return
        original = data.train_dataloader
        self._wrapped = (data, "train_dataloader" in vars(data), vars(data).get("train_dataloader"))

        def train_dataloader() -> Any:
            loader = original()
            if not isinstance(loader, ResumableLoader):
                rank_zero_warn(f"teacher={self.urls[0]!r}: a streamed corpus' loader keeps its own position, which "
                               "drawing ahead would move; each batch is asked for when its step needs it")
                return loader
            return Lookahead(loader, self.ask_ahead)

        data.train_dataloader = train_dataloader

    # ----------------------------------------------------------------------------------------------- answers
    def ask_ahead(self, batch: Batch) -> None:
        """Send the request for ``batch``'s targets now (a background thread); its step collects the answer."""
        kind = self.options.kind
        future = self._client().submit(kind, batch["input_ids"], batch.get("attention_mask"),
                                       **self._settings(kind, batch))
        with self._lock:
            self._pending[_key(kind, batch)] = future
            while len(self._pending) > PENDING:
                self._pending.popitem(last=False)[1].cancel()

    def answer(self, kind: str, batch: Batch) -> dict[str, Tensor]:
        """The server's answer for ``batch`` (the one asked ahead, or asked now), on the CPU."""
        with self._lock:
            future = self._pending.pop(_key(kind, batch), None)
        if future is not None:
            return future.result()
        return self._client().ask(kind, batch["input_ids"], batch.get("attention_mask"), **self._settings(kind, batch))

    def distribution(self, run: Run, batch: Batch, split: str = "train") -> SparseTargets:
        """The teacher's top-k (or sampled) targets (B, T, K) of the batch, as a label store of the same settings
        would give them."""
        kind, device = self.options.kind, batch["input_ids"].device
        answer = self.answer(kind, batch)
        self._check_vocabulary(run)
        if kind == "topk":
            return SparseTargets("topk", answer["topk_ids"].to(device), answer["topk_logprobs"].to(device), self.tail)
        return SparseTargets("sampled", answer["sample_ids"].to(device), answer["sample_weights"].to(device))

    def label_records(self, batch: Batch, kind: str, **settings: Any) -> np.ndarray:
        """The batch's (B,) label store records of ``kind`` (``topk`` or ``sampled``) in the label writer's
        ``settings`` (k, num_samples, temperature, value_dtype, seed), encoded by the server as the writer would
        (``lightning-distill predict`` from a served teacher)."""
        checks.choice("kind", kind, ("topk", "sampled"))
        return self._client().records(kind, batch["input_ids"], **settings)

    def teacher_identity(self) -> dict[str, Any]:
        """The served teacher's identity, as a label store records it: the ``teacher_fingerprint`` the first
        server's ``/v1/models`` card carries (``lightning-distill serve``: the same as the teacher's files give
        here, :func:`~lightning_distill.backbone.teacher_fingerprint`); another server gives only its model id."""
        client = self.client or TeacherClient(self.urls[:1], self.options.protocol, self.options.timeout,
                                              self.options.retry_for)
        try:
            card = client._json("GET", client.urls[0], "/v1/models")["data"][0]
        finally:
            if client is not self.client:
                client.close()
        ours = card.get("lightning_distill") if isinstance(card.get("lightning_distill"), dict) else {}
        return ours.get("teacher_fingerprint") or {"name": str(card.get("id")), "config": None, "weights": None}

    def token_logprobs(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's log-prob of each next token (B, T) (on-policy ``sampled_token``: the server scores the
        student's prompt + continuation)."""
        return self.answer("tokens", batch)["token_logprobs"].to(batch["input_ids"].device)

    def picks(self, run: Run, batch: Batch, split: str = "train") -> Tensor:
        """The teacher's arg-max next token (B, T)."""
        return self.answer(self.options.kind, batch)["argmax"].to(batch["input_ids"].device)

    def validation_metrics(self, run: Run, batch: Batch, student_logits: Tensor, labels: Tensor,
                           dataloader_idx: int) -> dict[str, Tensor]:
        """``agreement`` and ``kl`` (at temperature 1) against the served targets, as against a store's."""
        answer = self.answer(self.options.kind, batch)
        stored = {name: value[:, :-1].to(student_logits.device) for name, value in answer.items()}
        return metrics.against_stored(student_logits, stored, labels, self.temperature)

    def cannot(self, question: str) -> str:
        return f"teacher={self.urls[0]!r} is served: it answers distributions, picks and token log-probs"

    # ----------------------------------------------------------------------------------------------- helpers
    def _client(self) -> TeacherClient:
        if self.client is None:
            raise RuntimeError(f"teacher={self.urls[0]!r} is not connected: the module's setup() connects it (the "
                               "Trainer calls it)")
        return self.client

    def _settings(self, kind: str, batch: Batch) -> dict[str, Any]:
        if kind == "tokens":
            return {}
        seed = (int.from_bytes(_key(kind, batch)[:6], "little") + self.seed * 1_000_003) % 2**62
        return {"k": self.options.k, "num_samples": self.options.num_samples, "temperature": self.temperature,
                "value_dtype": self.options.value_dtype, "seed": seed}

    def _check_vocabulary(self, run: Run) -> None:
        """Once: the student predicts as many ids as the served teacher (known from our server's card)."""
        vocab = self._client().vocab_size
        if self._vocab_checked or vocab is None or run.student is None:
            return
        size = int(run.student.config.vocab_size)
        if size != vocab:
            raise ValueError(f"the student predicts {size} token ids, teacher={self.urls[0]!r} {vocab}: distillation "
                             f"compares them id by id: use a student with vocab_size={vocab}")
        self._vocab_checked = True


def served_or(teacher: Any, labels: str | None, served: Served, otherwise: Callable[[], TeacherSignal],
              default: Served = Served(), tail: str = "bucket", temperature: float = 1.0) -> TeacherSignal:
    """A method's teacher signal: :class:`ServedTeacher` when ``teacher`` is a server's URL (or a list of them),
    else ``otherwise()`` (a label store or the live teacher). Refuses, naming both, ``served`` options without a
    server (anything but the method's ``default``) and a server together with ``labels``."""
    checks.require(isinstance(served, Served), "served", served, "Served(...)",
                   "write served=Served(k=32) (from lightning_distill.options)")
    if not is_url(teacher):
        if served != default:
            raise ValueError(f"served={served} sets how a teacher server is asked, but teacher={teacher!r} is not a "
                             "server's URL: leave served out, or set teacher='http://HOST:PORT'")
        return otherwise()
    if labels is not None:
        raise ValueError(f"labels={labels!r} and teacher={teacher!r} are two teacher signals: set labels=None to ask "
                         "the server, or teacher=None to train from the store")
    return ServedTeacher(teacher, served, tail, temperature)


class Lookahead:
    """A train loader iterated one batch ahead: each batch is handed to ``ahead`` as soon as it is drawn, one step
    before the step that trains on it. Length and attributes (``sampler``, ``state_dict``) are the loader's.

    Args:
        loader: the train loader.
        ahead: called with each batch when it is drawn.
    """

    def __init__(self, loader: Any, ahead: Callable[[Batch], None]) -> None:
        self.loader, self.ahead = loader, ahead

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "ahead"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        current = next(batches, None)
        if current is None:
            return
        self.ahead(current)
        for following in batches:
            self.ahead(following)  # its request travels while the caller trains on `current`
            yield current
            current = following
        yield current


def _key(kind: str, batch: Batch) -> bytes:
    """What identifies a batch's answer: the kind asked and a hash of the batch's token ids (and mask)."""
    digest = hashlib.blake2b(kind.encode(), digest_size=16)
    ids = batch["input_ids"]
    digest.update(str(tuple(ids.shape)).encode())
    digest.update(ids.detach().cpu().numpy().tobytes())
    mask = batch.get("attention_mask")
    if mask is not None:
        digest.update(mask.detach().cpu().numpy().tobytes())
    return digest.digest()
