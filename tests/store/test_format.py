"""The label store (lightning_distill.store): record layouts and their sizes, encoding the teacher's signal and
reading it back, the sparse losses on what a store holds (k = V equals the dense losses), where shards begin, the
writer (atomic shards, resume, no silent rewrite) and the reader's refusals. LabelWriter under trainer.predict is in
test_writer.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_distill import losses
from lightning_distill import metrics as val_metrics
from lightning_distill.losses import divergences, sparse
from lightning_distill.store import LabelStore, StoreWriter, decode, encode, record_dtype, to_records
from lightning_distill.store.format import locate, shard_ranges, shard_starts, split_starts

V = 50


def logits(shape=(2, 5, V), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def targets_of(stored: dict, tail: str = "bucket") -> sparse.SparseTargets:
    """The sparse loss targets of decoded top-k or sampled records."""
    if "topk_ids" in stored:
        return sparse.SparseTargets("topk", stored["topk_ids"], stored["topk_logprobs"], tail)
    return sparse.SparseTargets("sampled", stored["sample_ids"], stored["sample_weights"])


def roundtrip(kind: str, signal: torch.Tensor, value_dtype: str = "float16", **settings) -> list[dict]:
    """Encode a batch, pack it as stored records, and decode each block back (what a batch would carry)."""
    manifest = {"kind": kind, "value_dtype": value_dtype, "num_samples": settings.get("num_samples", 12)}
    sizes = {name: settings[name] for name in ("k", "num_samples") if name in settings}
    dtype = record_dtype(kind, signal.shape[1], V, value_dtype=value_dtype,
                         new_tokens=signal.shape[1] if kind == "generate" else 0, **sizes)
    records = to_records(encode(kind, signal, **settings), dtype, value_dtype)
    return [decode(record, manifest) for record in records]


def stacked(blocks: list[dict]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([b[name] for b in blocks]) for name in blocks[0]}


# ---------------------------------------------------------------------------------------------- record sizes
@pytest.mark.parametrize(("kind", "settings", "vocab", "per_token"), [
    ("topk", {"k": 32}, 49152, 130),  # 32 uint16 ids + 32 fp16 log-probs + the covered mass
    ("topk", {"k": 32, "value_dtype": "bfloat16"}, 49152, 130),
    ("topk", {"k": 32}, 151936, 194),  # int32 ids when the vocabulary does not fit in uint16
    ("sampled", {"num_samples": 12}, 49152, 40),  # 12 ids + 12 uint8 counts + arg-max + entropy
    ("sampled", {"num_samples": 300}, 49152, 1204),  # uint16 counts above 255 draws
    ("top1", {}, 49152, 2),
])
def test_record_sizes(kind, settings, vocab, per_token):
    assert record_dtype(kind, 128, vocab, **settings).itemsize == 128 * per_token


def test_record_dtype_names_bad_settings():
    with pytest.raises(ValueError, match="kind"):
        record_dtype("logits", 8, V)
    with pytest.raises(ValueError, match="value_dtype"):
        record_dtype("topk", 8, V, value_dtype="int8")


# ------------------------------------------------------------------------------------------ encode / decode
@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_topk_roundtrip_keeps_ids_and_the_exact_covered_mass(value_dtype):
    teacher = logits()
    stored = stacked(roundtrip("topk", teacher, value_dtype, k=8, temperature=2.0))
    ids, logprobs = sparse.topk_teacher(teacher, 8, temperature=2.0)
    assert torch.equal(stored["topk_ids"], ids) and torch.equal(stored["argmax"], teacher.argmax(-1))
    tolerance = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5}[value_dtype]
    torch.testing.assert_close(stored["topk_logprobs"], logprobs, atol=tolerance * 8, rtol=0)
    # the covered mass (hence the tail the "bucket" loss matches) survives rounding up to one number's precision
    covered = stored["topk_logprobs"].logsumexp(-1).exp()
    torch.testing.assert_close(covered, logprobs.logsumexp(-1).exp(), atol=tolerance * 2, rtol=0)


def test_sampled_roundtrip():
    teacher = logits()
    stored = stacked(roundtrip("sampled", teacher, num_samples=12, temperature=1.5,
                               generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(stored["sample_weights"].sum(-1), torch.ones(2, 5))
    assert torch.all((stored["sample_weights"] * 12).round() == stored["sample_weights"] * 12)
    assert torch.equal(stored["argmax"], teacher.argmax(-1))
    p = torch.softmax(teacher / 1.5, -1)
    torch.testing.assert_close(stored["entropy"], -(p * p.log()).sum(-1), atol=5e-3, rtol=0)
    # the sampled ids are ones the teacher can produce, each distinct per position
    for ids, weights in zip(stored["sample_ids"].reshape(-1, 12), stored["sample_weights"].reshape(-1, 12),
                            strict=True):
        kept = ids[weights > 0]
        assert len(set(kept.tolist())) == len(kept)


def test_sampled_weights_average_to_the_teacher():
    """Stored draws, over many blocks, give the tempered teacher distribution in expectation (unbiased)."""
    teacher = logits((1, 1, V)).expand(400, 1, V).contiguous()
    stored = stacked(roundtrip("sampled", teacher, num_samples=12, temperature=2.0,
                               generator=torch.Generator().manual_seed(1)))
    empirical = torch.zeros(V).index_add_(0, stored["sample_ids"].reshape(-1), stored["sample_weights"].reshape(-1))
    torch.testing.assert_close(empirical / 400, torch.softmax(teacher[0, 0] / 2, -1), atol=0.02, rtol=0)


def test_stored_draws_give_the_dense_forward_kl_gradient_on_average():
    """The sampled estimator, read back from stored records, is unbiased: its mean gradient over many stored draws
    approaches the gradient of the dense forward KL (at temperature 2)."""
    teacher = logits((1, 3, V), seed=8).double()
    student = logits((1, 3, V), seed=9).double().requires_grad_(True)
    draws = 3000
    stored = stacked(roundtrip("sampled", teacher.expand(draws, 3, V).contiguous(), num_samples=8, temperature=2.0,
                               generator=torch.Generator().manual_seed(3)))
    targets = targets_of(stored)
    sampled = sparse.sampled_kl(student.expand(draws, 3, V), targets.ids, targets.values, temperature=2.0)
    (sampled_grad,) = torch.autograd.grad(sampled, student)
    (dense_grad,) = torch.autograd.grad(losses.ForwardKL()(student, teacher, temperature=2.0), student)
    torch.testing.assert_close(sampled_grad, dense_grad, atol=0.01, rtol=0)


def test_top1_and_generate_roundtrip():
    teacher = logits()
    assert torch.equal(stacked(roundtrip("top1", teacher))["argmax"], teacher.argmax(-1))
    continuations = torch.randint(0, V, (2, 5))
    assert torch.equal(stacked(roundtrip("generate", continuations))["continuation"], continuations)


# ------------------------------------------------------------------------------ losses on stored targets
@pytest.mark.parametrize("divergence", sorted(losses.DIVERGENCES))
def test_stored_topk_with_k_equal_v_gives_the_dense_loss(divergence):
    teacher, student = logits(seed=0), logits(seed=1)
    stored = stacked(roundtrip("topk", teacher, "float32", k=V))
    targets = targets_of(stored)
    labels_ = torch.randint(0, V, (2, 5))
    labels_[0, 0] = -100
    got = losses.distill_loss(student, targets, labels_, divergence=divergence, ce_weight=0.3)
    dense = losses.distill_loss(student, teacher, labels_, divergence=divergence, ce_weight=0.3)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], dense[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", sorted(losses.DIVERGENCES))
def test_bucketed_topk_is_at_most_the_dense_divergence(divergence):
    """Coarse-graining to the K ids + the rest never increases a divergence (data processing)."""
    teacher, student = logits(seed=2), logits(seed=3)
    ids, logprobs = sparse.topk_teacher(teacher, 6)
    stored = sparse.sparse_per_token("topk", student, ids, logprobs, tail="bucket", divergence=divergence)
    dense = divergences.divergence_per_token(losses.get_divergence(divergence), student, teacher)
    assert torch.isfinite(stored).all() and (stored <= dense + 1e-5).all() and (stored >= -1e-6).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_bucket_tail_of_a_confident_student_is_exact(divergence):
    """The student's mass outside the K ids comes from the K log-probs without a pass over the vocabulary, except
    where it is too small for that (a confident student): there it is taken exactly; float32 matches float64."""
    teacher = logits(seed=10)
    student = logits(seed=11)
    ids, logprobs = sparse.topk_teacher(teacher, 4)
    student = student.scatter_add(-1, ids[..., :1], torch.full_like(student[..., :1], 30.0))  # tails ~1e-12
    student[0, :2] -= 25  # ... except a few positions with a large tail (the cheap path)
    values, grads = [], []
    for dtype in (torch.float32, torch.float64):
        s = student.to(dtype).requires_grad_(True)
        per_token = sparse.sparse_per_token("topk", s, ids, logprobs.to(dtype), tail="bucket", divergence=divergence)
        loss = per_token.mean()
        values.append(loss.double())
        grads.append(torch.autograd.grad(loss, s)[0].double())
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # both paths in float64, away from the switch (where finite differences see the cheap form's rounding)
    s = logits((1, 2, V), seed=12).double()
    pair = ids[:1, :2]
    s = s.scatter_add(-1, pair[..., :1], torch.tensor([[[40.0], [0.0]]], dtype=torch.float64))  # tails ~1e-17, ~1
    assert torch.autograd.gradcheck(lambda x: sparse.topk_forward_kl(x, pair, logprobs[:1, :2].double(),
                                                                     tail="bucket"), (s.requires_grad_(True),))


def test_sparse_targets_reject_ill_defined_divergences():
    teacher, student = logits(seed=0), logits(seed=1)
    ids, logprobs = sparse.topk_teacher(teacher, 6)
    with pytest.raises(ValueError, match=r"^divergence must be .*tail='renorm'"):
        sparse.sparse_per_token("topk", student, ids, logprobs, tail="renorm", divergence="reverse_kl")
    ids, weights = sparse.sample_teacher(teacher, 6)
    with pytest.raises(ValueError, match=r"^divergence must be .*sampled"):
        sparse.sparse_per_token("sampled", student, ids, weights, divergence="tvd")
    with pytest.raises(ValueError, match=r"^kind must be "):
        sparse.SparseTargets("dense", ids, weights)


def test_stored_metrics_match_the_live_ones_at_k_equal_v():
    teacher, student = logits(seed=4), logits(seed=5)
    labels_ = torch.randint(0, V, (2, 5))
    stored = stacked(roundtrip("topk", teacher, "float32", k=V))
    metrics = val_metrics.against_stored(student, stored, labels_, temperature=1.0)
    torch.testing.assert_close(metrics["kl"], losses.ForwardKL()(student, teacher, labels_), atol=1e-5, rtol=1e-5)
    assert metrics["agreement"] == (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    assert "kl" not in val_metrics.against_stored(student, stored, labels_, temperature=2.0)  # not comparable at T != 1


def test_sampled_kl_metric_is_an_unbiased_estimate():
    teacher, student = logits((1, 1, V), seed=6), logits((1, 1, V), seed=7)
    many = teacher.expand(2000, 1, V).contiguous()
    stored = stacked(roundtrip("sampled", many, num_samples=12, generator=torch.Generator().manual_seed(2)))
    labels_ = torch.zeros(2000, 1, dtype=torch.long)
    metrics = val_metrics.against_stored(student.expand(2000, 1, V), stored, labels_, temperature=1.0)
    assert metrics["kl"].item() == pytest.approx(losses.ForwardKL()(student, teacher).item(), abs=0.1)


# ---------------------------------------------------------------------------------------------- shards
def test_shards_start_every_shard_blocks_and_at_every_chunk():
    assert shard_starts(10, 4) == [0, 4, 8] == split_starts({"blocks": 10}, 4)
    assert shard_starts(10, 4, [0, 3, 3, 7]) == [0, 3, 7]  # an empty chunk adds no shard
    assert shard_starts(10, 2, [0, 5]) == [0, 2, 4, 5, 7, 9]
    assert shard_ranges([0, 3, 7], 10) == [(0, 3), (3, 7), (7, 10)]
    assert split_starts({"blocks": 10, "starts": [0, 3, 7]}, 4) == [0, 3, 7]
    assert [locate([0, 3, 7], b) for b in (0, 2, 3, 9)] == [(0, 0), (0, 2), (1, 0), (2, 2)]


# ---------------------------------------------------------------------------------------------- the writer
def header(blocks=5, shard_blocks=2, **changes) -> dict:
    return {"kind": "top1", "teacher": "t", "tokenizer": "tok", "corpus": "c", "corpus_settings": {},
            "block_size": 4, "temperature": 1.0, "value_dtype": "float16", "num_samples": None,
            "shard_blocks": shard_blocks, "splits": {"train": {"blocks": blocks}}, **changes}


def records(rows: int, start: int = 0) -> np.ndarray:
    out = np.zeros(rows, record_dtype("top1", 4, V))
    out["ids"] = np.arange(start, start + rows)[:, None]
    return out


def test_writer_resumes_then_completes_and_never_rewrites_silently(tmp_path):
    path = tmp_path / "store"
    writer = StoreWriter(path, header())
    writer.prepare()
    writer.write("train", 0, records(2))
    assert writer.finished() == {("train", 0)}
    assert writer.finish() == ["train-00001.npy", "train-00002.npy"]  # interrupted: no complete manifest
    with pytest.raises(ValueError, match="unfinished"):
        LabelStore(path)

    again = StoreWriter(path, header())  # a rerun with the same settings resumes
    again.prepare()
    assert again.finished() == {("train", 0)}
    with pytest.raises(ValueError, match=r"other settings.*shard_blocks"):
        StoreWriter(path, header(shard_blocks=3)).prepare()
    again.write("train", 1, records(2, 2))
    (path / "train-00002.npy.tmp-123").write_bytes(b"partial")  # what a crash mid-write leaves
    again.write("train", 2, records(1, 4))
    assert again.finish() == []

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and [s["blocks"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 1]
    assert all(len(s["sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "train-00000.npy", "train-00001.npy",
                                                      "train-00002.npy"]  # no checksum sidecars, no temp files
    split = LabelStore(path).split("train")
    assert [int(split[b]["argmax"][0]) for b in range(5)] == [0, 1, 2, 3, 4]
    assert LabelStore(path).split("validation") is None

    assert StoreWriter(path, header()).complete()  # the same labelling again: nothing to do
    StoreWriter(path, header()).prepare()  # a no-op
    with pytest.raises(FileExistsError, match=r"temperature differ.*never rewritten silently"):
        StoreWriter(path, header(temperature=2.0)).prepare()
    (path / "mine.txt").write_text("not the store's")
    StoreWriter(path, header(), overwrite=True).prepare()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "mine.txt"]


def test_reader_refuses_a_corrupt_or_missing_shard(tmp_path):
    writer = StoreWriter(tmp_path, header(blocks=2))
    writer.prepare()
    writer.write("train", 0, records(2))
    writer.finish()
    shard = tmp_path / "train-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000.npy fails its checksum"):
        LabelStore(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=r"train-00000.npy is missing"):
        LabelStore(tmp_path)
    with pytest.raises(ValueError, match="not a label store"):
        LabelStore(tmp_path / "nowhere")


def test_reader_check_says_what_differs(tmp_path):
    writer = StoreWriter(tmp_path, header(blocks=2))
    writer.prepare()
    writer.write("train", 0, records(2))
    writer.finish()
    store = LabelStore(tmp_path)
    store.check(tokenizer="tok", block_size=4, corpus="c", description={})
    with pytest.raises(ValueError, match="another tokenizer"):
        store.check(tokenizer="other", block_size=4, corpus="c", description={})
    with pytest.raises(ValueError, match="block_size=4, the data module makes block_size=8"):
        store.check(tokenizer="tok", block_size=8, corpus="c", description={})
    with pytest.raises(ValueError, match=r"another corpus or split.*max_documents"):
        store.check(tokenizer="tok", block_size=4, corpus="d", description={"seed": 1})


def test_split_labels_pickle_without_their_memory_maps(tmp_path):
    import pickle

    writer = StoreWriter(tmp_path, header(blocks=2))
    writer.prepare()
    writer.write("train", 0, records(2))
    writer.finish()
    split = LabelStore(tmp_path).split("train")
    first = split[1]
    assert split._maps and not pickle.loads(pickle.dumps(split))._maps  # DataLoader workers map their own
    assert torch.equal(pickle.loads(pickle.dumps(split))[1]["argmax"], first["argmax"])
    with pytest.raises(IndexError):
        split[2]
