"""The subset of vLLM's OpenAI-compatible ``POST /v1/completions`` that distillation uses: token-id prompts,
``max_tokens`` 0 (with ``echo``) or 1, ``prompt_logprobs=k`` (the teacher's top-k log-probs at every prompt
position), ``temperature`` (of the one sampled token), ``echo``, ``seed``; and vLLM's answer shape, so that the same
client talks to ``vllm serve MODEL --max-logprobs K`` and to ``lightning-distill serve``.

Where each field comes from in vLLM (``vllm/entrypoints/openai/protocol.py``: ``CompletionRequest``,
``CompletionResponse``, ``CompletionResponseChoice``; ``vllm/v1/engine/logprobs.py``: how ``prompt_logprobs`` is
made; recorded field by field in ``tests/serve/vllm_completion.json``):

- ``choices[i].prompt_logprobs``: one entry per prompt token, the first ``null`` (nothing predicts it); entry t
  maps token ids (JSON keys: strings) to ``{"logprob", "rank", "decoded_token"}``: the k most likely ids at the
  position predicting prompt token t (ranks 1..k), plus that prompt token itself when it is not among them
  (then k + 1 entries). Log-probs are of the model's raw distribution (temperature 1), ``-inf`` clamped to -9999.
- ``choices`` are in prompt order (``index``); ``usage`` counts prompt and generated tokens.

Position t of a training block predicts token t + 1, so it is entry t + 1; the block's last position predicts past
the block (no loss reads it) and is filled with the position before it.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import torch
from torch import Tensor

from lightning_distill import checks

CLAMP = -9999.0  # vLLM's stand-in for a log-prob of -inf in JSON
#: request fields of vLLM's CompletionRequest this server does not serve, with the only value it takes
UNSERVED: dict[str, Any] = {"logprobs": None, "n": 1, "stream": False, "use_beam_search": False, "best_of": None,
                            "prompt_embeds": None, "suffix": None}


# ---------------------------------------------------------------------------------------------------- the server
def check_request(body: Any, model: str, vocab_size: int, max_logprobs: int,
                  max_positions: int | None) -> dict[str, Any]:
    """A completion request checked on the server (``ValueError`` naming the field: an HTTP 400)."""
    checks.require(isinstance(body, dict), "request", type(body).__name__, "a JSON object")
    name = body.get("model")
    checks.require(name in (None, model), "model", name, f"{model!r} (the served teacher) or left out")
    prompt = body.get("prompt")
    rows = [prompt] if isinstance(prompt, list) and prompt and all(isinstance(v, int) for v in prompt) else prompt
    ok = (isinstance(rows, list) and bool(rows) and all(isinstance(r, list) and r for r in rows)
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size for r in rows for v in r))
    checks.require(ok, "prompt", prompt if not isinstance(prompt, list) else f"a list of {len(prompt)}",
                   f"token ids in [0, {vocab_size}), or a list of such lists", "text prompts are not served: "
                   "tokenize them with the teacher's tokenizer")
    if max_positions is not None:
        longest = max(len(r) for r in rows)
        checks.require(longest + 1 <= max_positions, "prompt", f"{longest} tokens",
                       f"at most {max_positions - 1} tokens (the teacher's positions, one left to generate)")
    echo = body.get("echo") or False
    checks.require(isinstance(echo, bool), "echo", echo, "true or false")
    max_tokens = body.get("max_tokens", 16)
    checks.require(max_tokens in ((0, 1) if echo else (1,)) and not isinstance(max_tokens, bool), "max_tokens",
                   max_tokens, "0 (with echo) or 1", "this server scores prompts, it does not write text")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:
        checks.integer("prompt_logprobs", prompt_logprobs, f"in [0, {max_logprobs}] (this server's "
                       "--max-logprobs)", lambda v: 0 <= v <= max_logprobs)
    for field, default in UNSERVED.items():
        value = body.get(field, default)
        checks.require(value == default and type(value) is type(default), field, value,
                       f"{default!r} or left out", "this server serves prompt_logprobs only")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else checks.number("temperature", temperature, ">= 0",
                                                                lambda v: v >= 0, "1.0")
    seed = body.get("seed")
    if seed is not None:
        checks.integer("seed", seed, ">= 0", lambda v: v >= 0, "0")
    return {"rows": rows, "echo": echo, "max_tokens": max_tokens, "prompt_logprobs": prompt_logprobs,
            "temperature": temperature, "seed": seed}


@torch.no_grad()
def choice(index: int, ids: list[int], logits: Tensor, request: dict[str, Any], pieces: list[str],
           generator: torch.Generator | None) -> tuple[dict[str, Any], int]:
    """One prompt's choice from the teacher's logits (T, V) of it; and how many tokens it generated."""
    logp = torch.log_softmax(logits.float(), -1)  # (T, V)
    new: list[int] = []
    if request["max_tokens"] == 1:
        last = logp[-1]
        if request["temperature"] == 0:
            new = [int(last.argmax())]
        else:
            probs = torch.softmax(logits[-1].float() / request["temperature"], -1)
            new = [int(torch.multinomial(probs, 1, generator=generator))]
    k = request["prompt_logprobs"]
    entries = None if k is None else prompt_logprobs(ids, logp, k, pieces)
    text = "".join(pieces[i] for i in new)
    if request["echo"]:
        text = "".join(pieces[i] for i in ids) + text
    return ({"index": index, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
             "prompt_logprobs": entries}, len(new))


def prompt_logprobs(ids: list[int], logp: Tensor, k: int, pieces: list[str]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` of one prompt from its log-probs (T, V): see the module docstring."""
    top_logp, top_ids = logp[:-1].topk(k, -1) if k > 0 else (logp[:-1, :0], logp[:-1, :0].long())  # (T-1, K)
    following = torch.tensor(ids[1:]).unsqueeze(-1)  # (T-1, 1)
    own = logp[:-1].gather(-1, following)  # (T-1, 1)
    own_rank = (logp[:-1] > own).sum(-1) + 1  # (T-1,)
    entries: list[dict[str, Any] | None] = [None]
    for t, token in enumerate(ids[1:]):
        entry = {str(i): {"logprob": _clamped(v), "rank": r + 1, "decoded_token": pieces[i]}
                 for r, (i, v) in enumerate(zip(top_ids[t].tolist(), top_logp[t].tolist(), strict=True))}
        if str(token) not in entry:
            entry[str(token)] = {"logprob": _clamped(float(own[t])), "rank": int(own_rank[t]),
                                 "decoded_token": pieces[token]}
        entries.append(entry)
    return entries


