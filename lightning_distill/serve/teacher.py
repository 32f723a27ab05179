"""The teacher behind ``lightning-distill serve``: a LitServe worker (:class:`TeacherAPI`) that holds one frozen
teacher on its device and answers the requests :class:`~lightning_distill.serve.endpoints.Endpoints` routes to it:
the vLLM-compatible completions (:mod:`~lightning_distill.serve.openai`) and the binary top-k / sampled / token
log-prob answers (:mod:`~lightning_distill.serve.wire`).

A bad request is an HTTP 400 whose detail is the ``ValueError`` naming the field (a k above ``--max-logprobs``, an
id outside the vocabulary, a row longer than the teacher's positions); the worker goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request

from lightning_distill.backbone import as_dtype, freeze, load_model, load_tokenizer
from lightning_distill.serve import openai, wire
from lightning_distill.serve.endpoints import Endpoints


@dataclass(frozen=True)
class ServedModel:
    """What the server serves.

    Attributes:
        teacher: the teacher's name (builtin, Hugging Face id or folder).
        name: the model id clients see in ``/v1/models`` and send as ``model``.
        dtype: the teacher's weights dtype (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``).
        max_logprobs: the largest k served.
        vocab_size: the teacher's output size.
        max_model_len: the teacher's positions (``None`` when its config does not say).
        tokenizer: the tokenizer's fingerprint (:func:`lightning_distill.backbone.tokenizer_fingerprint`).
        fingerprint: the teacher's identity (:func:`lightning_distill.backbone.teacher_fingerprint`), which a label
            store written from this server records as a local teacher's.
    """

    teacher: str
    name: str
    dtype: str
    max_logprobs: int
    vocab_size: int
    max_model_len: int | None
    tokenizer: str
    fingerprint: dict[str, str] | None = None

    def card(self) -> dict[str, Any]:
        """The ``lightning_distill`` card of ``/v1/models``."""
        return {"id": self.name, "teacher": self.teacher, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "max_logprobs": self.max_logprobs, "max_model_len": self.max_model_len, "format": wire.FORMAT,
                "kinds": list(wire.KINDS), "dtype": self.dtype, "teacher_fingerprint": self.fingerprint}


class TeacherAPI(ls.LitAPI):
    """One frozen teacher on one device, answering one request at a time (a request is a whole batch of rows).

    Args:
        served: what is served.
        api_key: see :class:`~lightning_distill.serve.endpoints.Endpoints`.
    """

    def __init__(self, served: ServedModel, api_key: str | None = None) -> None:
        super().__init__(max_batch_size=1, spec=Endpoints(served.card(), api_key))
        self.served = served

    def setup(self, device: str) -> None:
        """Load the teacher (frozen, in its dtype) onto ``device`` and its tokenizer."""
        self.model = freeze(load_model(self.served.teacher, as_dtype(self.served.dtype), role="teacher")).to(device)
        self.tokenizer = load_tokenizer(self.served.teacher, role="teacher")
        self.pieces: list[str] | None = None  # each id's text, made on the first completion request

    def authorize(self, request: Request) -> None:
        self.spec.authorize(request)

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request

    @torch.no_grad()
    def predict(self, request: dict[str, Any]) -> Any:
        """A ``/v1/distill`` request's binary answer, or a ``/v1/completions`` request's JSON."""
        served = self.served
        try:
            if request["endpoint"] == "distill":
                checked = wire.check_request(request["body"], served.vocab_size, served.max_logprobs,
                                             served.max_model_len)
                return wire.answer(checked, self.logits(checked["input_ids"], checked["attention_mask"]),
                                   served.tokenizer)
            checked = openai.check_request(request["body"], served.name, served.vocab_size, served.max_logprobs,
                                           served.max_model_len)
            return self.completions(checked)
        except ValueError as error:
            raise HTTPException(400, str(error)) from None

    def encode_response(self, output: Any) -> Any:
        return output

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits (B, T, V) on the CPU, float32 (left padding: ``attention_mask`` 0 there)."""
        device = next(self.model.parameters()).device
        inputs = {"input_ids": input_ids.to(device)}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(device)
            inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
        return self.model(**inputs).logits.float().cpu()

    def completions(self, request: dict[str, Any]) -> dict[str, Any]:
        """vLLM's completion answer, one choice per prompt (prompts of different lengths run one by one)."""
        if self.pieces is None:
            self.pieces = self.tokenizer.batch_decode([[i] for i in range(self.served.vocab_size)])
        rows = request["rows"]
        generator = None if request["seed"] is None else torch.Generator().manual_seed(request["seed"])
        same = len({len(r) for r in rows}) == 1
        batched = self.logits(torch.tensor(rows)) if same else None  # (B, T, V)
        choices, generated = [], 0
        for index, row in enumerate(rows):
            logits = batched[index] if batched is not None else self.logits(torch.tensor([row]))[0]
            item, new = openai.choice(index, row, logits, request, self.pieces, generator)
            choices.append(item)
            generated += new
        return openai.response(self.served.name, choices, sum(len(r) for r in rows), generated)
