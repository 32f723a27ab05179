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
from conftest import TINY_STUDENT
from transformers import AutoModelForCausalLM

from lightning_distill import SoftDistill
from lightning_distill.callbacks import (
    DEFAULT_PROMPTS,
    ExportStudent,
    LogConfig,
    OfflineFirstWandbLogger,
    SampleTable,
    has_wandb_credentials,
    wandb_mode,
)

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
    logged = ("ce", "kl", "agreement", "teacher_ce", "ppl", "teacher_ppl")  # on-policy metrics: eval_new_tokens > 0
    val = [f"{split}/{name}" for split in ("val", "val_ood") for name in logged]
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
