"""A second tokenizer, made here: a byte-level BPE trained on the built-in corpus, for students whose tokenizer is
not the teacher's (cross-tokenizer distillation, :mod:`lightning_distill.alignment`).

Nothing can be downloaded, so the tokenizer a student may use instead of the embedded teacher's is trained offline
with Hugging Face ``tokenizers`` (a dependency of ``transformers``) the first time its name is used, and kept under
:func:`~lightning_distill.backbone.cache_dir` as a ``save_pretrained`` folder that ``AutoTokenizer`` loads (a fast
tokenizer: ``return_offsets_mapping`` works). Training is deterministic (the same text gives the same vocabulary
and merges) and takes well under a second; the folder's name carries a hash of the training text (the built-in
corpus is the documentation that ships with the running Python), so another Python builds its own.

- ``builtin:python-docs-bpe-4k``: 4,096 tokens (256 bytes, 3,839 merges, ``<|endoftext|>``), GPT-2-style
  byte-level pre-tokenization like SmolLM2's, trained on every document of ``builtin:python-docs``: 0.99x as many
  tokens as SmolLM2's 49,152-token vocabulary on that corpus, 1.47x on ``builtin:shakespeare``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinTokenizer:
    """A byte-level BPE trained here on a built-in corpus."""

    corpus: str  # the built-in corpus it is trained on
    vocab_size: int  # tokens, the end-of-text token included
    eos_token: str = "<|endoftext|>"


BUILTIN_TOKENIZERS: dict[str, BuiltinTokenizer] = {
    "builtin:python-docs-bpe-4k": BuiltinTokenizer(corpus="builtin:python-docs", vocab_size=4096),
}


def built_tokenizer(name: str) -> Path:
    """The ``save_pretrained`` folder of the builtin tokenizer ``name``, training it on first use (under a file
    lock, written atomically, so parallel processes train it once)."""
    from filelock import FileLock

    from lightning_distill.backbone import cache_dir
    from lightning_distill.data.sources import documents  # here: the data package imports backbone

    spec = BUILTIN_TOKENIZERS[name]
    texts = documents(spec.corpus)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    target = cache_dir() / "tokenizers" / f"{name.removeprefix('builtin:')}-{digest}"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "tokenizer.json").exists():
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        train_byte_level_bpe(texts, spec.vocab_size, spec.eos_token).save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def train_byte_level_bpe(texts: list[str], vocab_size: int, eos_token: str = "<|endoftext|>"):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, as a fast ``transformers`` tokenizer whose
    end-of-text token also pads. Deterministic: the same texts give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=eos_token, pad_token=eos_token)
