"""write_corpus: the teacher writes requests then answers them, one JSONL line each; an interrupted file resumes into
the documents of an uninterrupted run; other settings, a teacher without a chat template and bad arguments are
refused naming the fix; the CLI command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_distill.backbone import load_tokenizer
from lightning_distill.cli import main as cli_main
from lightning_distill.data import documents
from lightning_distill.data.writing import WritingSettings, write_corpus

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_teacher(tiny_teacher_dir, tmp_path_factory) -> str:
    """The tiny teacher with a chat template (a chat model, as write_corpus needs)."""
    folder = tmp_path_factory.mktemp("tiny_chat_teacher")
    shutil.copytree(tiny_teacher_dir, folder, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def settings(teacher: str, **overrides) -> WritingSettings:
    return WritingSettings(**{"teacher": teacher, "batch_size": 2, "request_tokens": 6, "max_new_tokens": 8,
                              **overrides})


def lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_teacher_writes_requests_and_answers(chat_teacher, tmp_path):
    out = write_corpus(tmp_path / "w" / "writing.jsonl", 5, settings(chat_teacher), progress=False)
    written = lines(out)
    assert len(written) == 5 and all(set(d) == {"request", "text"} for d in written)
    assert len({d["request"] for d in written}) > 1  # sampled, not one request five times
    assert documents(str(out)) == [d["text"] for d in written if d["text"].strip()]  # a corpus as it is
    saved = json.loads((tmp_path / "w" / "writing.jsonl.settings.json").read_text())
    assert saved == {**saved, "teacher": chat_teacher, "batch_size": 2, "max_new_tokens": 8, "seed": 0}
    assert write_corpus(out, 5, settings(chat_teacher), progress=False) == out and lines(out) == written  # done


def test_an_interrupted_file_resumes_into_the_uninterrupted_documents(chat_teacher, tmp_path):
    whole = lines(write_corpus(tmp_path / "whole.jsonl", 6, settings(chat_teacher), progress=False))
    part = write_corpus(tmp_path / "part.jsonl", 3, settings(chat_teacher), progress=False)  # its 2nd batch: 1 row
    with part.open("a", encoding="utf-8") as file:
        file.write('{"request": "cut sho')  # a line an interruption cut short
    assert lines(write_corpus(part, 6, settings(chat_teacher), progress=False)) == whole
    other_seed = lines(write_corpus(tmp_path / "seed1.jsonl", 6, settings(chat_teacher, seed=1), progress=False))
    assert other_seed != whole


def test_refusals_name_the_fix(chat_teacher, tiny_teacher_dir, tmp_path):
    out = write_corpus(tmp_path / "w.jsonl", 2, settings(chat_teacher), progress=False)
    with pytest.raises(ValueError, match=r"out='.*w\.jsonl' holds documents written with other settings.*another out"):
        write_corpus(out, 4, settings(chat_teacher, max_new_tokens=9), progress=False)
    with pytest.raises(ValueError, match=r"teacher must be a chat model.*use an instruct/chat model"):
        write_corpus(tmp_path / "plain.jsonl", 2, settings(tiny_teacher_dir), progress=False)
    assert not list(tmp_path.glob("plain*"))  # nothing left behind
    with pytest.raises(ValueError, match=r"documents must be an integer >= 1, got 0, e\.g\. documents=144"):
        write_corpus(tmp_path / "none.jsonl", 0, settings(chat_teacher))
    for bad in ({"batch_size": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"seed": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            settings(chat_teacher, **bad)


def test_the_write_command(chat_teacher, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    cli_main(["write", "--documents", "3", "--out", str(out), "--teacher", chat_teacher, "--batch-size", "2",
              "--request-tokens", "4", "--max-new-tokens", "4"])
    assert len(lines(out)) == 3 and f"corpus=[..., {str(out)!r}]" in capsys.readouterr().out
