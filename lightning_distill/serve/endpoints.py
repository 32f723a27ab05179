"""The HTTP face of ``lightning-distill serve``: a LitServe spec (:class:`Endpoints`) that routes three endpoints to
the one teacher worker (:class:`~lightning_distill.serve.teacher.TeacherAPI`), so the teacher is loaded once per
device whatever the endpoint:

- ``GET /v1/models``: vLLM's model list, with a ``lightning_distill`` card (tokenizer fingerprint, vocabulary,
  ``max_logprobs``, wire format), answered without the worker;
- ``POST /v1/completions``: the vLLM subset of :mod:`lightning_distill.serve.openai` (JSON);
- ``POST /v1/distill``: the compact binary answer of :mod:`lightning_distill.serve.wire`.

Every endpoint (LitServe's ``/health`` too) asks :meth:`Endpoints.authorize` first: with ``--api-key``, a request
without ``Authorization: Bearer KEY`` gets 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import secrets
import time
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

QUEUE_PATH = "/v1/distill"  # the worker's request queue is keyed by this path


class Endpoints(LitSpec):
    """The three endpoints, feeding the teacher worker's request queue.

    Args:
        card: the ``lightning_distill`` part of ``/v1/models`` (``id``, ``tokenizer``, ``vocab_size``,
            ``max_logprobs``, ``max_model_len``, ``format``).
        api_key: the key every request must bring as ``Authorization: Bearer KEY``; ``None``: no key.
    """

    def __init__(self, card: dict[str, Any], api_key: str | None = None) -> None:
        super().__init__()
        self.card, self.api_key = card, api_key
        self.api_path = QUEUE_PATH
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/distill", self.distill, ["POST"])

    def authorize(self, request: Request) -> None:
        """FastAPI dependency of every endpoint: 401 unless the request brings the key."""
        if self.api_key is None:
            return
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise HTTPException(401, "unauthorized: send the server's --api-key as 'Authorization: Bearer KEY'")

    async def models(self, request: Request) -> JSONResponse:
        """vLLM's ``ModelList`` of the one served teacher."""
        card = {"id": self.card["id"], "object": "model", "created": int(time.time()), "owned_by": "lightning_distill",
                "root": self.card["teacher"], "parent": None, "max_model_len": self.card["max_model_len"],
                "permission": [], "lightning_distill": self.card}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._ask("completions", await _json(request)))

    async def distill(self, request: Request) -> Response:
        answer = await self._ask("distill", await _json(request))
        return Response(answer, media_type="application/octet-stream")

    async def _ask(self, endpoint: str, body: Any) -> Any:
        """Put the request on the worker's queue and wait for its answer; the worker's ``HTTPException`` (a bad
        request: 400 with the reason) passes through."""
        uid, event = secrets.token_hex(16), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(),
                                       {"endpoint": endpoint, "body": body}))
        await event.wait()
        answer, status = self.response_buffer.pop(uid).response
        if status != LitAPIStatus.ERROR:
            return answer
        if isinstance(answer, bytes):  # an unexpected error, pickled by the worker
            with contextlib.suppress(Exception):
                answer = pickle.loads(answer)
        raise answer if isinstance(answer, HTTPException) else HTTPException(500, f"the teacher failed: {answer!r}")

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as error:
        raise HTTPException(400, f"the request body is not JSON ({error})") from None
