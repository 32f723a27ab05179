"""Cross-tokenizer alignment: the student's and the teacher's tokenizations of the same block mapped onto the same
text spans, and the tokens both vocabularies share.

Two tokenizers cut the same text at different places ("def" and "ault" against "default"). Both are placed on the
block's UTF-8 bytes; walking the two sequences side by side, advancing the one whose current token ends first, a
*span* closes wherever both end at the same byte (the walk of TRL's GOLD, ``ULDLoss._align_by_byte_offsets``). A
span is a run of student tokens ``[s0, s1)`` and a run of teacher tokens ``[t0, t1)`` covering the same bytes: one
token on each side (the common case), or several on one side or both, a character that one side spells in byte
tokens (byte fallback) included. The losses (:mod:`lightning_distill.losses.cross_tokenizer`) compare the two
models' probabilities of each span.

A block's text is what the student's ids spell: each id stands for its bytes (:class:`TokenPieces`). The block is
cut at its special tokens (the end-of-text token between packed documents), each document piece is decoded and
tokenized by the teacher on its own, and a student special token is answered by the teacher's counterpart (EOS for
EOS): so the teacher never reads past its block, nor across a document boundary. The block's edges may cut a
character (a student token may hold half of one): those bytes, and the student tokens holding them, are left out,
with no teacher span. Teacher byte positions come from its own tokens' bytes and are checked against the offsets
its fast tokenizer gives (``return_offsets_mapping``); a tokenizer whose tokens do not spell the text (a
normalizer, SentencePiece's dummy prefix) is refused with its name.

No Lightning here; one block is pure Python, :meth:`Aligner.batch` gives the tensors the losses take.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

Span = tuple[int, int, int, int]  #: student tokens [s0, s1), teacher tokens [t0, t1) covering the same bytes
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte-fallback tokens


@cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: how byte-level BPE vocabularies (GPT-2, Llama 3, Qwen,
    SmolLM) write each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def piece_bytes(token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for: byte-level (each character is a byte), or SentencePiece-style
    (``▁`` is a space, ``<0xE6>`` the byte 0xE6: byte fallback)."""
    if byte_level:
        alphabet = byte_level_alphabet()
        if all(c in alphabet for c in token):
            return bytes(alphabet[c] for c in token)
        return token.encode()
    found = BYTE_TOKEN.match(token)
    return bytes([int(found[1], 16)]) if found else token.replace("▁", " ").encode()


class TokenPieces:
    """What each id of a tokenizer stands for: its bytes, or ``None`` for a special token (EOS, padding).

    Args:
        tokenizer: a fast (``tokenizers``-backed) tokenizer.
        role: how errors name it (``"student tokenizer"``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, role: str) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"the {role} ({tokenizer.name_or_path!r}) is not a fast tokenizer: cross-tokenizer "
                             "alignment needs its offsets (return_offsets_mapping); load its tokenizer.json")
        self.role, self.tokenizer = role, tokenizer
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        vocab = tokenizer.get_vocab()  # token string -> id
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
        self.pieces: list[bytes | None] = [None] * (max(vocab.values()) + 1)
        self.names: dict[int, str] = {}  # special id -> its string
        for token, i in vocab.items():
            if i in special:
                self.names[i] = token
            else:
                self.pieces[i] = piece_bytes(token, self.byte_level)
        self.eos = tokenizer.eos_token_id

    def is_special(self, token: int) -> bool:
        return token >= len(self.pieces) or self.pieces[token] is None

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of ``text`` and the byte where each token ends (token k covers ``[ends[k-1], ends[k])``).

        Raises:
            ValueError: the tokens do not spell the text's bytes, or disagree with the tokenizer's own offsets.
        """
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=True)  # "<|im_end|>" in the text is text
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        data = text.encode()
        pieces = [self.pieces[i] if not self.is_special(i) else None for i in ids]
        if any(p is None for p in pieces) or b"".join(pieces) != data:
            raise ValueError(f"the {self.role} ({self.tokenizer.name_or_path!r}) does not spell {text[:40]!r} with "
                             "its tokens' bytes (a normalizer or a dummy prefix changes the text): "
                             "cross-tokenizer alignment takes byte-exact tokenizers such as byte-level BPE")
        char_byte = [0]
        for c in text:
            char_byte.append(char_byte[-1] + len(c.encode()))
        ends, at = [], 0
        for piece, (first, last) in zip(pieces, offsets, strict=True):
            start, end, low, high = at, at + len(piece), char_byte[first], char_byte[last]
            if not (low <= start and end <= high) and not (start <= low and high <= end):  # split char / trimmed
                raise ValueError(f"the {self.role} ({self.tokenizer.name_or_path!r}) gives offsets ({first}, "
                                 f"{last}) for bytes [{start}, {end}) of {text[:40]!r}: its offsets do not follow "
                                 "its tokens")
            ends.append(end)
            at = end
        return ids, ends


def walk(student_ends: list[int], teacher_ends: list[int]) -> list[Span]:
    """GOLD's walk: the spans of two tokenizations of the same bytes (each given by the byte where each of its
    tokens ends, both ending at the same total), as ``(s0, s1, t0, t1)`` token ranges. A span closes where both
    sides end a token at the same byte.

    >>> walk([3, 7], [1, 3, 7])  # "def" + "ault" against "d" + "ef" + "ault"
    [(0, 1, 0, 2), (1, 2, 2, 3)]
    """
    if (student_ends[-1:] or [0]) != (teacher_ends[-1:] or [0]):
        raise ValueError(f"the two tokenizations cover {student_ends[-1:]} and {teacher_ends[-1:]} bytes: they must "
                         "spell the same text")
    spans: list[Span] = []
    s = t = s0 = t0 = 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            spans.append((s0, s, t0, t))
            s0, t0 = s, t
    return spans


