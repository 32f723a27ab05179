"""Prompts for generation (on-policy distillation): a block's first tokens, or a prompt file.

A prompt file is JSONL, one prompt per line: ``{"prompt": "..."}`` (the field is ``prompt_field``), or
``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the tokenizer's chat template (with the
generation prompt appended, so the model answers). Prompts are tokenized once; a batch of them is left-padded, with
the attention mask and position ids a padded sequence needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_distill import files


class PromptFile:
    """Tokenized prompts of a JSONL file (or of several: drawn from all alike), served in seeded batches.

    Args:
        path: the JSONL file, or a list of them (each prompt remembers its file: several teachers route by it).
        tokenizer: the student's (and teacher's) tokenizer.
        max_tokens: keep at most the last this-many tokens of a prompt (its end is what the model continues).
        prompt_field: the field holding plain-text prompts.
    """

    def __init__(self, path: str | list[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                 prompt_field: str = "prompt") -> None:
        self.ids: list[list[int]] = []
        self.files: list[str] = []  # the file of each prompt
        for one in [path] if isinstance(path, str) else path:
            found = self.read(one, tokenizer, max_tokens, prompt_field)
            self.ids += found
            self.files += [one] * len(found)
        self.pad_id = tokenizer.pad_token_id

    @staticmethod
    def read(path: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int, prompt_field: str) -> list[list[int]]:
        """The token ids of each prompt of one file."""
        file = Path(path)
        found: list[list[int]] = []
        if not file.is_file():
            raise ValueError(f"prompts={path!r} is not a file: give a JSONL file with one {{{prompt_field!r}: ...}} "
                             "or {'messages': [...]} object per line")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = files.json_record(line, f"prompts={path!r}, line {number}")
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                if tokenizer.chat_template is None:
                    raise ValueError(f"prompts={path!r}, line {number}: chat messages, but the tokenizer has no chat "
                                     f"template: give plain {prompt_field!r} prompts instead")
                ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
            elif isinstance(record, dict) and isinstance(record.get(prompt_field), str):
                ids = tokenizer(record[prompt_field], add_special_tokens=False)["input_ids"]
            else:
                raise ValueError(f"prompts={path!r}, line {number}: no string field {prompt_field!r} and no "
                                 "'messages' list")
            if ids:
                found.append(list(ids)[-max_tokens:])
        if not found:
            raise ValueError(f"prompts={path!r} holds no prompt")
        return found

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, size: int, seed: int) -> dict[str, Tensor]:
        """``size`` prompts drawn with a generator seeded by ``seed``, left-padded: ``input_ids``,
        ``attention_mask`` and ``position_ids``, each (B, P); ``source_names``: each prompt's file."""
        rows = torch.randint(len(self.ids), (size,), generator=torch.Generator().manual_seed(seed)).tolist()
        return {**left_pad([self.ids[i] for i in rows], self.pad_id), "source_names": [self.files[i] for i in rows]}


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Token id lists -> left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}


def positions(mask: Tensor) -> Tensor:
    """Position ids (B, T) of left-padded sequences from their attention mask (B, T): 0 at each first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
