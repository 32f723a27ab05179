"""student={"from_teacher": {..., "tokenizer": NAME}}: each new token starts from the mean of the teacher's rows of
its text as the teacher tokenizes it (embedding, and an untied head)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_distill import pruning
from lightning_distill.alignment import TokenPieces
from lightning_distill.backbone import load_model, load_tokenizer
from lightning_distill.transplant import TOKENIZER_FIELD, teacher_pieces_of


def rows_are_means_of_teacher_rows(new_weight, old_weight, new, teacher_tok) -> dict[str, int]:
    """Check every new row against the teacher rows of its text; count the kinds of tokens seen."""
    pieces = TokenPieces(new, "student tokenizer")
    seen = {"same": 0, "split": 0}
    for i, piece in enumerate(pieces.pieces):
        if piece is None or not piece.isascii():
            continue
        ids = teacher_tok(piece.decode(), add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(new_weight[i], old_weight[ids].mean(0))
        seen["same" if len(ids) == 1 else "split"] += 1
    return seen


def test_each_new_token_starts_from_the_teachers_rows_of_its_text(tiny_teacher_dir, tiny_student_tokenizer_dir):
    teacher, teacher_tok = load_model(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    new = load_tokenizer(tiny_student_tokenizer_dir)
    student = pruning.from_teacher(teacher, {"layers": 2, "tokenizer": tiny_student_tokenizer_dir}, teacher_tok)
    weight, old = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    assert weight.shape == (512, old.shape[1]) and student.config.vocab_size == 512
    seen = rows_are_means_of_teacher_rows(weight, old, new, teacher_tok)
    assert seen["same"] > 200 and seen["split"] > 50  # shared tokens copied, the others averaged
    torch.testing.assert_close(weight[new.eos_token_id], old[teacher_tok.eos_token_id])  # EOS answers EOS
    assert student.get_output_embeddings().weight is weight  # tied, as the teacher's
    assert student.config.eos_token_id == new.eos_token_id and getattr(student.config, TOKENIZER_FIELD) == \
        tiny_student_tokenizer_dir
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert student(torch.tensor([[1, 2, 511]])).logits.shape == (1, 3, 512)


def test_an_untied_head_is_transplanted_too(tiny_teacher_dir, tiny_student_tokenizer_dir):
    teacher_tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(teacher_tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=False, eos_token_id=teacher_tok.eos_token_id))
    student = pruning.from_teacher(teacher, {"layers": 1, "tokenizer": tiny_student_tokenizer_dir}, teacher_tok)
    head, old_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    assert head is not student.get_input_embeddings().weight and head.shape[0] == 512
    new = load_tokenizer(tiny_student_tokenizer_dir)
    assert rows_are_means_of_teacher_rows(head, old_head, new, teacher_tok)["split"] > 50


def test_a_token_holding_part_of_a_character_takes_the_teachers_byte_tokens(tiny_teacher_dir,
                                                                            tiny_student_tokenizer_dir):
    new, teacher_tok = load_tokenizer(tiny_student_tokenizer_dir), load_tokenizer(tiny_teacher_dir)
    pieces, teacher_pieces = TokenPieces(new, "s"), TokenPieces(teacher_tok, "t")
    sources = teacher_pieces_of(new, teacher_tok)
    partial = [i for i, p in enumerate(pieces.pieces) if p is not None and len(p) == 1 and p[0] >= 0x80]
    assert partial
    for i in partial:
        assert [teacher_pieces.pieces[t] for t in sources[i]] == [pieces.pieces[i]]
