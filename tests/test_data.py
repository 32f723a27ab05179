"""DistillDataModule: sources, deterministic split by document, packing, token cache, loaders, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import requires_builtin

from lightning_distill import data
from lightning_distill.backbone import load_tokenizer
from lightning_distill.data import DistillDataModule, documents, pack, split_documents


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    return load_tokenizer(tiny_teacher_dir)


@pytest.fixture
def count_tokenize(monkeypatch):
    """Counts the documents tokenized through ``data.tokens.tokenize_documents``."""
    counted = {"calls": 0, "docs": 0}
    real = data.tokens.tokenize_documents

    def counting(tokenizer, texts):
        counted["calls"] += 1
        counted["docs"] += len(texts)
        return real(tokenizer, texts)

    monkeypatch.setattr(data.tokens, "tokenize_documents", counting)
    return counted


def built(tok, max_positions=512, **kwargs) -> DistillDataModule:
    dm = DistillDataModule(**kwargs)
    dm.set_tokenizer(tok, max_positions=max_positions)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def prose(words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "data", "model", "token", "block", "split", "python", "teacher", "student", "loss"]
    return " ".join(vocab[i] for i in torch.randint(len(vocab), (words,), generator=g).tolist())


# --- sources ------------------------------------------------------------------------------------------------


def test_builtin_corpus_has_the_python_doc_topics():
    docs = documents("builtin:python-docs")
    assert 60 <= len(docs) <= 120
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == documents(["builtin:python-docs"])  # deterministic order


def test_text_files_and_globs(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "b.md", "beta")
    write(tmp_path / "sub" / "c.txt", "gamma")
    assert documents(a) == ["alpha"]
    assert documents(str(tmp_path / "*.txt")) == ["alpha"]
    assert documents(str(tmp_path / "**" / "*.txt")) == ["alpha", "gamma"]
    assert documents([str(tmp_path / "b.md"), a]) == ["beta", "alpha"]


def test_jsonl_with_and_without_text_field(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert documents(str(plain)) == ["one", "two"]
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"body": "x"}\n{"body": "y"}\n')
    assert documents(str(custom), text_field="body") == ["x", "y"]
    with pytest.raises(ValueError, match=r"custom\.jsonl, line 1: no string field text_field='text'"):
        documents(str(custom))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "ok"}\n{"other": "no"}\n')
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 2.*text_field='text'"):
        documents(str(mixed))


def test_hugging_face_dataset_on_disk(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    texts = [prose(40, seed=i) for i in range(6)]
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "single"))
    assert documents(str(tmp_path / "single"), text_field="content") == texts
    with pytest.raises(ValueError, match=r"text_field='text'.*content"):
        documents(str(tmp_path / "single"))
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:4]}),
                                  "test": datasets.Dataset.from_dict({"text": texts[4:]})})
    split.save_to_disk(str(tmp_path / "dict"))
    assert documents(str(tmp_path / "dict")) == texts[:4]
    dm = built(tok, corpus=str(tmp_path / "dict"), block_size=16, val_fraction=0.25)
    assert dm.train_blocks.shape[1] == 16 and len(dm.val_blocks) > 0


# --- split and packing --------------------------------------------------------------------------------------


def test_split_is_by_document_and_deterministic():
    train, val = split_documents(79, 0.1, seed=0)
    assert len(val) == math.ceil(0.1 * 79) and len(train) == 79 - len(val)
    assert sorted([*train, *val]) == list(range(79))  # every document once, none in both
    again = split_documents(79, 0.1, seed=0)
    assert (again[0] == train).all() and (again[1] == val).all()
    assert set(split_documents(79, 0.1, seed=1)[1]) != set(val)
    small_train, small_val = split_documents(79, 0.1, seed=0, max_documents=10)
    assert len(small_train) == 9 and len(small_val) == 1
    assert set(small_train) | set(small_val) <= set(range(79))
    with pytest.raises(ValueError, match="none for training"):
        split_documents(1, 0.5, seed=0)


def test_pack_puts_eos_after_each_document_and_drops_the_remainder():
    assert pack([[1, 2, 3], [4, 5]], block_size=3, eos_id=0).tolist() == [[1, 2, 3], [0, 4, 5]]  # [0] dropped
    assert pack([[1, 2, 3], [4, 5]], block_size=4, eos_id=0).tolist() == [[1, 2, 3, 0]]
    assert pack([[1, 2]], block_size=8, eos_id=0).shape == (0, 8)
    assert pack([], block_size=8, eos_id=0).dtype == torch.long


def test_blocks_are_the_packed_tokens_of_each_split(tok):
    dm = built(tok, block_size=64, seed=0)
    docs = documents("builtin:python-docs")
    train_ids, val_ids = split_documents(len(docs), 0.1, seed=0)
    for ids, blocks in ((train_ids, dm.train_blocks), (val_ids, dm.val_blocks)):
        ids_of_docs = [tok(docs[i], add_special_tokens=False)["input_ids"] for i in ids]
        expected = pack(ids_of_docs, 64, tok.eos_token_id)
        assert blocks.dtype == torch.long and blocks.shape == expected.shape
        assert torch.equal(blocks, expected)
    other = built(tok, block_size=64, seed=1)
    assert not torch.equal(other.val_blocks[:1], dm.val_blocks[:1])


def test_each_corpus_entry_is_packed_apart_and_batches_name_it(tok, tmp_path):
    """A corpus of several entries: no block mixes two (words in one, numbers in the other), and each batch says
    which entry each block is from (several teachers route by it)."""
    draws = [torch.randint(1000, (150,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    numbers = [" ".join(map(str, draw)) for draw in draws]
    texts = ([prose(150, seed=s) for s in range(20, 30)], numbers)
    paths = [write(tmp_path / f"entry{i}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in docs))
             for i, docs in enumerate(texts)]
    dm = built(tok, corpus=paths, block_size=32, batch_size=8, val_fraction=0.5)
    batches = list(dm.train_dataloader())
    sources, blocks = torch.cat([b["source"] for b in batches]), torch.cat([b["input_ids"] for b in batches])
    vocab = [{i for t in docs for i in tok(t, add_special_tokens=False)["input_ids"]} | {tok.eos_token_id}
             for docs in texts]
    assert vocab[0] - vocab[1] and vocab[1] - vocab[0]  # a block mixing the two would be seen
    assert set(sources.tolist()) == {0, 1}
    for block, source in zip(blocks.tolist(), sources.tolist(), strict=True):
        assert set(block) <= vocab[source]
    assert "source" not in next(iter(built(tok, corpus=paths[0], block_size=32).train_dataloader()))  # one entry



def test_val_sources_validate_on_their_entries_and_train_on_every_other_document(tok, tmp_path):
    """With val_sources, the validation split holds only those entries' documents, split as that entry alone would
    be; every document of the other entries trains (text mixed in for training only)."""
    words = write(tmp_path / "words.jsonl", "".join(json.dumps({"text": prose(120, seed=s)}) + "\n" for s in range(20)))
    mixed = write(tmp_path / "mixed.jsonl", "".join(json.dumps({"text": prose(90, seed=s)}) + "\n"
                                                    for s in range(100, 110)))
    alone = built(tok, corpus=words, block_size=32, val_fraction=0.2)
    dm = built(tok, corpus=[words, mixed], val_sources=[words], block_size=32, val_fraction=0.2)
    assert torch.equal(dm.val_blocks, alone.val_blocks)  # the same held-out documents, whatever is mixed in
    assert set(next(iter(dm.val_dataloader()))["source"].tolist()) == {0}
    mixed_blocks = built(tok, corpus=mixed, block_size=32, val_fraction=0.1)
    every_mixed = len(mixed_blocks.train_blocks) + len(mixed_blocks.val_blocks)
    assert len(dm.train_blocks) == len(alone.train_blocks) + every_mixed == len(alone.train_blocks) + (
        dm._sources["train"] == 1).sum()
    assert dm.corpus_settings()["val_sources"] == [words]
    everywhere = built(tok, corpus=[words, mixed], block_size=32, val_fraction=0.2)  # default: every entry
    assert set(everywhere._sources["validation"].tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"val_sources": ["builtin:shakespeare"]}, r"val_sources must be a non-empty list of entries of corpus"),
     ({"val_sources": []}, "val_sources must be a non-empty list"),
     ({"val_sources": ["builtin:python-docs"], "max_documents": 10}, "max_documents must be None when val_sources"),
     ({"corpus": "builtin:python-docs", "val_sources": ["builtin:python-docs"]},
      "val_sources must be given only with a corpus of several entries")],
)
def test_bad_val_sources_are_refused_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillDataModule(**{"corpus": ["builtin:python-docs", "builtin:smollm2-writing"], **kwargs})


def test_builtin_writing_is_what_the_embedded_teacher_wrote():
    """144 documents the write command made (its settings shipped beside them), each a request and an answer."""
    from lightning_distill.data.sources import WRITING

    docs = documents("builtin:smollm2-writing")
    assert len(docs) == 144 and all(d.strip() for d in docs)
    settings = json.loads(WRITING.with_name(WRITING.name + ".settings.json").read_text())
    assert settings["teacher"] == "builtin:smollm2-135m-instruct" and settings["seed"] == 0

# --- token cache --------------------------------------------------------------------------------------------


def test_second_setup_reads_the_cache(tok, tmp_path, monkeypatch, count_tokenize):
    monkeypatch.setenv("LIGHTNING_DISTILL_DATA_CACHE", str(tmp_path))
    first = built(tok, block_size=32)
    assert count_tokenize["calls"] == 1 and count_tokenize["docs"] == len(documents("builtin:python-docs"))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    second = built(tok, block_size=64, batch_size=2)  # packing settings do not change the cache key
    assert count_tokenize["calls"] == 1
    assert torch.equal(second.train_blocks.flatten()[:640], first.train_blocks.flatten()[:640])

    changed = load_tokenizer(str(Path(tok.name_or_path)))
    changed.add_tokens(["<extra_token>"])  # another vocabulary -> another cache entry
    built(changed, block_size=32)
    assert count_tokenize["calls"] == 2 and len(list(tmp_path.iterdir())) == 2


def test_max_documents_tokenizes_only_the_kept_documents(tok, tmp_path, monkeypatch, count_tokenize):
    monkeypatch.setenv("LIGHTNING_DISTILL_DATA_CACHE", str(tmp_path))
    dm = built(tok, block_size=32, max_documents=10)
    assert count_tokenize["docs"] == 10
    full = built(tok, block_size=32)
    assert len(dm.train_blocks) < len(full.train_blocks)


def test_file_cache_key_follows_the_file(tok, tmp_path, monkeypatch, count_tokenize):
    monkeypatch.setenv("LIGHTNING_DISTILL_DATA_CACHE", str(tmp_path / "cache"))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": prose(50, seed=i)}) + "\n" for i in range(4)))
    built(tok, corpus=str(jsonl), block_size=16, val_fraction=0.25)
    built(tok, corpus=str(jsonl), block_size=16, val_fraction=0.25)
    assert count_tokenize["calls"] == 1
    with jsonl.open("a") as file:
        file.write(json.dumps({"text": prose(50, seed=9)}) + "\n")
    built(tok, corpus=str(jsonl), block_size=16, val_fraction=0.25)
    assert count_tokenize["calls"] == 2


# --- loaders and the tokenizer from the module --------------------------------------------------------------


def test_dataloaders_yield_packed_batches(tok):
    dm = built(tok, block_size=32, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    assert torch.equal(batch["input_ids"], dm.train_blocks[batch["block_idx"]])
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(again["block_idx"], batch["block_idx"])  # seeded shuffle
    assert not torch.equal(batch["block_idx"], torch.arange(4))
    val = next(iter(dm.val_dataloader()))
    assert val["block_idx"].tolist() == [0, 1, 2, 3] and torch.equal(val["input_ids"], dm.val_blocks[:4])
    assert torch.equal(next(iter(dm.test_dataloader()))["input_ids"], val["input_ids"])
    predict = list(dm.predict_dataloader())
    assert torch.cat([b["block_idx"] for b in predict]).tolist() == list(range(len(dm.train_blocks)))


def test_tokenizer_comes_from_the_attached_module(tok, tiny_teacher_dir):
    dm = DistillDataModule(block_size=32)
    with pytest.raises(ValueError, match="no tokenizer"):
        dm.prepare_data()
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok, max_positions=512))
    dm.prepare_data()
    dm.setup("fit")
    assert torch.equal(dm.train_blocks, built(tok, block_size=32).train_blocks)

    short = DistillDataModule(block_size=64)
    short.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok, max_positions=32))
    with pytest.raises(ValueError, match="block_size=64 is larger than the model's maximum of 32"):
        short.setup("fit")

    changed = load_tokenizer(tiny_teacher_dir)
    changed.add_tokens(["<extra_token>"])
    mismatch = DistillDataModule(tokenizer=tiny_teacher_dir, block_size=32)
    mismatch.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=changed))
    with pytest.raises(ValueError, match="differs from the tokenizer of the model"):
        mismatch.setup("fit")


class TinyLM(L.LightningModule):
    """The smallest module with a ``tokenizer`` attribute, to run the datamodule under a real Trainer."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_positions = 64
        self.embed = torch.nn.Embedding(len(tokenizer), 8)
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["input_ids"].shape))
        return self.embed(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_takes_the_tokenizer_from_the_module(tok):
    model = TinyLM(tok)
    dm = DistillDataModule(block_size=32, batch_size=2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    assert model.seen == [(2, 32), (2, 32)]


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": True}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"block_size": 1}, "block_size"),
        ({"block_size": 8.0}, "block_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_documents": 1}, "max_documents"),
        ({"text_field": ""}, "text_field"),
        ({"tokenizer": ""}, "tokenizer"),
        ({"corpus": []}, "corpus"),
        ({"corpus": "builtin:nope"}, "corpus must be a known builtin corpus"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillDataModule(**kwargs)


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"glob .*\*\.nothing' matches no file"):
        DistillDataModule(corpus=str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="does not exist"):
        DistillDataModule(corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="not a saved Hugging Face dataset"):
        DistillDataModule(corpus=str(tmp_path))
    empty = write(tmp_path / "empty.txt", "  \n")
    with pytest.raises(ValueError, match=r"empty\.txt' holds no text"):
        documents([write(tmp_path / "full.txt", "text"), empty])


def test_too_little_text_for_one_block(tok, tmp_path):
    files = [write(tmp_path / f"{i}.txt", "a few words") for i in range(2)]
    with pytest.raises(ValueError, match=r"split .* has \d+ tokens \(1 documents\).*smaller block_size"):
        built(tok, corpus=files, block_size=64, val_fraction=0.5)


def test_block_size_larger_than_the_model_positions(tok, tiny_teacher_dir):
    with pytest.raises(ValueError, match="block_size=64 is larger than the model's maximum of 32"):
        built(tok, max_positions=32, block_size=64)
    dm = DistillDataModule(tokenizer=tiny_teacher_dir, block_size=1024)  # the tiny config has 512 positions
    with pytest.raises(ValueError, match="maximum of 512 positions"):
        dm.prepare_data()


# --- blocks for stored labels and labelling -------------------------------------------------------------------


def small(tok, **kwargs) -> DistillDataModule:
    """76 blocks of 32 tokens: 66 train, 10 validation."""
    return built(tok, **{"max_documents": 2, "val_fraction": 0.5, "block_size": 32, "batch_size": 4, **kwargs})


def test_corpus_fingerprint_follows_the_blocks(tok):
    first, again = small(tok), small(tok)
    assert first.corpus_fingerprint() == again.corpus_fingerprint()
    assert small(tok, seed=1).corpus_fingerprint() != first.corpus_fingerprint()  # another split
    assert small(tok, block_size=16).corpus_fingerprint() != first.corpus_fingerprint()
    assert first.corpus_settings() == {"corpus": "builtin:python-docs", "max_documents": 2, "seed": 0,
                                       "val_fraction": 0.5, "text_field": "text"}


def test_plan_predict_serves_the_planned_blocks_of_each_split(tok):
    dm = small(tok)
    dm.plan_predict({"validation": [3, 4, 5], "train": [0, 1, 2, 3, 4]})
    loaders = dm.predict_dataloader()
    assert [torch.cat([b["block_idx"] for b in loader]).tolist() for loader in loaders] == [[3, 4, 5],
                                                                                         [0, 1, 2, 3, 4]]
    assert torch.equal(next(iter(loaders[0]))["input_ids"][0], dm.val_blocks[3])
    dm.plan_predict(None)
    assert torch.cat([b["block_idx"] for b in dm.predict_dataloader()]).tolist() == list(range(66))
    with pytest.raises(ValueError, match="plan_predict's split must be one of 'train', 'validation', got 'test'"):
        dm.plan_predict({"test": [0]})


# --- the real embedded tokenizer ----------------------------------------------------------------------------


@pytest.mark.integration
@requires_builtin
def test_builtin_corpus_with_the_embedded_tokenizer():
    dm = DistillDataModule(tokenizer="builtin:smollm2-135m-instruct")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_blocks.shape[1] == 128 and len(dm.train_blocks) > 500 and len(dm.val_blocks) > 20
    assert dm.train_blocks.max() < 49152


def test_single_process_order_is_a_seeded_shuffling_dataloaders():
    """The resumable order of one process is the one a DataLoader(shuffle=True, generator=seeded) gave, epoch after
    epoch, so that results measured before the position was checkpointed still reproduce."""
    from torch.utils.data import DataLoader

    from lightning_distill.data.sampler import single_process_order

    for n in (45, 7):
        loader = DataLoader(list(range(n)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
        for epoch in range(3):
            assert [int(x) for b in loader for x in b] == single_process_order(n, 3, epoch)