@dataclass(frozen=True)
class BlockAlignment:
    """One block: the teacher's tokens of its text, and the spans both sides share (student indices into the
    block, teacher indices into ``teacher_ids``)."""

    teacher_ids: list[int]
    spans: list[Span]


class Aligner:
    """Aligns blocks of student ids with the teacher's tokenization of the same text.

    Args:
        student: the student's tokenizer (the one the blocks were made with).
        teacher: the teacher's tokenizer.
    """

    def __init__(self, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
        self.student = TokenPieces(student, "student tokenizer")
        self.teacher = TokenPieces(teacher, "teacher tokenizer")
        teacher_specials = {name: i for i, name in self.teacher.names.items()}
        #: student special id -> the teacher's: EOS for EOS, else the special token of the same name
        self.specials: dict[int, int] = {i: teacher_specials[n] for i, n in self.student.names.items()
                                         if n in teacher_specials}
        if self.student.eos is not None and self.teacher.eos is not None:
            self.specials[self.student.eos] = self.teacher.eos

    def shared(self) -> Tensor:
        """The tokens both vocabularies share, as ``(teacher id, student id)`` rows (M, 2) long: the ids whose
        token text is the same (the same bytes: for two byte-level vocabularies, the same token string), and the
        special tokens :attr:`specials` pairs."""
        teacher_ids = {p: i for i, p in enumerate(self.teacher.pieces) if p is not None}
        pairs = {(teacher_ids[p], i) for i, p in enumerate(self.student.pieces) if p is not None and p in teacher_ids}
        pairs |= {(t, s) for s, t in self.specials.items()}
        return torch.tensor(sorted(pairs), dtype=torch.long).reshape(-1, 2)

    def block(self, ids: list[int]) -> BlockAlignment:
        """The teacher's tokens and the shared spans of one block of student ids (see the module's docstring)."""
        teacher_ids: list[int] = []
        spans: list[Span] = []
        i = 0
        while i < len(ids):
            if self.student.is_special(ids[i]):
                if ids[i] in self.specials:
                    spans.append((i, i + 1, len(teacher_ids), len(teacher_ids) + 1))
                    teacher_ids.append(self.specials[ids[i]])
                i += 1
                continue
            j = i
            while j < len(ids) and not self.student.is_special(ids[j]):
                j += 1
            self._segment(ids, i, j, teacher_ids, spans)
            i = j
        return BlockAlignment(teacher_ids, spans)

    def _segment(self, ids: list[int], i: int, j: int, teacher_ids: list[int], spans: list[Span]) -> None:
        """Align the student tokens ``ids[i:j]`` (no special token among them): the longest run of them that spells
        whole characters is decoded, tokenized by the teacher and walked."""
        pieces = [self.student.pieces[k] for k in ids[i:j]]
        data = b"".join(pieces)
        ends = [0]
        for piece in pieces:
            ends.append(ends[-1] + len(piece))
        starts = [k for k in range(len(pieces)) if not _continues(data, ends[k])]  # tokens starting a character
        stops = [k for k in range(len(pieces), 0, -1) if not _continues(data, ends[k])]  # ... ending one
        for first in starts[:1]:
            for last in [k for k in stops if k > first][:4]:  # an incomplete last character: try a shorter run
                try:
                    text = data[ends[first] : ends[last]].decode()
                except UnicodeDecodeError:
                    continue
                teacher, teacher_ends = self.teacher.encode(text)
                student_ends = [e - ends[first] for e in ends[first + 1 : last + 1]]
                at = len(teacher_ids)
                spans.extend((i + first + s0, i + first + s1, at + t0, at + t1)
                             for s0, s1, t0, t1 in walk(student_ends, teacher_ends))
                teacher_ids.extend(teacher)
                return

    def batch(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's tokens of a batch of blocks and their shared spans.

        Args:
            input_ids: (B, T) student ids.

        Returns:
            ``teacher_ids`` (B, U) long, right-padded with the teacher's EOS (a causal teacher's outputs before the
            padding do not see it), and ``spans`` (G, 5) long: ``(block, s0, s1, t0, t1)`` of every span that both
            models predict (``s0 >= 1`` and ``t0 >= 1``: a block's first token has no prediction).
        """
        blocks = [self.block(row) for row in input_ids.tolist()]
        width = max([1, *(len(b.teacher_ids) for b in blocks)])
        pad = self.teacher.eos if self.teacher.eos is not None else 0
        teacher_ids = torch.full((len(blocks), width), pad, dtype=torch.long)
        rows = []
        for b, found in enumerate(blocks):
            teacher_ids[b, : len(found.teacher_ids)] = torch.tensor(found.teacher_ids, dtype=torch.long)
            rows += [(b, *span) for span in found.spans if span[0] >= 1 and span[2] >= 1]
        return teacher_ids, torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


def _continues(data: bytes, at: int) -> bool:
    """Whether byte ``at`` of ``data`` continues a character (a UTF-8 continuation byte, 0b10xxxxxx); the end of
    the data continues nothing."""
    return at < len(data) and 0x80 <= data[at] < 0xC0
