"""DistillDataModule over a prepared corpus: blocks cut from each chunk's stream, block_idx joining random access and
streaming, a shuffled train epoch, in-order validation, the fingerprint, the checks, an object-storage URI (litdata's
"local:" scheme stands in for s3://), and a real method training on it."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import TINY_STUDENT, prepared_corpus, requires_litdata, tiny_trainer

from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.backbone import load_tokenizer

pytestmark = requires_litdata


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    return load_tokenizer(tiny_teacher_dir)


@pytest.fixture(scope="module")
def corpus(tiny_teacher_dir, tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("streamed"), tiny_teacher_dir)


def streamed(tok, corpus, **kwargs) -> DistillDataModule:
    data = DistillDataModule(corpus=corpus, **{"block_size": 16, "batch_size": 4, **kwargs})
    data.set_tokenizer(tok)
    data.setup("fit")
    return data


def chunk_streams(corpus: str, split: str) -> list[np.ndarray]:
    """Each chunk's tokens, read back one token at a time."""
    from lightning_distill.data.streaming import StreamedCorpus

    opened = StreamedCorpus(corpus)
    tokens = opened.blocks(split, block_size=1)
    starts = [*opened.chunk_starts(split, 1), len(tokens)]
    return [np.array([int(tokens[i][0]) for i in range(a, b)]) for a, b in itertools.pairwise(starts)]


def test_blocks_are_cut_from_each_chunk(tok, corpus):
    data = streamed(tok, corpus)
    for split, blocks in (("train", data.train_blocks), ("validation", data.val_blocks)):
        expected = [c[: len(c) // 16 * 16].reshape(-1, 16) for c in chunk_streams(corpus, split)]  # tails unused
        expected = np.concatenate(expected)
        assert blocks.shape == expected.shape
        assert all(np.array_equal(blocks[i].numpy(), expected[i]) for i in range(len(blocks)))
        assert data.chunk_starts(split) == [int(x) for x in np.cumsum([0, *[len(c) // 16 for c in
                                                                        chunk_streams(corpus, split)][:-1]])]


def test_train_epoch_is_shuffled_and_joins_block_idx_with_its_tokens(tok, corpus):
    data = streamed(tok, corpus, seed=1)
    epochs = []
    loader = data.train_dataloader()
    for _ in range(2):
        seen = []
        for batch in loader:
            assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
            assert torch.equal(batch["labels"], batch["input_ids"])
            for row, block in enumerate(batch["block_idx"].tolist()):
                assert torch.equal(batch["input_ids"][row], data.train_blocks[block])
            seen += batch["block_idx"].tolist()
        epochs.append(seen)
    assert len(set(epochs[0])) == len(epochs[0]) >= len(data.train_blocks) - 4  # each block once (last batch dropped)
    assert epochs[0] != sorted(epochs[0]) and epochs[0] != epochs[1]  # shuffled, reshuffled every epoch
    validation = [b for batch in data.val_dataloader() for b in batch["block_idx"].tolist()]
    assert validation == list(range(len(data.val_blocks)))  # in order, every block
    assert [b for batch in data.predict_dataloader() for b in batch["block_idx"].tolist()] == list(
        range(len(data.train_blocks)))


def test_fingerprint_follows_the_chunks_and_the_block_size(tok, corpus, tiny_teacher_dir, tmp_path):
    assert streamed(tok, corpus).corpus_fingerprint() == streamed(tok, corpus).corpus_fingerprint()
    assert streamed(tok, corpus).corpus_fingerprint() != streamed(tok, corpus, block_size=32).corpus_fingerprint()
    other = prepared_corpus(tmp_path, tiny_teacher_dir, seed=5)  # other documents in validation
    assert streamed(tok, other).corpus_fingerprint() != streamed(tok, corpus).corpus_fingerprint()


def test_settings_a_prepared_corpus_cannot_serve_are_refused(tok, corpus, tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction=0\.1"):
        streamed(tok, corpus, val_fraction=0.2)
    with pytest.raises(ValueError, match="max_documents=None"):
        streamed(tok, corpus, max_documents=4)
    with pytest.raises(ValueError, match="no block of block_size=600"):
        streamed(tok, corpus, block_size=600)
    other = load_tokenizer(tiny_teacher_dir)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        streamed(other, corpus)
    (tmp_path / "corpus.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a complete prepared corpus"):
        streamed(tok, str(tmp_path))


def test_an_object_storage_uri_is_streamed_through_the_cache(tok, corpus):
    remote = streamed(tok, f"local:{corpus}")  # litdata's stand-in for s3://bucket/corpus
    local = streamed(tok, corpus)
    assert remote.corpus_fingerprint() == local.corpus_fingerprint()
    batch = next(iter(remote.train_dataloader()))
    for row, block in enumerate(batch["block_idx"].tolist()):
        assert torch.equal(batch["input_ids"][row], local.train_blocks[block])
    assert any(remote._stream.cache.rglob("*.bin"))  # chunks were downloaded into the cache


def test_soft_distill_trains_on_a_streamed_corpus(tiny_teacher_dir, corpus, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, DistillDataModule(corpus=corpus, block_size=32, batch_size=2))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(name.startswith("val/") for name in trainer.callback_metrics), sorted(trainer.callback_metrics)
