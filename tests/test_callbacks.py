"""Callbacks and the W&B logger: the online/offline decision, sample tables, config logging, the exported student,
and a tiny offline W&B run of configs/soft.yaml whose run folder must hold the metrics, the config and the table."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_STUDENT, requires_builtin, small_data, tiny_trainer, write_labels
from transformers import AutoModelForCausalLM

from lightning_distill import DistillDataModule, HardDistill, SoftDistill, losses
from lightning_distill.backbone import tokenizer_fingerprint
from lightning_distill.callbacks import (
    DEFAULT_PROMPTS,
    ExportStudent,
    LabelWriter,
    LogConfig,
    OfflineFirstWandbLogger,
    SampleTable,
    has_wandb_credentials,
    wandb_mode,
)
from lightning_distill.labels import LabelStore
from lightning_distill.modules.base import VAL_METRICS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment with no W&B credentials and no WANDB_MODE: NETRC points at a missing file."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    return tmp_path


# ------------------------------------------------------------------------------------- online or offline
def test_wandb_mode_offline_without_credentials_online_with_them(no_credentials, monkeypatch):
    assert not has_wandb_credentials()
    assert wandb_mode() == "offline"
    assert wandb_mode(offline=True) == "offline"
    assert wandb_mode(offline=False) == "online"

    netrc = no_credentials / "netrc"
    netrc.write_text("machine example.org login user password other\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "offline"  # an entry for another host is not a W&B login
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode() == "online"  # what `wandb login` writes
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline"  # a self-hosted server needs its own entry
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() is None  # WANDB_MODE set: wandb reads it itself
    with pytest.raises(ValueError, match="offline"):
        wandb_mode(offline="yes")


def test_logger_decides_mode_at_creation_and_drops_log_model_offline(no_credentials):
    with pytest.warns(UserWarning, match="log_model"):
        logger = OfflineFirstWandbLogger(save_dir=str(no_credentials / "run"), log_model=True)
    assert logger.mode == "offline"
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["project"] == "lightning-distill"
    assert logger._log_model is False
    assert (no_credentials / "run").is_dir()
    assert logger._experiment is None  # nothing started (no wandb.init) until the first log
    assert OfflineFirstWandbLogger(save_dir=str(no_credentials), offline=False)._wandb_init["mode"] == "online"
    with pytest.raises(ValueError, match="project"):
        OfflineFirstWandbLogger(project="")


# ------------------------------------------------------------------------------------------- samples
def _trainer_stub(loggers=(), **kwargs):
    defaults = {"sanity_checking": False, "is_global_zero": True, "global_step": 7, "loggers": list(loggers),
                "callbacks": []}
    return SimpleNamespace(**{**defaults, **kwargs})


class _TableLogger:
    """Stands in for WandbLogger (SampleTable only calls log_table)."""

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def test_sample_table_arguments_are_checked():
    for bad in ({"every_n_validations": 0}, {"every_n_validations": True}, {"max_new_tokens": 0},
                {"prompts": []}, {"prompts": ["ok", ""]}, {"key": ""}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SampleTable(**bad)
    assert SampleTable().prompts == list(DEFAULT_PROMPTS)


def test_sample_table_every_n_validations_and_frozen_teacher_cache(tiny_teacher_dir, monkeypatch):
    import lightning_distill.callbacks as callbacks

    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    model.configure_model()
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda prompts, model, **kw: calls.append(model) or generate(
        prompts, model=model, **kw))
    logger = _TableLogger()
    monkeypatch.setattr(callbacks, "wandb_logger", lambda trainer: trainer.loggers[0] if trainer.loggers else None)
    table = SampleTable(every_n_validations=2, prompts=["def f(x):", "The"], max_new_tokens=3)

    table.on_validation_end(_trainer_stub(sanity_checking=True, loggers=[logger]), model)  # not counted
    for _ in range(4):
        table.on_validation_end(_trainer_stub(loggers=[logger]), model)
    assert table.validations == 4
    assert len(logger.tables) == 2  # validations 2 and 4
    key, columns, data = logger.tables[0]
    assert key == "samples" and columns == ["step", "prompt", "teacher", "student"]
    assert [row[:2] for row in data] == [[7, "def f(x):"], [7, "The"]]
    assert all(isinstance(row[2], str) and isinstance(row[3], str) for row in data)
    assert calls == ["student", "teacher", "student"]  # the frozen teacher's continuations are generated once

    calls.clear()
    SampleTable().on_validation_end(_trainer_stub(), model)  # no W&B logger: nothing generated
    assert calls == []


# -------------------------------------------------------------------------------------- config, export
def test_log_config_outside_the_cli_logs_nothing():
    logged = []
    logger = SimpleNamespace(log_hyperparams=logged.append)
    LogConfig().setup(_trainer_stub(loggers=[logger]), None, "fit")
    assert logged == []


def test_export_student_writes_a_loadable_folder(tiny_teacher_dir, tmp_path):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    model.configure_model()
    callback = ExportStudent(dirpath=str(tmp_path / "student"))
    callback.on_fit_end(_trainer_stub(), model)
    assert callback.exported == str(tmp_path / "student")
    assert AutoModelForCausalLM.from_pretrained(callback.exported).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="artifact_name"):
        ExportStudent(artifact_name="a b")


# ------------------------------------------------------------------------ a tiny offline W&B run, end to end
def read_wandb_records(path: Path):
    """Yield the protobuf records of a ``.wandb`` run file (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header ``crc32, length, type``; type 1 is a whole record, 2/3/4 its first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    pos, parts, block = 7, [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_wandb_offline_run_of_soft_config_holds_metrics_config_table_and_artifact(tiny_teacher_dir, tmp_path):
    """``lightning-distill fit --config configs/soft.yaml`` shrunk to a tiny model, with no W&B credentials and
    no WANDB_MODE: the logger must go offline by itself (online would block on the network that this machine
    lacks), and the offline run must hold every metric, the resolved config and two sample tables."""
    run = tmp_path / "run"
    override = tmp_path / "tiny.yaml"
    override.write_text(json.dumps({  # JSON is YAML; only the sizes change, the logger and callbacks are soft.yaml's
        "trainer": {"accelerator": "cpu", "max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "default_root_dir": str(run),
                    "logger": {"init_args": {"save_dir": str(run)}}},
        "model": {"init_args": {"teacher": tiny_teacher_dir, "student": TINY_STUDENT}},
        "data": {"block_size": 32, "max_documents": 8, "val_fraction": 0.25},
    }))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL")}
    env.update(NETRC=str(tmp_path / "missing-netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(REPO / "configs" / "soft.yaml"),
               "--config", str(override),
               # a second ExportStudent that also logs the student as a W&B artifact (opt-in)
               "--trainer.callbacks+=lightning_distill.callbacks.ExportStudent",
               "--trainer.callbacks.dirpath", str(tmp_path / "artifact_student"),
               "--trainer.callbacks.log_artifact", "true"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run, found {list((run / 'wandb').iterdir())}"
    records = list(read_wandb_records(next(runs[0].glob("run-*.wandb"))))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    keys = set().union(*history)
    val = [f"{split}/{name}" for split in ("val", "val_ood") for name in (*VAL_METRICS, "ppl", "teacher_ppl")]
    expected = {"train/loss", "train/kd", "train/ce", "train/tokens_per_sec", "lr-AdamW/pg1", *val}
    assert expected <= keys, f"missing metrics: {sorted(expected - keys)}"

    config = {}
    for r in records:
        updates = r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update
        config.update({item.key: json.loads(item.value_json) for item in updates} if r.WhichOneof(
            "record_type") in ("run", "config") else {})
    assert config["config"]["trainer"]["max_steps"] == 4  # the resolved CLI config
    assert config["config"]["model"]["class_path"] == "lightning_distill.SoftDistill"
    assert config["loss"] == "forward_kl" and config["block_size"] == 32  # save_hyperparameters of both modules

    tables = [h for h in history if h.get("samples/_type") == "table-file"]
    assert len(tables) == 2, "one sample table per validation (every_n_validations: 1, two validations)"
    for logged in tables:
        table = json.loads((runs[0] / "files" / logged["samples/path"]).read_text())
        assert table["columns"] == ["step", "prompt", "teacher", "student"]
        assert [row[1] for row in table["data"]] == list(DEFAULT_PROMPTS)
        assert all(isinstance(row[2], str) and isinstance(row[3], str) for row in table["data"])

    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type
                 == "model"]
    assert [a.name for a in artifacts] == [f"student-{runs[0].name.rsplit('-', 1)[1]}"]
    assert AutoModelForCausalLM.from_pretrained(run / "student").config.num_hidden_layers == 2  # soft.yaml's export
    assert (run / "config.yaml").is_file()


# --------------------------------------------------------------------------------------- LabelWriter (labels)
def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def soft_teacher(tiny_teacher_dir):
    return SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)


def test_label_writer_stores_both_splits_with_a_full_manifest(soft_teacher, tmp_path):
    path = tmp_path / "topk"
    write_labels(soft_teacher, path, k=8, value_dtype="float32")
    data = small_data()
    data.set_tokenizer(soft_teacher.tokenizer)
    data.setup()
    found = manifest(path)
    assert found["complete"] and found["kind"] == "topk" and found["k"] == 8
    assert found["teacher"] == soft_teacher.teacher_name and found["vocab_size"] == 384
    assert found["tokenizer"] == tokenizer_fingerprint(soft_teacher.tokenizer)
    assert found["corpus"] == data.corpus_fingerprint() and found["block_size"] == 32
    assert found["record"] == [["ids", "<u2", [32, 8]], ["logprobs", "<f4", [32, 8]], ["covered", "<f4", [32]]]
    assert {s: v["blocks"] for s, v in found["splits"].items()} == {"train": 66, "validation": 10}
    assert [s["blocks"] for s in found["splits"]["train"]["shards"]] == [16, 16, 16, 16, 2]
    # what is stored is the teacher's top-k at every position of the right block
    store = LabelStore(path)
    for split, blocks in (("train", data.train_blocks), ("validation", data.val_blocks)):
        index = len(blocks) - 1
        ids, logprobs = losses.topk_teacher(soft_teacher.teacher_logits(blocks[index : index + 1])[0], 8)
        stored = store.split(split)[index]
        assert torch.equal(stored["topk_ids"], ids)
        torch.testing.assert_close(stored["topk_logprobs"], logprobs, atol=1e-5, rtol=1e-5)


def test_label_writer_resumes_and_never_rewrites_silently(soft_teacher, tmp_path, monkeypatch):
    once = tmp_path / "once"
    write_labels(soft_teacher, once, kind="top1", splits=["train"])
    path = tmp_path / "resumed"
    write_labels(soft_teacher, path, kind="top1", splits=["train"], trainer_kwargs={"limit_predict_batches": 9})
    assert not manifest(path)["complete"]  # interrupted after 36 blocks: 2 shards of 16 written
    assert len(list(path.glob("train-*.npy"))) == 2
    calls = []
    real = SoftDistill.predict_step
    monkeypatch.setattr(SoftDistill, "predict_step", lambda self, batch, *a: calls.append(batch) or real(
        self, batch, *a))
    write_labels(soft_teacher, path, kind="top1", splits=["train"])
    assert sum(len(b["block_idx"]) for b in calls) == 66 - 32  # written shards are not recomputed
    assert manifest(path)["complete"]
    for shard in sorted(once.glob("train-*.npy")):
        assert (path / shard.name).read_bytes() == shard.read_bytes()  # same store as in one go
    with pytest.raises(FileExistsError, match="never rewritten silently"):
        write_labels(soft_teacher, path, kind="top1", splits=["train"])
    write_labels(soft_teacher, path, kind="top1", splits=["train"], overwrite=True)
    assert manifest(path)["complete"]


def test_label_writer_sampled_and_generate_kinds(tiny_teacher_dir, soft_teacher, tmp_path):
    path = tmp_path / "sampled"
    write_labels(soft_teacher, path, kind="sampled", num_samples=5, temperature=2.0, splits=["validation"])
    block = LabelStore(path).split("validation")[3]
    assert block["sample_ids"].shape == (32, 5) and torch.allclose(block["sample_weights"].sum(-1), torch.ones(32))
    assert manifest(path)["temperature"] == 2.0 and "train" not in manifest(path)["splits"]

    hard = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="generate", prompt_tokens=8,
                       max_new_tokens=4)
    path = tmp_path / "generate"
    write_labels(hard, path, kind="generate", splits=["validation"])
    assert manifest(path)["generation"]["prompt_tokens"] == 8
    data = small_data()
    data.set_tokenizer(hard.tokenizer)
    data.setup()
    expected = hard.generate_ids(data.val_blocks[:2, :8])
    assert torch.equal(torch.stack([LabelStore(path).split("validation")[i]["continuation"] for i in range(2)]),
                       expected)
    with pytest.raises(ValueError, match="kind='generate' does not fit SoftDistill"):
        write_labels(soft_teacher, tmp_path / "bad", kind="generate")


@pytest.mark.parametrize(("kwargs", "name"), [({"kind": "logits"}, "kind"), ({"k": 0}, "k"),
                                              ({"num_samples": 70000}, "num_samples"), ({"temperature": 0},
                                              "temperature"), ({"value_dtype": "int8"}, "value_dtype"),
                                              ({"splits": ["test"]}, "splits"), ({"shard_blocks": 0}, "shard_blocks")])
def test_label_writer_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LabelWriter("somewhere", **kwargs)


def test_label_writer_needs_the_data_module(soft_teacher, tmp_path):
    trainer = tiny_trainer(tmp_path, callbacks=[LabelWriter(str(tmp_path / "x"))])
    with pytest.raises(ValueError, match="DistillDataModule"):
        trainer.predict(soft_teacher, dataloaders=[[{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]])


DDP_LABELLING = '''
import json, sys
import lightning as L
from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.callbacks import LabelWriter

teacher, store, report = sys.argv[1:4]
model = SoftDistill(teacher=teacher, student={"from_teacher": {"layers": 2}})
data = DistillDataModule(block_size=32, batch_size=4, max_documents=2, val_fraction=0.5, seed=0)
blocks = []
class Count(L.Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, *args):
        blocks.extend(batch["block_idx"].tolist())
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[LabelWriter(store, kind="top1", shard_blocks=16), Count()])
trainer.predict(model, datamodule=data)
with open(f"{report}.{trainer.global_rank}", "w") as f:
    json.dump(blocks, f)
'''


def test_two_ranks_label_disjoint_shares(tiny_teacher_dir, tmp_path):
    """Under DDP each rank labels its own shards (no block twice, none missed) and rank zero completes the store."""
    script = tmp_path / "label_ddp.py"
    script.write_text(DDP_LABELLING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    store, report = tmp_path / "store", tmp_path / "blocks"
    done = subprocess.run([sys.executable, str(script), tiny_teacher_dir, str(store), str(report)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
    assert shares[0] and shares[1]
    # train blocks 0-65 then validation 0-9: 5 + 1 shards, alternating over the two ranks
    assert sorted(shares[0] + shares[1]) == sorted([*range(66), *range(10)])
    assert manifest(store)["complete"]
    LabelStore(store)  # every checksum verifies


def test_label_then_train_with_the_tiny_cli_configs(tiny_teacher_dir, tmp_path, monkeypatch):
    """``predict`` with configs/tiny/labels/label_soft.yaml writes the store that ``fit`` with
    configs/tiny/labels/soft_cached.yaml trains from, the teacher never loaded in the second run."""
    from lightning_distill import backbone
    from lightning_distill.cli import main

    monkeypatch.chdir(tmp_path)
    configs = REPO / "configs" / "tiny" / "labels"
    main(["predict", "--config", str(configs / "label_soft.yaml"), "--model.init_args.teacher", tiny_teacher_dir])
    assert manifest(tmp_path / "labels" / "tiny-topk")["complete"]
    loaded = []
    real = backbone.load_model
    monkeypatch.setattr("lightning_distill.modules.base.load_model", lambda *a, **k: loaded.append(a) or real(
        *a, **k))
    main(["fit", "--config", str(configs / "soft_cached.yaml"), "--model.init_args.student", tiny_teacher_dir])
    assert loaded == []  # the student is named: no teacher is loaded, not even to build it


@pytest.mark.integration
@requires_builtin
def test_label_the_builtin_corpus_with_the_embedded_teacher_then_train_without_it(tmp_path):
    """The issue's path end to end on a slice of the built-in corpus: label once (top-32, fp16: under 140 bytes per
    token on disk), then train a student from the store with the teacher absent from memory."""
    data = {"max_documents": 2, "val_fraction": 0.5, "block_size": 64, "batch_size": 4, "seed": 6}  # 7 + 1 blocks
    path = tmp_path / "smollm2-topk32"
    writer = LabelWriter(str(path), kind="topk", k=32)
    teacher = SoftDistill(teacher="builtin:smollm2-135m-instruct", student={"from_teacher": {"layers": 1}})
    tiny_trainer(tmp_path, callbacks=[writer]).predict(teacher, datamodule=DistillDataModule(**data))
    found = manifest(path)
    tokens = sum(split["blocks"] for split in found["splits"].values()) * 64
    assert found["complete"] and found["vocab_size"] == 49152 and found["bytes_per_block"] == 64 * 130
    assert sum(f.stat().st_size for f in path.iterdir()) / tokens < 140

    model = SoftDistill(teacher="builtin:smollm2-135m-instruct", student={"from_teacher": {"layers": 2}},
                        labels=str(path))
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, DistillDataModule(**data))
    assert model.teacher is None and not model.needs_teacher()  # only built the student, then dropped
    assert torch.isfinite(trainer.callback_metrics["train/kd"]) and 0 <= trainer.callback_metrics["val/agreement"] <= 1
