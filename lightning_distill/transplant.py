"""A student on its own tokenizer, started from the teacher: ``student={"from_teacher": {"layers": N, "tokenizer":
NAME}}`` (a tokenizer transplant in its simplest form: each new token from the mean of its old pieces).

The pruned student (:mod:`lightning_distill.pruning`) keeps the teacher's layers, norms and embedding geometry; its
vocabulary becomes NAME's. Each new token's embedding is the mean of the teacher's embeddings of the token's text as
the teacher tokenizes it ("default" -> the teacher's "default" row when the teacher has that token, the mean of
"def" and "ault" when it spells it in two); an untied output head's row likewise, from the teacher's head. A token
that is not whole text (one byte of a character) takes the teacher's tokens of its bytes; the end-of-text token the
teacher's; another special token the teacher's special token of the same name, else the mean of all the teacher's
embeddings.

What it keeps: every token the two vocabularies share starts exactly where the teacher had it, and every other one
in the span of the teacher's pieces. What it loses: a mean forgets the order and the interaction of the pieces
("the" + "re" is not "there"), and the output head of a merged token predicts the average of its pieces, not the
token: the student starts measurably worse than the teacher on its new ids and distillation (a cross-tokenizer
loss, :mod:`lightning_distill.losses.cross_tokenizer`) has to teach the new rows. No Lightning here.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill.alignment import TokenPieces
from lightning_distill.backbone import load_tokenizer

TOKENIZER_FIELD = "distill_tokenizer"  #: the student config field naming the tokenizer it was transplanted to


def teacher_pieces_of(new: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> list[list[int]]:
    """For each id of ``new``, the teacher ids its embedding is the mean of (empty: the mean of all of them)."""
    mine, theirs = TokenPieces(new, "student tokenizer"), TokenPieces(teacher, "teacher tokenizer")
    single = {p: i for i, p in enumerate(theirs.pieces) if p is not None}  # teacher token text -> id
    by_name = {name: i for i, name in theirs.names.items()}
    texts, found = {}, []
    for i, piece in enumerate(mine.pieces):
        if piece is None:
            twin = theirs.eos if i == mine.eos else by_name.get(mine.names.get(i, ""))
            found.append([twin] if twin is not None else [])
        elif piece in single:
            found.append([single[piece]])
        else:
            try:
                texts[i] = piece.decode()
            except UnicodeDecodeError:  # part of a character: the teacher's token of each byte
                found.append([single[bytes([b])] for b in piece if bytes([b]) in single])
                continue
            found.append([])
    if texts:
        encoded = teacher(list(texts.values()), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, encoded, strict=True):
            found[i] = ids
    return found


@torch.no_grad()
def transplant(student: PreTrainedModel, teacher_tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedModel:
    """``student`` (a pruned copy of the teacher, on the teacher's vocabulary) moved onto the tokenizer ``name``:
    its embedding (and an untied head) resized to that vocabulary, each row the mean of the teacher rows of
    :func:`teacher_pieces_of`; the config's special token ids are the new tokenizer's, and ``distill_tokenizer``
    names it."""
    new = load_tokenizer(name, "student.from_teacher.tokenizer")
    sources = teacher_pieces_of(new, teacher_tokenizer)
    size = max(len(new), len(sources))
    tied = bool(getattr(student.config, "tie_word_embeddings", False))
    old_embedding = student.get_input_embeddings().weight.detach().clone()  # (V_t, H)
    old_head = None if tied else student.get_output_embeddings().weight.detach().clone()  # (V_t, H)
    student.resize_token_embeddings(size, mean_resizing=False)
    for weight, old in ((student.get_input_embeddings().weight, old_embedding),
                        (None if tied else student.get_output_embeddings().weight, old_head)):
        if weight is None:
            continue
        fallback = old.mean(0)
        for i in range(size):
            ids = sources[i] if i < len(sources) else []
            weight[i] = old[ids].mean(0) if ids else fallback
    config = student.config
    config.eos_token_id, config.pad_token_id, config.bos_token_id = new.eos_token_id, new.pad_token_id, \
        new.bos_token_id
    if student.generation_config is not None:
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(student.generation_config, key, getattr(config, key))
    setattr(config, TOKENIZER_FIELD, name)
    return student
