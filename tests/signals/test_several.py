"""Several named teachers: routing per source (corpus entry or prompt file), the mixture, per-teacher metrics, and
the mismatches refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, make_tiny_model_dir, tiny_trainer, write_jsonl_corpus, write_labels

from lightning_distill import CoDistill, DistillDataModule, HardDistill, SoftDistill
from lightning_distill.options import OnPolicy, Teachers
from lightning_distill.signals.several import Routed


def two_sources(root: Path) -> tuple[str, str]:
    """Two JSONL corpora of different documents (each an entry of the corpus, routed to its teacher)."""
    from pydoc_data.topics import topics

    first = write_jsonl_corpus(root / "first.jsonl", docs=20)
    texts = [topics[name][:400] for name in sorted(topics)][40:60]
    second = root / "second.jsonl"
    second.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return first, str(second)


@pytest.fixture
def routed(tmp_path, tiny_teacher_dir, second_tiny_teacher_dir):
    first, second = two_sources(tmp_path)
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": second_tiny_teacher_dir}, sources={first: "a", second: "b"})
    data = DistillDataModule(corpus=[first, second], block_size=32, batch_size=8, val_fraction=0.25)
    return teachers, data


def ready(module, data):
    """The module's models built and its signal set up on ``data``, as the Trainer does."""
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    module.configure_model()
    module.signal.setup(module.run, "fit", data)
    return module


def mixed_batch(data) -> dict:
    """A train batch holding blocks of both sources."""
    for batch in data.train_dataloader():
        if 0 < int(batch["source"].sum()) < len(batch["source"]):
            return batch
    raise AssertionError("no batch mixes the two sources")


def test_each_block_is_picked_by_its_sources_teacher(routed):
    teachers, data = routed
    module = ready(HardDistill(teacher=teachers, student=TINY_STUDENT), data)
    batch = mixed_batch(data)
    picks = module.signal.picks(module.run, batch)  # (B, T)
    own = {0: module.teacher, 1: module.other_teachers["b"]}
    for source, teacher in own.items():
        rows = batch["source"] == source
        expected = teacher(input_ids=batch["input_ids"][rows]).logits.argmax(-1)
        assert torch.equal(picks[rows], expected)
    other = module.other_teachers["b"](input_ids=batch["input_ids"]).logits.argmax(-1)
    assert not torch.equal(picks, other)  # the teachers differ, so the routing is seen


def test_routed_loss_is_the_token_weighted_loss_of_each_teachers_rows(routed):
    teachers, data = routed
    module = ready(SoftDistill(teacher=teachers, student=TINY_STUDENT), data)
    batch = mixed_batch(data)
    routed_targets = module.signal.distribution(module.run, batch)
    assert isinstance(routed_targets, Routed) and len(routed_targets.parts) == 2
    settings = {"divergence": module.divergence, "ce_weight": 0.5, "temperature": 2.0}
    whole = module.student_loss(batch["input_ids"], batch["labels"], routed_targets, **settings)
    total, tokens = 0.0, 0
    for rows, distribution in routed_targets.parts:
        part = module.student_loss(batch["input_ids"][rows], batch["labels"][rows], distribution, **settings)
        total, tokens = total + part["loss"] * part["tokens"], tokens + part["tokens"]
    assert int(whole["tokens"]) == int(tokens) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(whole["loss"], total / tokens)


def test_routing_to_one_teacher_twice_equals_that_teacher_alone(tmp_path, tiny_teacher_dir):
    """Both sources routed to the same model: the routed loss is the single teacher's over the whole batch."""
    first, second = two_sources(tmp_path)
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": tiny_teacher_dir}, sources={first: "a", second: "b"})
    data = DistillDataModule(corpus=[first, second], block_size=32, batch_size=8, val_fraction=0.25)
    several = ready(SoftDistill(teacher=teachers, student=TINY_STUDENT), data)
    single = ready(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), data)
    single.student.load_state_dict(several.student.state_dict())
    batch = mixed_batch(data)
    got = several.student_loss(batch["input_ids"], batch["labels"], several.signal.distribution(several.run, batch),
                               divergence=several.divergence, ce_weight=0.5)
    want = single.student_loss(batch["input_ids"], batch["labels"], single.signal.distribution(single.run, batch),
                               divergence=single.divergence, ce_weight=0.5)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)


