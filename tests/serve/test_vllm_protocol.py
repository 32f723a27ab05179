"""vLLM's completions API, the subset distillation uses: the recorded exchange (vllm_completion.json, each field
traced to vLLM's source) round-trips through the client, and our server answers in the same shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fake_server import as_json, serving

from lightning_distill import Served
from lightning_distill.backbone import PROBE_TEXT, Run, load_tokenizer
from lightning_distill.serve import openai
from lightning_distill.serve.client import TeacherClient
from lightning_distill.signals import ServedTeacher

FIXTURE = json.loads((Path(__file__).parent / "vllm_completion.json").read_text())


def vllm_routes(tokenizer, seen: list) -> dict:
    """vLLM as the fixture records it; the completion route answers only the recorded request."""
    probe = tokenizer.encode(PROBE_TEXT)

    def completions(body):
        if body != FIXTURE["request"]:
            return 400, json.dumps({"detail": f"not the recorded request: {body}"}).encode()
        return 200, json.dumps(FIXTURE["response"]).encode()

    return {"seen": seen, "GET /v1/models": as_json(FIXTURE["models"]),
            "POST /tokenize": as_json({**FIXTURE["tokenize"], "count": len(probe), "tokens": probe}),
            "POST /v1/completions": completions}


def test_the_recorded_vllm_exchange_round_trips_through_the_client(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    seen: list = []
    with serving(vllm_routes(tokenizer, seen)) as url:
        signal = ServedTeacher(url, Served(k=2, value_dtype="float32"))
        run = Run(teacher=None, tokenizer=tokenizer)
        signal.setup(run, "validate")
        targets = signal.distribution(run, {"input_ids": torch.tensor(FIXTURE["request"]["prompt"])})
        signal.teardown()
    assert signal.client is None and [path for path, _ in seen] == ["GET /v1/models", "POST /tokenize",
                                                                    "POST /v1/completions"]
    expected = FIXTURE["expected"]
    assert targets.kind == "topk" and targets.ids.tolist() == expected["topk_ids"]
    # the store's encoding: log-probs rescaled to the mass the k ids hold, which stays exact
    want = torch.tensor(expected["topk_logprobs"])
    assert torch.allclose(targets.values, want, atol=1e-6)
    assert torch.allclose(targets.values.logsumexp(-1), want.logsumexp(-1), atol=1e-6)


def test_the_client_reads_the_recorded_token_log_probs():
    response, rows = FIXTURE["response"], FIXTURE["request"]["prompt"]
    ids, _, own = openai.parse(response, rows, 2, "http://vllm")
    assert ids.tolist() == FIXTURE["expected"]["topk_ids"]
    assert own.tolist() == FIXTURE["expected"]["token_logprobs"]


@pytest.mark.parametrize("broken", ["one choice", "short prompt_logprobs", "no prompt token", "not a map"])
def test_a_short_or_malformed_vllm_answer_is_refused(broken):
    response = json.loads(json.dumps(FIXTURE["response"]))
    entries = response["choices"][0]["prompt_logprobs"]
    if broken == "one choice":
        response["choices"].pop()
    elif broken == "short prompt_logprobs":
        entries.pop()
    elif broken == "no prompt token":
        del entries[2]["12"]
    else:
        entries[1] = [1, 2]
    with pytest.raises(ValueError, match=r"http://vllm.*(malformed|short|not a map)"):
        openai.parse(response, FIXTURE["request"]["prompt"], 2, "http://vllm")


def test_our_server_answers_in_vllms_shape(served_tiny_teacher):
    client = TeacherClient(served_tiny_teacher.url)
    model = client._json("GET", client.urls[0], "/v1/models")["data"][0]
    request = {**FIXTURE["request"], "model": model["id"]}
    answer = client._json("POST", client.urls[0], "/v1/completions", request)
    client.close()
    recorded = FIXTURE["response"]
    assert set(recorded) <= set(answer) and answer["object"] == "text_completion"
    assert set(answer["usage"]) == set(recorded["usage"]) and answer["usage"]["prompt_tokens"] == 8
    assert set(FIXTURE["models"]["data"][0]) <= set(model)
    for choice, prompt in zip(sorted(answer["choices"], key=lambda c: c["index"]), request["prompt"], strict=True):
        assert set(choice) == set(recorded["choices"][0])
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(prompt)
        for entry, token in zip(entries[1:], prompt[1:], strict=True):
            assert str(token) in entry and len(entry) in (2, 3)
            assert {r["rank"] for r in entry.values()} >= {1, 2}
            for value in entry.values():
                assert set(value) == {"logprob", "rank", "decoded_token"} and value["logprob"] <= 0
            assert math.isclose(sum(math.exp(v["logprob"]) for k, v in entry.items() if v["rank"] <= 2),
                                sum(sorted((math.exp(v["logprob"]) for v in entry.values()), reverse=True)[:2]))


def test_both_protocols_give_the_same_targets(served_tiny_teacher, tiny_teacher_dir):
    """Our server's JSON (vLLM's shape) and its binary answer, through the client: the same targets, bit for
    bit (the JSON log-probs are float32 values, encoded by the client as the server encodes them)."""
    tokenizer = load_tokenizer(tiny_teacher_dir)
    run = Run(teacher=None, tokenizer=tokenizer)
    batch = {"input_ids": torch.randint(3, 384, (3, 16), generator=torch.Generator().manual_seed(0))}
    answers = {}
    for protocol in ("openai", "binary"):
        signal = ServedTeacher(served_tiny_teacher.url, Served(k=8, protocol=protocol))
        signal.setup(run, "validate")
        assert signal.client.protocol == protocol
        answers[protocol] = (signal.distribution(run, batch), signal.token_logprobs(run, batch))
        signal.teardown()
    (a, a_tokens), (b, b_tokens) = answers["openai"], answers["binary"]
    assert torch.equal(a.ids[:, :-1], b.ids[:, :-1]) and torch.equal(a.values[:, :-1], b.values[:, :-1])
    assert torch.allclose(a_tokens[:, :-1], b_tokens[:, :-1], atol=1e-6)
