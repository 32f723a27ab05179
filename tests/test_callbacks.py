"""Callbacks and the W&B logger: the online/offline decision, sample tables, config logging, the exported student,
a tiny offline W&B run of configs/soft.yaml whose run folder must hold the metrics, the config and the table; a
CE-only run's teacher kept off the accelerator while it trains; CPU memory reuse (checked in fresh processes, since
its effect is process-wide)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_STUDENT, requires_gpu, tiny_data, tiny_trainer
from transformers import AutoModelForCausalLM

from lightning_distill import Features, HardDistill, OnPolicy, SoftDistill, callbacks
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


# ------------------------------------------------------------------------------------ idle teacher placement
IDLE = torch.device("meta")  # on a CPU-only machine the idle place is told apart from the device by a spy


class Probe(L.Callback):
    """Where the spied teacher was last sent, seen at each training and validation batch."""

    def __init__(self, moves: list[torch.device]) -> None:
        self.moves, self.seen = moves, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("train", self.moves[-1] if self.moves else None))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("validation", self.moves[-1] if self.moves else None))


def fit_with_spy(model: SoftDistill, tmp_path, monkeypatch) -> tuple[list[torch.device], Probe]:
    monkeypatch.setattr(callbacks, "IDLE_DEVICE", IDLE)
    model.configure_model()  # the Trainer's call is then a no-op: the spy stays on this teacher
    moves: list[torch.device] = []
    monkeypatch.setattr(model.teacher, "to", lambda device: moves.append(torch.device(device)) or model.teacher)
    probe = Probe(moves)
    tiny_trainer(tmp_path, max_steps=2, val_check_interval=1, limit_val_batches=1, callbacks=[probe]).fit(
        model, tiny_data())
    return moves, probe


def test_a_ce_only_run_trains_with_its_teacher_off_the_device(tiny_teacher_dir, tmp_path, monkeypatch):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    moves, probe = fit_with_spy(model, tmp_path, monkeypatch)
    cpu = torch.device("cpu")
    assert probe.seen == [("train", IDLE), ("validation", cpu), ("train", IDLE), ("validation", cpu)]
    assert moves[-1] == cpu  # back where it was when the fit ends
    assert model.teacher is not None  # still there for validation and generation


@pytest.mark.parametrize("kwargs", [{"ce_weight": 0.5}, {"ce_weight": 1.0, "features": Features(weight=1.0)}])
def test_a_run_that_asks_its_teacher_keeps_it_in_place(tiny_teacher_dir, tmp_path, monkeypatch, kwargs):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, **kwargs)
    moves, probe = fit_with_spy(model, tmp_path, monkeypatch)
    assert moves == [] and len(probe.seen) == 4


def test_the_decision(tiny_teacher_dir):
    ce_only = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    assert not callbacks.teacher_idle_in_training(ce_only)  # no models yet
    ce_only.configure_model()
    assert callbacks.teacher_idle_in_training(ce_only)
    on_policy = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0,
                            on_policy=OnPolicy(lmbda=0.5))
    on_policy.configure_model()
    assert not callbacks.teacher_idle_in_training(on_policy)
    top1 = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, mode="top1")
    top1.configure_model()
    assert not callbacks.teacher_idle_in_training(top1)  # its steps ask the teacher (a method that does not say)


@pytest.mark.gpu
@requires_gpu
def test_on_cuda_the_teacher_is_on_the_cpu_during_training_steps(tiny_teacher_dir, tmp_path):
    class Where(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(("train", next(pl_module.teacher.parameters()).device.type))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.seen.append(("validation", next(pl_module.teacher.parameters()).device.type))

    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, ce_weight=1.0)
    where = Where()
    L.Trainer(accelerator="cuda", devices=1, max_steps=2, val_check_interval=1, limit_val_batches=1, logger=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path), callbacks=[where]).fit(model, tiny_data())
    assert where.seen == [("train", "cpu"), ("validation", "cuda"), ("train", "cpu"), ("validation", "cuda")]
    assert next(model.teacher.parameters()).device.type == "cuda"


@pytest.mark.gpu
@requires_gpu
def test_on_cuda_every_idle_teacher_is_on_the_cpu_during_training_steps(tiny_teacher_dir, second_tiny_teacher_dir,
                                                                        tmp_path):
    from lightning_distill import Teachers

    class Where(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(("train", next(pl_module.other_teachers["b"].parameters()).device.type))

    teachers = Teachers(models={"a": tiny_teacher_dir, "b": second_tiny_teacher_dir}, weights={"a": 1.0, "b": 1.0})
    model = SoftDistill(teacher=teachers, student=TINY_STUDENT, ce_weight=1.0)
    where = Where()
    L.Trainer(accelerator="cuda", devices=1, max_steps=2, limit_val_batches=0, logger=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path), callbacks=[where]).fit(model, tiny_data())
    assert where.seen == [("train", "cpu"), ("train", "cpu")]
    assert next(model.other_teachers["b"].parameters()).device.type == "cuda"


# ---------------------------------------------------------------------------------------- CPU memory reuse
PROBE = """
import json, resource, sys, torch
from lightning_distill import callbacks
applied = callbacks.reuse_freed_memory() if sys.argv[1] == "on" else False
faults = []
for _ in range(8):  # the same 256 MiB buffer, allocated, touched and freed eight times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": callbacks.reuse_freed_memory() if applied else None,
                  "faults": faults}))
"""


def malloc_probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 2**28 // 4096  # 256 MiB in 4 KiB pages
    off, on = malloc_probe("off"), malloc_probe("on")
    assert min(off["faults"][2:]) > pages // 2  # glibc maps a fresh block for every large tensor: pages fault again
    assert on["applied"] and on["again"]  # idempotent
    # the heap grows over the first few rounds (how many depends on what else the process allocated); then the
    # freed block is reused: no round of the last four faults its pages in again
    assert max(on["faults"][4:]) < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_environment_turns_it_off():
    assert malloc_probe("on", LIGHTNING_DISTILL_REUSE_MEMORY="0")["applied"] is False


def test_memory_reuse_is_opt_in_and_a_cpu_trainer_applies_it_once(tiny_teacher_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(callbacks, "_MALLOC", {})
    monkeypatch.setattr(callbacks, "reuse_freed_memory", lambda: calls.append(1) or False)  # not applied here
    plain = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    plain.fit(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tiny_data())
    assert not any(isinstance(c, callbacks.ReuseFreedMemory) for c in plain.callbacks) and calls == []  # not asked
    asked = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[callbacks.ReuseFreedMemory()])
    asked.fit(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tiny_data())
    assert calls == [1]


def test_the_cli_owns_its_process_and_applies_memory_reuse(tiny_teacher_dir, tmp_path):
    from lightning_distill.cli import DistillCLI

    cli = DistillCLI(args=["--model=lightning_distill.SoftDistill", f"--model.teacher={tiny_teacher_dir}",
                           "--model.student.from_teacher.layers=2", "--data.corpus=builtin:python-docs",
                           "--data.max_documents=4", f"--trainer.default_root_dir={tmp_path}",
                           "--trainer.logger=false"], run=False)
    assert sum(isinstance(c, callbacks.ReuseFreedMemory) for c in cli.trainer.callbacks) == 1
