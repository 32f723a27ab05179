"""The second tokenizer made here (lightning_distill.bpe): built deterministically on first use, cached, loaded by
name as a fast tokenizer whose offsets work; and real blocks aligned against other tokenizers span for span."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_builtin

from lightning_distill.alignment import Aligner
from lightning_distill.backbone import cache_dir, load_tokenizer
from lightning_distill.bpe import BUILTIN_TOKENIZERS, built_tokenizer, train_byte_level_bpe
from lightning_distill.data.sources import documents

NAME = "builtin:python-docs-bpe-4k"
TEXT = "def f(x):\n    return x ** 2  # naïve café, 東京"


def test_builtin_tokenizer_is_built_once_and_loads_by_name():
    folder = built_tokenizer(NAME)
    assert folder.parent == cache_dir() / "tokenizers" and (folder / "tokenizer.json").is_file()
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    tokenizer = load_tokenizer(NAME)
    assert built_tokenizer(NAME) == folder and (folder / "tokenizer.json").stat().st_mtime_ns == stamp  # cached
    assert tokenizer.is_fast and len(tokenizer) == BUILTIN_TOKENIZERS[NAME].vocab_size == 4096
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    encoded = tokenizer(TEXT, return_offsets_mapping=True)
    assert tokenizer.decode(encoded["input_ids"]) == TEXT
    ends = [end for _, end in encoded["offset_mapping"]]
    assert ends == sorted(ends) and ends[-1] == len(TEXT)  # offsets follow the text to its end


def test_training_is_deterministic():
    texts = documents("builtin:python-docs")[:10]
    first, second = (train_byte_level_bpe(texts, 600).backend_tokenizer.to_str() for _ in range(2))
    assert first == second
    assert train_byte_level_bpe(texts[:5], 600).backend_tokenizer.to_str() != first  # other text, other merges


def span_bytes(aligner: Aligner, ids: list[int], teacher_ids: list[int], span: tuple[int, int, int, int]):
    s0, s1, t0, t1 = span
    student = [aligner.student.pieces[i] or b"<special>" for i in ids[s0:s1]]
    teacher = [aligner.teacher.pieces[i] or b"<special>" for i in teacher_ids[t0:t1]]
    return b"".join(student), b"".join(teacher)


def check_real_blocks(student, teacher, block_size: int = 64) -> None:
    """Every span of packed python-docs blocks spells the same bytes on both sides, and the spans cover the block
    but for cut characters at its edges."""
    aligner = Aligner(student, teacher)
    ids: list[int] = []
    for text in ["東京 café naïve — ok, 東京", *documents("builtin:python-docs")[:3]]:
        ids += student(text[:2000], add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    for start in range(0, len(ids) - block_size, 31):  # edges inside 東 and é too
        block = ids[start : start + block_size]
        found = aligner.block(block)
        for span in found.spans:
            mine, theirs = span_bytes(aligner, block, found.teacher_ids, span)
            assert mine == theirs, (span, mine, theirs)
        covered = sum(s1 - s0 for s0, s1, _, _ in found.spans)
        assert block_size - 6 <= covered <= block_size
        assert [t for _, _, t0, t1 in found.spans for t in range(t0, t1)] == list(range(len(found.teacher_ids)))


def test_real_blocks_align_span_for_span(tiny_teacher_dir):
    check_real_blocks(load_tokenizer(NAME), load_tokenizer(tiny_teacher_dir))


@requires_builtin
def test_real_blocks_align_with_the_embedded_teacher():
    check_real_blocks(load_tokenizer(NAME), load_tokenizer("builtin:smollm2-135m-instruct"))
    teacher_ids, spans = Aligner(load_tokenizer(NAME), load_tokenizer("builtin:smollm2-135m-instruct")).batch(
        torch.tensor([load_tokenizer(NAME)(TEXT)["input_ids"]]))
    assert len(spans) > 0 and teacher_ids.shape[1] == spans[:, 4].max()


def test_an_unknown_builtin_names_the_tokenizers():
    with pytest.raises(ValueError, match=r"unknown builtin model.*tokenizers \['builtin:python-docs-bpe-4k'\]"):
        load_tokenizer("builtin:nope")