def test_mixture_is_the_weighted_mixture_of_tempered_distributions(routed):
    teachers, data = routed
    mixed = Teachers(models=teachers.models, weights={"a": 3.0, "b": 1.0})
    module = ready(SoftDistill(teacher=mixed, student=TINY_STUDENT, temperature=2.0), data)
    batch = mixed_batch(data)
    logits = module.signal.distribution(module.run, batch)  # (B, T, V)
    za = module.teacher(input_ids=batch["input_ids"]).logits.double()
    zb = module.other_teachers["b"](input_ids=batch["input_ids"]).logits.double()
    expected = 0.75 * torch.softmax(za / 2, -1) + 0.25 * torch.softmax(zb / 2, -1)
    torch.testing.assert_close(torch.softmax(logits.double() / 2, -1), expected, rtol=1e-4, atol=1e-6)


def test_mixture_validation_scores_each_teacher_and_the_mixture(routed):
    from lightning_distill import metrics

    teachers, data = routed
    module = ready(SoftDistill(teacher=Teachers(models=teachers.models, weights={"a": 1.0, "b": 3.0}),
                               student=TINY_STUDENT), data)
    batch = mixed_batch(data)
    student, labels = module(batch["input_ids"])[:, :-1].float(), batch["labels"][:, 1:]
    got = module.signal.validation_metrics(module.run, batch, student, labels, 0)
    za = module.teacher(input_ids=batch["input_ids"]).logits
    zb = module.other_teachers["b"](input_ids=batch["input_ids"]).logits
    mixed = torch.log(0.25 * torch.softmax(za.float(), -1) + 0.75 * torch.softmax(zb.float(), -1))
    for suffix, logits in (("_a", za), ("_b", zb), ("", mixed)):
        for key, value in metrics.against_logits(student, logits[:, :-1], labels).items():
            torch.testing.assert_close(got[key + suffix], value, rtol=1e-4, atol=1e-5)


def test_per_teacher_validation_metrics_are_logged(routed, tmp_path):
    teachers, data = routed
    module = SoftDistill(teacher=teachers, student=TINY_STUDENT)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.validate(module, datamodule=data)
    logged = trainer.callback_metrics
    for name in ("a", "b"):
        for metric in ("kl", "agreement", "teacher_ppl"):
            assert f"val/{metric}_{name}" in logged
    # the run's KL is the token-weighted mean of each teacher's on its own blocks
    counts = {0: 0, 1: 0}
    for batch in data.val_dataloader():
        for source in (0, 1):
            counts[source] += int((batch["labels"][batch["source"] == source][:, 1:] != -100).sum())
    mean = (logged["val/kl_a"] * counts[0] + logged["val/kl_b"] * counts[1]) / (counts[0] + counts[1])
    torch.testing.assert_close(logged["val/kl"], mean, rtol=1e-4, atol=1e-6)
    assert logged["val/teacher_ppl_a"] != logged["val/teacher_ppl_b"]


def test_on_policy_prompt_files_are_graded_by_their_teachers(routed, tmp_path):
    teachers, data = routed
    files = []
    for name, text in (("code", "def add(a, b):"), ("prose", "The quick brown fox")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"prompt": text}) + "\n", encoding="utf-8")
        files.append(str(path))
    routing = Teachers(models=teachers.models, sources={**teachers.sources, files[0]: "a", files[1]: "b"})
    module = SoftDistill(teacher=routing, student=TINY_STUDENT,
                         on_policy=OnPolicy(lmbda=1.0, loss="sampled_token", prompts=files, max_new_tokens=6))
    ready(module, data)
    rollout = module.signal.rollout(module.run, next(iter(data.train_dataloader())))
    rows = dict(module.signal.scorer.rows(rollout))
    for name, file in (("a", files[0]), ("b", files[1])):
        assert [rollout["source_names"][i] for i in rows.get(name, torch.tensor([])).tolist()] == \
            [f for f in rollout["source_names"] if f == file]
    scores = module.signal.scorer.token_logprobs(module.run, rollout)  # (B, T)
    for name, teacher in (("a", module.teacher), ("b", module.other_teachers["b"])):
        if name in rows:
            part = {key: rollout[key][rows[name]] for key in ("input_ids", "attention_mask", "position_ids")}
            logits = teacher(**part).logits
            following = part["input_ids"].roll(-1, dims=1).unsqueeze(-1)
            expected = torch.log_softmax(logits.float(), -1).gather(-1, following).squeeze(-1)
            torch.testing.assert_close(scores[rows[name]], expected)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)  # an on-policy step over both teachers trains


def test_checkpoint_leaves_every_frozen_teacher_out(routed, tmp_path):
    teachers, data = routed
    module = SoftDistill(teacher=teachers, student=TINY_STUDENT)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith(("teacher.", "other_teachers."))]
    restored = SoftDistill.load_from_checkpoint(str(path))
    assert restored.several_teachers == teachers
    restored.configure_model()
    assert set(restored.other_teachers) == {"b"}


