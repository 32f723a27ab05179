"""prepare_corpus: every source read, documents split by a seeded hash, tokenized once with an EOS after each, the same
token stream from 1 or 2 workers, a manifest with checksums, idempotent reruns, argument checks, the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import prepared_corpus, requires_litdata, write_jsonl_corpus

from lightning_distill.backbone import load_tokenizer
from lightning_distill.data import documents, prepare, prepare_corpus, units

pytestmark = requires_litdata


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    return load_tokenizer(tiny_teacher_dir)


def stream(path: str, split: str) -> np.ndarray:
    """A split's whole token stream, read back through litdata (blocks of one token)."""
    from lightning_distill.data.streaming import StreamedCorpus

    blocks = StreamedCorpus(path).blocks(split, block_size=1)
    return np.array([int(blocks[i][0]) for i in range(len(blocks))])


def expected_stream(tok, source: str, split: str) -> list[int]:
    """The documents of a JSONL file that hash to ``split``, tokenized, EOS after each, in file order."""
    ids, offset = [], 0
    with open(source, "rb") as lines:
        for line in lines:
            if prepare.split_of(0, offset, 0.1, 0) == split:
                ids += [*tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
            offset += len(line)
    return ids


def test_prepare_writes_both_splits_with_a_manifest(tok, tiny_teacher_dir, tmp_path):
    path = prepared_corpus(tmp_path, tiny_teacher_dir)
    manifest = json.loads((tmp_path / "prepared" / "corpus.json").read_text())
    assert manifest["complete"] and manifest["format"] == prepare.FORMAT and manifest["dtype"] == "uint16"
    assert manifest["eos_id"] == tok.eos_token_id and manifest["val_fraction"] == 0.1
    source = str(tmp_path / "source.jsonl")
    for split in ("train", "validation"):
        chunks = manifest["splits"][split]["chunks"]
        assert len(chunks) > 1 and all(c["tokens"] <= 512 for c in chunks)  # several chunks of at most chunk_tokens
        assert stream(path, split).tolist() == expected_stream(tok, source, split)
    assert 0 < len(stream(path, "validation")) < len(stream(path, "train")) / 3


def test_two_workers_write_the_same_stream(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 2000)  # several work units to share out
    one = prepared_corpus(tmp_path / "one", tiny_teacher_dir, num_workers=1)
    two = prepared_corpus(tmp_path / "two", tiny_teacher_dir, num_workers=2)
    files = {p: json.loads((tmp_path / p / "prepared" / "corpus.json").read_text()) for p in ("one", "two")}
    assert {c["file"].split("-")[1] for c in files["two"]["splits"]["train"]["chunks"]} == {"0", "1"}  # both worked
    for split in ("train", "validation"):
        assert np.array_equal(stream(one, split), stream(two, split))


def test_every_kind_of_source_is_read(tok, tiny_teacher_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 20)
    (tmp_path / "b.txt").write_text("delta epsilon " * 30)
    datasets.Dataset.from_dict({"text": [f"row {i} of the dataset " * 5 for i in range(30)]}).save_to_disk(
        str(tmp_path / "hf"))
    corpus = [str(tmp_path / "*.txt"), write_jsonl_corpus(tmp_path / "c.jsonl", docs=20), str(tmp_path / "hf"),
              "builtin:shakespeare"]
    path = prepare_corpus(corpus, str(tmp_path / "out"), tok, block_size=16, chunk_tokens=1024)
    total = sum(len(stream(path, split)) for split in ("train", "validation"))
    assert total == sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents(corpus))


def test_a_prepared_folder_is_reused_refused_or_redone(tiny_teacher_dir, tmp_path, monkeypatch):
    path = prepared_corpus(tmp_path, tiny_teacher_dir)
    manifest = (tmp_path / "prepared" / "corpus.json").read_text()
    with monkeypatch.context() as m:
        m.setattr("litdata.optimize", lambda *a, **k: pytest.fail("prepared again"))
        assert prepared_corpus(tmp_path, tiny_teacher_dir, num_workers=2) == path  # same settings: reused
    with pytest.raises(FileExistsError, match="val_fraction differ"):
        prepared_corpus(tmp_path, tiny_teacher_dir, val_fraction=0.2)
    prepared_corpus(tmp_path, tiny_teacher_dir, val_fraction=0.2, overwrite=True)
    assert json.loads((tmp_path / "prepared" / "corpus.json").read_text())["val_fraction"] == 0.2
    (tmp_path / "prepared" / "corpus.json").unlink()  # as an interrupted preparation leaves it
    prepared_corpus(tmp_path, tiny_teacher_dir)
    assert (tmp_path / "prepared" / "corpus.json").read_text() == manifest


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_workers": 0}, "num_workers"), ({"block_size": 1}, "block_size"), ({"chunk_tokens": 8}, "chunk_tokens"),
    ({"val_fraction": 1}, "val_fraction"), ({"out_dir": "s3://bucket/x"}, "out_dir")])
def test_bad_arguments_raise_naming_them(tok, tmp_path, kwargs, name):
    settings = {"corpus": "builtin:shakespeare", "out_dir": str(tmp_path / "x"), "tokenizer": tok, "block_size": 16,
                **kwargs}
    with pytest.raises(ValueError, match=name):
        prepare_corpus(**settings)


def test_too_little_validation_text_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match=r"validation split .* fewer than block_size"):
        prepare_corpus("builtin:shakespeare", str(tmp_path / "x"), tok, block_size=16, chunk_tokens=1024)


def test_missing_litdata_says_how_to_install(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-distill\[scale\]'"):
        prepare_corpus("builtin:python-docs", str(tmp_path / "x"), tok, block_size=16)


def test_prepare_command(tiny_teacher_dir, tmp_path, capsys):
    from lightning_distill.cli import main

    source = write_jsonl_corpus(tmp_path / "c.jsonl")
    main(["prepare", "--corpus", source, "--out", str(tmp_path / "out"), "--tokenizer", tiny_teacher_dir,
          "--block-size", "16", "--chunk-tokens", "512", "--num-workers", "1"])
    assert "DistillDataModule(corpus=" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "corpus.json").read_text())["chunk_tokens"] == 512
