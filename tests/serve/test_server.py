"""``lightning-distill serve`` and its client: the model card, the API key, bad requests, wrong tokenizers, short
and malformed answers, retries and several servers."""

from __future__ import annotations

import json
import time
from unittest import mock

import pytest
import serving
import torch
from fake_server import as_json
from fake_server import serving as fake_serving

from lightning_distill import Served, SoftDistill
from lightning_distill.backbone import Run, load_tokenizer, tokenizer_fingerprint
from lightning_distill.cli import main
from lightning_distill.serve import wire
from lightning_distill.serve.client import ServerUnavailableError, TeacherClient
from lightning_distill.serve.command import parser
from lightning_distill.signals import ServedTeacher


def connected(url: str, tokenizer, **options) -> tuple[ServedTeacher, Run]:
    signal, run = ServedTeacher(url, Served(**options)), Run(teacher=None, tokenizer=tokenizer)
    signal.setup(run, "validate")
    return signal, run


def test_the_model_card_names_the_tokenizer(served_tiny_teacher, tiny_teacher_dir):
    status, body = serving.get(f"{served_tiny_teacher.url}/v1/models", served_tiny_teacher.api_key)
    card = json.loads(body)["data"][0]["lightning_distill"]
    assert status == 200 and card["tokenizer"] == tokenizer_fingerprint(load_tokenizer(tiny_teacher_dir))
    assert card["vocab_size"] == 384 and card["max_logprobs"] == 64 and card["format"] == wire.FORMAT


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_request_without_the_api_key_gets_401(served_tiny_teacher, tiny_teacher_dir, monkeypatch, key):
    for path in ("/v1/models", "/health"):
        status, body = serving.get(f"{served_tiny_teacher.url}{path}", key)
        assert status == 401 and b"Bearer" in body
    if key is None:
        monkeypatch.delenv("LIGHTNING_DISTILL_API_KEY")
    else:
        monkeypatch.setenv("LIGHTNING_DISTILL_API_KEY", key)
    with pytest.raises(ValueError, match=r"/v1/models refused the request \(HTTP 401\).*LIGHTNING_DISTILL_API_KEY"):
        connected(served_tiny_teacher.url, load_tokenizer(tiny_teacher_dir))


def test_a_bad_request_is_a_400_that_says_why(served_tiny_teacher, tiny_teacher_dir):
    client = TeacherClient(served_tiny_teacher.url)
    for body, why in (({"input_ids": [[1, 2, 999]]}, r"input_ids must be integers in \[0, 384\)"),
                      ({"input_ids": [[1, 2]], "k": 65}, r"k must be an integer in \[1, 64\]"),
                      ({"input_ids": [[1, 2], [3]]}, "input_ids must be a non-empty list of equally long")):
        with pytest.raises(ValueError, match=rf"/v1/distill refused the request \(HTTP 400\): {why}"):
            client._post(0, "/v1/distill", json.dumps(body).encode())
    with pytest.raises(ValueError, match=r"\(HTTP 400\): prompt must be token ids.*text prompts are not served"):
        client._json("POST", client.urls[0], "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
    client.close()
    with pytest.raises(ValueError, match=r"served.k must be at most http://127.0.0.1:\d+'s --max-logprobs 64, got 65"):
        connected(served_tiny_teacher.url, load_tokenizer(tiny_teacher_dir), k=65)


def test_a_teacher_with_another_tokenizer_is_refused_before_any_work(served_tiny_teacher, tiny_teacher_dir,
                                                                   tmp_path):
    other = load_tokenizer(tiny_teacher_dir)
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "other")
    student = {"config": {"vocab_size": 385, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2}}
    model = SoftDistill(teacher=served_tiny_teacher.url, tokenizer=str(tmp_path / "other"), student=student)
    with pytest.raises(ValueError, match=rf"serves .* with tokenizer fingerprint "
                                         rf"{tokenizer_fingerprint(load_tokenizer(tiny_teacher_dir))}, this run's "
                                         rf"tokenizer has {tokenizer_fingerprint(other)}"):
        model.setup("fit")
    assert model.student is None  # nothing was built, nothing trained