# ------------------------------------------------------------------------------------------------- refused
def test_a_store_from_another_teacher_is_refused_naming_both(routed, tmp_path, tiny_teacher_dir):
    teachers, data = routed
    labeller = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    store = write_labels(labeller, tmp_path / "labels_a", data=data, kind="topk", k=4)
    wrong = Teachers(models=teachers.models, sources=teachers.sources, labels={"b": store})
    trainer = tiny_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"teacher\.labels\.b=.*labelled by teacher .*another model"):
        trainer.fit(SoftDistill(teacher=wrong, student=TINY_STUDENT), datamodule=data)
    right = Teachers(models=teachers.models, sources=teachers.sources, labels={"a": store})
    module = SoftDistill(teacher=right, student=TINY_STUDENT)
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=data)  # its own store: trains


def test_a_store_that_cannot_feed_the_method_is_named_by_its_teacher(routed, tmp_path, tiny_teacher_dir):
    teachers, data = routed
    store = write_labels(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tmp_path / "top1", data=data,
                         kind="top1")
    named = Teachers(models=teachers.models, sources=teachers.sources, labels={"a": store})
    with pytest.raises(ValueError, match=r"teacher\.labels\.a='.*top1' is a 'top1' store; SoftDistill trains from"):
        tiny_trainer(tmp_path, max_steps=1).fit(SoftDistill(teacher=named, student=TINY_STUDENT), datamodule=data)


def test_teachers_of_different_tokenizers_are_refused_naming_both(tmp_path, tiny_teacher_dir,
                                                                  tiny_student_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other_tokenizer_teacher"
    AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_student_tokenizer_dir).save_pretrained(other)
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": str(other)}, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"teacher\.models\.b=.*another tokenizer.*teacher\.models\.a="):
        SoftDistill(teacher=teachers, student=TINY_STUDENT)


def test_an_unrouted_corpus_entry_is_refused(tmp_path, tiny_teacher_dir, second_tiny_teacher_dir):
    first, second = two_sources(tmp_path)
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": second_tiny_teacher_dir}, sources={first: "a"})
    data = DistillDataModule(corpus=[first, second], block_size=32, batch_size=8, val_fraction=0.25)
    with pytest.raises(ValueError, match=r"data\.corpus entries \[.*second\.jsonl'\] have no teacher"):
        tiny_trainer(tmp_path, max_steps=1).fit(SoftDistill(teacher=teachers, student=TINY_STUDENT), datamodule=data)


@pytest.mark.parametrize("build, message", [
    (lambda t: Teachers(models={"a": t}, sources={"x": "a"}), r"teacher\.models must be two or more named teachers"),
    (lambda t: Teachers(models={"a": t, "b": t}), r"exactly one rule"),
    (lambda t: Teachers(models={"a": t, "b": t}, sources={"x": "c"}),
     r"teacher\.sources\.x must be a teacher name \(a, b\), got 'c'"),
    (lambda t: Teachers(models={"a": t, "b": t}, weights={"a": 0.0}),
     r"teacher\.weights\.a must be a weight > 0, got 0\.0"),
    (lambda t: Teachers(models={"a-b": t, "c": t}, weights={"c": 1.0}),
     r"teacher\.models must be teacher names that are identifiers, got 'a-b'"),
])
def test_bad_teachers_are_refused_naming_the_field(tiny_teacher_dir, build, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_teacher_dir)


def test_methods_that_need_one_teacher_refuse_several(tiny_teacher_dir, second_tiny_teacher_dir):
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": second_tiny_teacher_dir}, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"teacher must be one teacher: CoDistill does not take several"):
        CoDistill(teacher=teachers, student=TINY_STUDENT)
    with pytest.raises(ValueError, match=r"mode='generate'"):
        HardDistill(teacher=teachers, student=TINY_STUDENT, mode="generate")
    with pytest.raises(ValueError, match=r"labels must be None with several teachers.*teacher\.labels"):
        SoftDistill(teacher=teachers, student=TINY_STUDENT, labels="somewhere")


def test_a_mixture_refuses_a_served_teacher(tiny_teacher_dir):
    teachers = Teachers(models={"a": tiny_teacher_dir, "b": "http://127.0.0.1:9"}, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"teacher\.weights=.*\['b'\].*do not hold"):
        SoftDistill(teacher=teachers, student=TINY_STUDENT)


def test_make_tiny_model_dir_seeds_differ(tmp_path):
    """The second teacher of these tests differs from the first in its weights, not its tokenizer."""
    one, two = make_tiny_model_dir(tmp_path / "one"), make_tiny_model_dir(tmp_path / "two", seed=1)
    assert (one / "tokenizer.json").read_bytes() == (two / "tokenizer.json").read_bytes()
    assert (one / "model.safetensors").read_bytes() != (two / "model.safetensors").read_bytes()
