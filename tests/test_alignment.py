"""Cross-tokenizer alignment on hand-made tokenizers whose tokens, and so the right spans, are known: merges on
both sides, shared and unshared tokens, byte fallback, block and document boundaries."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_distill.alignment import Aligner, TokenPieces, byte_level_alphabet, piece_bytes, walk

TEXT = "default 東"


def spelled(text: str) -> str:
    """``text`` in the byte-level alphabet (how a byte-level vocabulary writes it)."""
    to_char = {byte: char for char, byte in byte_level_alphabet().items()}
    return "".join(to_char[b] for b in text.encode())


def byte_level(merges: list[tuple[str, str]], eos: str = "<eos>") -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly these merges (in rank order) over the 256 bytes, and an EOS token."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=eos, pad_token=eos)


def byte_fallback(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (``▁`` for spaces, no dummy prefix) over a few letters, every other character
    spelled in byte tokens ``<0xNN>``."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for c in "▁abdeflnotu":
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    model.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def student() -> PreTrainedTokenizerFast:
    """'default' -> def | au | lt; ' 東' -> Ġ and three byte tokens."""
    return byte_level([("d", "e"), ("de", "f"), ("a", "u"), ("l", "t")])


@pytest.fixture(scope="module")
def teacher() -> PreTrainedTokenizerFast:
    """'default' -> d | ef | ault; ' 東' -> Ġ | 東."""
    c1, c2, c3 = spelled("東")
    return byte_level([("e", "f"), ("a", "u"), ("au", "l"), ("aul", "t"), (c1, c2), (c1 + c2, c3)], eos="<|im_end|>")


def tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_hand_made_tokenizers_split_as_designed(student, teacher):
    assert tokens(student, TEXT) == ["def", "au", "lt", "Ġ", *spelled("東")]
    assert tokens(teacher, TEXT) == ["d", "ef", "ault", "Ġ", spelled("東")]


def test_walk_closes_a_span_where_both_sides_end_a_token():
    assert walk([3, 5, 7, 8, 9, 10, 11], [1, 3, 7, 8, 11]) == [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4), (4, 7, 4, 5)]
    assert walk([2, 4], [2, 4]) == [(0, 1, 0, 1), (1, 2, 1, 2)]  # one-to-one
    assert walk([], []) == []
    with pytest.raises(ValueError, match=r"cover \[4\] and \[5\] bytes"):
        walk([4], [5])


def test_merges_on_both_sides_and_byte_tokens(student, teacher):
    aligner = Aligner(student, teacher)
    ids = student(TEXT, add_special_tokens=False)["input_ids"]
    found = aligner.block(ids)
    assert found.teacher_ids == teacher(TEXT, add_special_tokens=False)["input_ids"]
    # def | d+ef ; au+lt | ault ; Ġ | Ġ ; three byte tokens | 東
    assert found.spans == [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4), (4, 7, 4, 5)]


def test_shared_tokens_are_those_with_the_same_text(student, teacher):
    aligner = Aligner(student, teacher)
    pairs = {(teacher.convert_ids_to_tokens(t), student.convert_ids_to_tokens(s)) for t, s in aligner.shared().tolist()}
    assert ("au", "au") in pairs and ("d", "d") in pairs and ("<|im_end|>", "<eos>") in pairs  # EOS answers EOS
    assert not {"def", "lt"} & {s for _, s in pairs} and not {"ef", "ault"} & {t for t, _ in pairs}
    assert len(pairs) == 256 + 1 + 1  # the bytes, "au", EOS


def test_a_character_one_side_spells_in_byte_fallback_tokens():
    """A SentencePiece-style teacher spells 東 as <0xE6> <0x9D> <0xB1>; a byte-level student holds it whole."""
    c1, c2, c3 = spelled("東")
    student = byte_level([(c1, c2), (c1 + c2, c3), ("d", "e"), ("de", "f")])
    teacher = byte_fallback([("d", "e"), ("a", "u"), ("au", "l"), ("aul", "t")])
    assert tokens(teacher, TEXT) == ["de", "f", "ault", "▁", "<0xE6>", "<0x9D>", "<0xB1>"]
    assert tokens(student, TEXT) == ["def", "a", "u", "l", "t", "Ġ", spelled("東")]
    aligner = Aligner(student, teacher)
    found = aligner.block(student(TEXT, add_special_tokens=False)["input_ids"])
    assert found.spans == [(0, 1, 0, 2), (1, 5, 2, 3), (5, 6, 3, 4), (6, 7, 4, 7)]
    pieces = TokenPieces(teacher, "teacher tokenizer")
    assert not pieces.byte_level and pieces.pieces[0xE6] == b"\xe6" and pieces.pieces[teacher.convert_tokens_to_ids(
        "▁")] == b" "


def test_pieces_of_both_spellings():
    assert piece_bytes("<0xE6>", byte_level=False) == b"\xe6"
    assert piece_bytes("▁default", byte_level=False) == b" default"
    assert piece_bytes(spelled(" 東"), byte_level=True) == " 東".encode()


def test_a_document_boundary_inside_a_block(student, teacher):
    """The teacher reads each document on its own and answers the student's EOS with its own."""
    aligner = Aligner(student, teacher)
    ids = student("default", add_special_tokens=False)["input_ids"]
    found = aligner.block([*ids, student.eos_token_id, *ids])
    alone = teacher("default", add_special_tokens=False)["input_ids"]
    assert found.teacher_ids == [*alone, teacher.eos_token_id, *alone]
    assert found.spans == [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4), (4, 5, 4, 6), (5, 7, 6, 7)]