def test_several_urls_split_the_rows_and_answer_as_one(served_tiny_teacher, tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    batch = {"input_ids": torch.randint(3, 384, (5, 12), generator=torch.Generator().manual_seed(1))}
    one, run = connected(served_tiny_teacher.url, tokenizer, k=4)
    two, _ = connected([served_tiny_teacher.url, f"{served_tiny_teacher.url}/v1"], tokenizer, k=4)
    a, b = one.distribution(run, batch), two.distribution(run, batch)
    assert torch.equal(a.ids, b.ids) and torch.allclose(a.values, b.values, atol=1e-6)
    assert len(two.client.urls) == 2
    one.teardown(), two.teardown()


OURS = {"object": "list", "data": [{"id": "t", "lightning_distill": {"format": wire.FORMAT, "max_logprobs": 8,
                                                                     "vocab_size": 384, "teacher": "t"}}]}


def broken_server(tokenizer, answer: bytes):
    card = json.loads(json.dumps(OURS))
    card["data"][0]["lightning_distill"]["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return fake_serving({"GET /v1/models": as_json(card), "POST /v1/distill": lambda body: (200, answer)})


def good_answer(rows: int = 2, positions: int = 4, k: int = 2, fingerprint: str = "x") -> bytes:
    request = wire.check_request({"input_ids": [[1] * positions] * rows, "k": k}, 384, 8, None)
    return wire.answer(request, torch.randn(rows, positions, 384), fingerprint)


@pytest.mark.parametrize("broken", ["cut short", "not ours", "ids outside the vocabulary", "fewer rows"])
def test_a_short_or_malformed_answer_is_an_error_and_nothing_is_trained(tiny_teacher_dir, broken):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    answer = good_answer(fingerprint=tokenizer_fingerprint(tokenizer))
    if broken == "cut short":
        answer, why = answer[:-7], "answered .* bytes of records, .* are .*: a short or malformed answer"
    elif broken == "not ours":
        answer, why = b"<html>gateway</html>", "not a lightning_distill answer"
    elif broken == "ids outside the vocabulary":
        header, records = wire.unpack(answer, "x")
        records = records.copy()
        records["ids"][0, 0, 0] = 999
        answer, why = wire.pack({**header, "vocab_size": 384}, records), r"topk_ids outside \[0, 384\)"
    else:
        answer, why = good_answer(rows=1, fingerprint=tokenizer_fingerprint(tokenizer)), "1 'topk' records for 2"
    with broken_server(tokenizer, answer) as url:
        signal, run = connected(url, tokenizer, k=2)
        with pytest.raises(ValueError, match=why):
            signal.distribution(run, {"input_ids": torch.ones(2, 4, dtype=torch.long)})
        signal.teardown()


def test_an_unavailable_server_is_retried_then_named(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    calls = []

    def flaky(body):
        calls.append(time.monotonic())
        return (503, b"busy") if len(calls) < 3 else (200, good_answer(fingerprint=tokenizer_fingerprint(tokenizer)))

    card = json.loads(json.dumps(OURS))
    card["data"][0]["lightning_distill"]["tokenizer"] = tokenizer_fingerprint(tokenizer)
    with fake_serving({"GET /v1/models": as_json(card), "POST /v1/distill": flaky}) as url:
        signal, run = connected(url, tokenizer, k=2, retry_for=5.0)
        assert signal.distribution(run, {"input_ids": torch.ones(2, 4, dtype=torch.long)}).ids.shape == (2, 4, 2)
        signal.teardown()
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.7  # backoff 0.25 s, then 0.5 s
    gone = f"http://127.0.0.1:{serving.free_port()}"
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=rf"{gone}/v1/models: .* \(served.retry_for=1.0\). Is the "
                                                     "server running"):
        connected(gone, tokenizer, retry_for=1.0)
    assert time.monotonic() - start < 5


def test_the_serve_command_checks_its_arguments(monkeypatch, capsys):
    for argv, why in ((["--port", "80"], r"--port must be an integer in \[1024, 65535\], got 80"),
                      (["--host", "example.com"], "--host must be one of '127.0.0.1', '0.0.0.0', '::'"),
                      (["--max-logprobs", "0"], "--max-logprobs must be an integer >= 1, got 0"),
                      (["--dtype", "float8"], "--dtype must be one of 'auto', 'bfloat16'")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *argv])
        assert exit_.value.code == 2 and why.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    with mock.patch("importlib.util.find_spec", return_value=None), pytest.raises(SystemExit):
        main(["serve", "--teacher", "x"])
    assert "pip install 'lightning-distill[serve]'" in capsys.readouterr().err
    assert parser().parse_args([]).host == "127.0.0.1"  # this machine only, unless told otherwise