def _clamped(value: float) -> float:
    return max(value, CLAMP) if not math.isnan(value) else CLAMP


def response(model: str, choices: list[dict[str, Any]], prompt_tokens: int, generated: int) -> dict[str, Any]:
    """vLLM's ``CompletionResponse`` around the choices."""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                      "completion_tokens": generated, "prompt_tokens_details": None}, "kv_transfer_params": None}


# ---------------------------------------------------------------------------------------------------- the client
def request(rows: list[list[int]], k: int, model: str | None) -> dict[str, Any]:
    """The request for the top-``k`` prompt log-probs of token-id ``rows`` (one generated token, which is unused:
    vLLM needs ``max_tokens >= 1`` without ``echo``)."""
    body: dict[str, Any] = {"prompt": rows, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
    return body if model is None else {"model": model, **body}


def parse(body: Any, rows: list[list[int]], k: int, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` ids and log-probs (B, T, K) and each next token's log-prob (B, T) of a completion answer to
    :func:`request` (every row as long as the longest, right-filled by repeating its last position; the last
    position repeats the one before it). ``ValueError`` naming ``where`` when the answer is not one."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != len(rows):
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise ValueError(f"{where} answered {got} choices for {len(rows)} prompts: a malformed answer, nothing is "
                         "trained on it")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, max(k, 1), dtype=torch.long)
    values = torch.zeros(len(rows), width, max(k, 1))
    own = torch.zeros(len(rows), width)
    for item in choices:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(rows):
            raise ValueError(f"{where} answered a choice with index {index!r}: a malformed answer")
        entries, row = item.get("prompt_logprobs"), rows[index]
        if not isinstance(entries, list) or len(entries) != len(row):
            got = len(entries) if isinstance(entries, list) else repr(entries)
            raise ValueError(f"{where} answered prompt_logprobs of {got} entries for a prompt of {len(row)} tokens "
                             "(a short answer; is the server's --max-logprobs at least k?): nothing is trained on it")
        for t in range(len(row) - 1):
            top, mine = _entry(entries[t + 1], row[t + 1], k, f"{where} (prompt {index}, position {t + 1})")
            ids[index, t], values[index, t], own[index, t] = top[0], top[1], mine
        last = max(len(row) - 2, 0)
        for tensor in (ids, values, own):
            tensor[index, len(row) - 1:] = tensor[index, last]
    return ids[..., :k], values[..., :k], own


def _entry(entry: Any, token: int, k: int, where: str) -> tuple[tuple[Tensor, Tensor], float]:
    """The top-``k`` (ids, log-probs) of one ``prompt_logprobs`` entry (by log-prob, then rank) and the prompt
    token's log-prob."""
    try:
        pairs = [(int(key), float(value["logprob"]), int(value.get("rank") or 0)) for key, value in entry.items()]
    except (AttributeError, TypeError, ValueError, KeyError):
        raise ValueError(f"{where}: {str(entry)[:80]!r} is not a map of token ids to log-probs") from None
    mine = next((lp for i, lp, _ in pairs if i == token), None)
    pairs.sort(key=lambda p: (-p[1], p[2]))
    if len(pairs) < k or mine is None or not all(math.isfinite(lp) and lp <= 1e-4 for _, lp, _ in pairs):
        raise ValueError(f"{where}: {len(pairs)} log-probs (want {k} and the prompt token's, finite and <= 0): a "
                         "short or malformed answer, nothing is trained on it")
    top = pairs[:k] if k > 0 else pairs[:1]
    return (torch.tensor([p[0] for p in top]), torch.tensor([p[1] for p in top])), mine