def test_a_block_edge_inside_a_character_is_left_out(student, teacher):
    """A block may end (or start) inside a character: those bytes have no span, and the teacher reads only the
    whole characters of its block, never past it."""
    aligner = Aligner(student, teacher)
    ids = student(TEXT + " default", add_special_tokens=False)["input_ids"]  # def au lt Ġ b1 b2 b3 Ġ def au lt
    end = aligner.block(ids[:6])  # ... Ġ and two bytes of 東
    assert end.teacher_ids == teacher("default ", add_special_tokens=False)["input_ids"]
    assert end.spans == [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4)]
    start = aligner.block(ids[5:])  # the last two bytes of 東, then " default"
    assert start.teacher_ids == teacher(" default", add_special_tokens=False)["input_ids"]
    assert start.spans[0] == (2, 3, 0, 1)  # the Ġ, right after the left-out bytes
    assert aligner.block(ids[5:7]) == type(start)([], [])  # nothing whole: no teacher token


def test_batch_pads_the_teacher_and_keeps_the_predicted_spans(student, teacher):
    aligner = Aligner(student, teacher)
    ids = student(TEXT + " default", add_special_tokens=False)["input_ids"]
    teacher_ids, spans = aligner.batch(torch.tensor([ids[:8], ids[3:11]]))
    assert teacher_ids.shape == (2, max(len(aligner.block(ids[:8]).teacher_ids), len(aligner.block(ids[3:11])
                                                                                      .teacher_ids)))
    assert (spans[:, 1] >= 1).all() and (spans[:, 3] >= 1).all()  # a block's first token has no prediction
    assert spans[spans[:, 0] == 0].tolist() == [[0, *s] for s in aligner.block(ids[:8]).spans[1:]]
    assert teacher_ids[0, len(aligner.block(ids[:8]).teacher_ids):].eq(teacher.eos_token_id).all()


def test_a_tokenizer_that_does_not_spell_its_text_is_refused(student):
    sentencepiece_like = byte_fallback([])
    sentencepiece_like.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    aligner = Aligner(student, sentencepiece_like)
    with pytest.raises(ValueError, match=r"does not spell 'default' with its tokens' bytes"):
        aligner.block(student("default", add_special_tokens=False)["input_ids"])
