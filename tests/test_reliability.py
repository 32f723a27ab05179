"""Nothing lost, nothing silently wrong (issue #11): a run stopped at any step and resumed from its checkpoint ends
where the uninterrupted run ends, for every method, mid-epoch and at an epoch boundary, on 1 rank and on 2 DDP CPU
ranks; Ctrl+C during ``lightning-distill fit`` saves a checkpoint and a partial student, and the run resumes from
it; a checkpoint loads and exports with the teacher's folder gone. Issue #23: SIGTERM saves and exits 143; a rerun
never overwrites an earlier run and ``last`` is the latest step; a non-finite loss stops before it reaches the
weights; what the command line says wins over a checkpoint file; a truncated corpus chunk is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_STUDENT, make_tiny_model_dir, prepared_corpus, requires_litdata
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from lightning_distill import (
    CoDistill,
    DistillDataModule,
    Generation,
    HardDistill,
    Optimization,
    Performance,
    Schedule,
    SoftDistill,
)
from lightning_distill.cli import load_checkpoint

ROOT = Path(__file__).parents[1]
STEPS = 8  # two epochs of 4 batches (the last one a single block)


# --------------------------------------------------------------------------------------------- helpers
def small_corpus(folder: Path) -> str:
    """A JSONL corpus whose train split packs into 13 blocks of 16 tokens: 4 batches per epoch, the last of 1 block."""
    from pydoc_data.topics import topics

    texts = [topics[name][:72] for name in sorted(topics)[:8]]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def data(corpus: str) -> DistillDataModule:
    return DistillDataModule(corpus=corpus, block_size=16, batch_size=4, val_fraction=0.25, seed=3)


def make(method: str, teacher: str, folder: Path | None = None) -> L.LightningModule:
    """A tiny model of each method; HardDistill samples its teacher's continuations (the random state must be
    restored on resume), kept in ``folder`` (each run its own)."""
    common = {"performance": Performance(teacher_dtype=None), "optimization": Optimization(warmup_steps=2)}
    if method == "soft":
        return SoftDistill(teacher=teacher, student=TINY_STUDENT, ce_weight=0.3, **common)
    if method == "hard":
        generation = Generation(prompt_tokens=8, max_new_tokens=6, do_sample=True,
                                cache_dir=str((folder or Path(".")) / "generations"))
        return HardDistill(teacher=teacher, student=TINY_STUDENT, mode="generate", generation=generation, **common)
    return CoDistill(teacher=teacher, student=TINY_STUDENT, schedule=Schedule(kind="gated", gate_threshold=99.0,
                                                                              ramp_steps=3),
                     stale_every=3, mutual_weight=0.1, teacher_learning_rate=1e-3, **common)


class Record(L.Callback):
    """Records the blocks of every training batch, and raises at ``stop_at`` (a crash after a finished step)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.blocks = stop_at, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.blocks.append(batch["block_idx"].tolist())
        if trainer.global_step == self.stop_at:
            raise RuntimeError(f"killed at step {self.stop_at}")


def trainer_for(folder: Path, record: Record, **overrides) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "limit_val_batches": 1,
              "val_check_interval": 3, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
              "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
              "default_root_dir": str(folder), "deterministic": True,
              "callbacks": [record, OnExceptionCheckpoint(str(folder), "interrupted")]}
    return L.Trainer(**{**kwargs, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("teacher.")
            or model.trains_teacher}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher_dir, corpus, tmp_path_factory):
    """Per method: the weights and batch order of the run that never stopped (computed once)."""
    runs = {}

    def run(method: str):
        if method not in runs:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(method)
            model, record = make(method, tiny_teacher_dir, folder), Record()
            trainer_for(folder, record).fit(model, data(corpus))
            runs[method] = weights(model), record.blocks
        return runs[method]

    return run


# ------------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("method,stop_at", [("soft", 2), ("soft", 4), ("hard", 2), ("hard", 6), ("co", 4), ("co", 5)])
def test_kill_and_resume_ends_where_the_uninterrupted_run_ends(method, stop_at, tiny_teacher_dir, corpus,
                                                              uninterrupted, tmp_path):
    """Step 4 ends the first epoch (4 batches), 2, 5 and 6 are mid-epoch; 5 is past CoDistill's stale refresh."""
    expected, order = uninterrupted(method)
    torch.manual_seed(0)
    first = Record(stop_at)
    with pytest.raises(RuntimeError, match="killed"):
        trainer_for(tmp_path, first).fit(make(method, tiny_teacher_dir, tmp_path), data(corpus))
    checkpoint = tmp_path / "interrupted.ckpt"
    assert checkpoint.is_file()
    torch.manual_seed(123)  # the resumed run must not depend on the process's random state
    resumed, second = make(method, tiny_teacher_dir, tmp_path), Record()
    trainer_for(tmp_path, second).fit(resumed, data(corpus), ckpt_path=str(checkpoint))
    assert first.blocks + second.blocks == order  # exactly the batches the uninterrupted run saw, in order
    assert max_difference(weights(resumed), expected) <= 1e-6


@pytest.mark.parametrize("every", [3, None], ids=["every_n_train_steps", "after_validation"])
def test_resume_from_a_periodic_checkpoint(every, tiny_teacher_dir, corpus, uninterrupted, tmp_path):
    """``ModelCheckpoint`` checkpoints written in on_train_batch_end (``every_n_train_steps``) and after a
    mid-epoch validation (the trainers here validate every 3 steps) resume exactly."""
    expected, order = uninterrupted("soft")
    saver = ModelCheckpoint(str(tmp_path / "ckpt"), every_n_train_steps=every, save_top_k=-1, filename="{step}")
    torch.manual_seed(0)
    trainer_for(tmp_path, Record(), callbacks=[saver]).fit(make("soft", tiny_teacher_dir), data(corpus))
    resumed, second = make("soft", tiny_teacher_dir), Record()
    trainer_for(tmp_path, second).fit(resumed, data(corpus), ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert second.blocks == order[3:]
    assert max_difference(weights(resumed), expected) <= 1e-6


def test_kill_and_resume_on_two_ddp_cpu_ranks(tiny_teacher_dir, corpus, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("resume_ddp_worker.py")
    done = subprocess.run([sys.executable, str(worker), tiny_teacher_dir, corpus, str(tmp_path), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["global_step"] == 6 and report["batches"] == 6
    assert report["same_batches"]  # on both ranks
    assert report["max_difference"] <= 1e-6


# ------------------------------------------------------------------------------- self-contained checkpoints
@pytest.mark.parametrize("method", ["soft", "hard", "co"])
def test_checkpoint_loads_and_exports_with_the_teacher_folder_gone(method, corpus, tmp_path):
    teacher = str(make_tiny_model_dir(tmp_path / "teacher"))
    model = make(method, teacher, tmp_path)
    trainer = trainer_for(tmp_path, Record(), max_steps=2, limit_val_batches=0)
    trainer.fit(model, data(corpus))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    shutil.rmtree(teacher)

    loaded = load_checkpoint(str(path))  # what `lightning-distill export` does
    assert type(loaded) is type(model)
    assert max_difference(weights(loaded), weights(model)) == 0
    assert loaded.tokenizer("def f(x):").input_ids == model.tokenizer("def f(x):").input_ids
    out = loaded.export(str(tmp_path / "student"))
    assert (Path(out) / "config.json").is_file() and (Path(out) / "tokenizer.json").is_file()
    if method == "co":  # its teacher is trained and checkpointed: it goes on training without the folder
        trainer_for(tmp_path, Record(), max_steps=3, limit_val_batches=0).fit(loaded, data(corpus),
                                                                              ckpt_path=str(path))
        return
    with pytest.raises(ValueError, match=r"no such folder.*--model\.init_args\.teacher NEW_PATH"):
        trainer_for(tmp_path, Record(), max_steps=3).fit(loaded, data(corpus), ckpt_path=str(path))
    moved = str(make_tiny_model_dir(tmp_path / "moved"))  # the same teacher (same seed), somewhere else
    again = type(model).load_from_checkpoint(str(path), teacher=moved)
    trainer_for(tmp_path, Record(), max_steps=3, limit_val_batches=0).fit(again, data(corpus), ckpt_path=str(path))
    assert again.trainer.global_step == 3


# ----------------------------------------------------------------------------------------- Ctrl+C in the CLI
def interruptible_config(folder: Path, teacher: str, corpus: str) -> Path:
    """The tiny SoftDistill config with the recipes' safety net: last.ckpt (also on an interrupt), graceful Ctrl+C,
    export (partial on an interrupt), an offline W&B run."""
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "soft.yaml").read_text())
    config["trainer"].update(max_steps=100_000, enable_checkpointing=True, default_root_dir=str(folder),
                             logger={"class_path": "lightning_distill.callbacks.OfflineFirstWandbLogger",
                                     "init_args": {"project": "reliability", "save_dir": str(folder)}},
                             callbacks=[
                                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                  "init_args": {"dirpath": str(folder / "checkpoints"), "every_n_train_steps": 2,
                                                "save_last": True, "save_on_exception": True}},
                                 {"class_path": "lightning_distill.callbacks.GracefulInterrupt"},
                                 {"class_path": "lightning_distill.callbacks.ExportStudent",
                                  "init_args": {"dirpath": str(folder / "student")}}])
    config["model"]["init_args"]["teacher"] = teacher
    config["data"].update(corpus=corpus, block_size=16, max_documents=None)
    path = folder / "interruptible.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_fit(config: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``lightning-distill fit --config CONFIG`` from this checkout (W&B offline)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return [sys.executable, "-m", "lightning_distill", "fit", "--config", str(config)], env


def interrupted(command: list[str], env: dict[str, str], folder: Path, sig: int) -> tuple[int, str]:
    """Start ``command`` in ``folder``, send it ``sig`` once its first ``checkpoints/last.ckpt`` exists; its exit
    status and output."""
    run = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), run.communicate(timeout=60)[0][-3000:] if run.poll() is not None else "no checkpoint"
    run.send_signal(sig)
    output = run.communicate(timeout=120)[0]
    return run.returncode, output


def test_ctrl_c_during_cli_fit_saves_and_the_run_resumes(tiny_teacher_dir, corpus, tmp_path):
    command, env = cli_fit(interruptible_config(tmp_path, tiny_teacher_dir, corpus))
    code, output = interrupted(command, env, tmp_path, signal.SIGINT)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == 1, output[-3000:]  # an interrupt, not a finished run
    assert "stopping after this step" in output
    saved = torch.load(last, weights_only=False)
    step = saved["global_step"]
    assert step >= 2 and "KeyboardInterrupt was raised" in output  # ModelCheckpoint(save_on_exception=True)
    partial = json.loads((tmp_path / "student" / "PARTIAL").read_text())
    assert partial["step"] == step and "KeyboardInterrupt" in partial["reason"]
    run_id = saved["lightning_distill"]["wandb_run_id"]
    assert run_id

    target = step + 2 + step % 2  # even: the every-2-steps schedule writes the final last.ckpt
    resumed = subprocess.run([*command, "--ckpt_path", "last", "--trainer.max_steps", str(target)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=False)["global_step"] == target
    assert not (tmp_path / "student" / "PARTIAL").exists()  # the finished run's export replaced the partial one
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # one W&B run, continued


# ------------------------------------------------------------------ nothing silently wrong, part two (issue #23)
def test_sigterm_saves_like_ctrl_c_exits_143_and_a_rerun_never_overwrites(tiny_teacher_dir, corpus, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGTERM (a scheduler's pre-emption) stops after the step under way with a checkpoint and a partial student,
    and the exit status says so (143 = 128 + SIGTERM, not 0); the same command again without --ckpt_path is refused
    instead of overwriting that run; ``last`` is the checkpoint of the latest step, not the newest file."""
    from lightning_distill.cli import SIGTERM_EXIT, last_checkpoint, main

    config = interruptible_config(tmp_path, tiny_teacher_dir, corpus)
    command, env = cli_fit(config)
    code, output = interrupted(command, env, tmp_path, signal.SIGTERM)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == SIGTERM_EXIT == 143, output[-3000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    step = torch.load(last, weights_only=False)["global_step"]
    partial = json.loads((tmp_path / "student" / "PARTIAL").read_text())
    assert step >= 2 and partial["step"] == step and "SIGTERM" in partial["reason"]

    student = {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])  # the same command again, without --ckpt_path
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "would overwrite an earlier run's results" in error
    assert f"step {step}" in error and "--ckpt_path last" in error
    assert {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()} == student  # untouched

    early = tmp_path / "checkpoints" / "last-v1.ckpt"  # a newer file of an earlier step (a rerun that started over)
    saved = torch.load(last, weights_only=False)
    torch.save({**saved, "global_step": 1}, early)
    assert early.stat().st_mtime >= last.stat().st_mtime
    assert last_checkpoint(yaml.safe_load(config.read_text())) == str(last)


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_weights(tiny_teacher_dir, corpus, tmp_path):
    """learning_rate 1e12 makes step 2's loss NaN: the run stops before that step's update, with a ValueError that
    says what happened; the checkpoint and the exported (partial) student hold step 1's weights, all finite."""
    from lightning_distill.callbacks import ExportStudent
    from lightning_distill.modules.base import NonFiniteLossError

    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT,
                        optimization=Optimization(learning_rate=1e12, warmup_steps=0))
    saver = ModelCheckpoint(str(tmp_path / "ckpt"), save_last=True, save_on_exception=True)
    export = ExportStudent(str(tmp_path / "student"))
    trainer = trainer_for(tmp_path, Record(), callbacks=[saver, export], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite in step 2.*which stay those of step 1.*"
                                                 r"learning_rate=1e\+12"):
        trainer.fit(model, data(corpus))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1 == json.loads((tmp_path / "student" / "PARTIAL").read_text())["step"]
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "student" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_overrides_win_over_a_checkpoint_file_and_what_cannot_apply_is_refused(tiny_teacher_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """``--ckpt_path FILE`` as ``last``: the teacher's new place and a new learning rate given on the command line
    are used (the teacher's old folder is gone; the resumed optimizer runs at the new peak); another method or a
    student of another depth stops before any work, naming the setting."""
    from lightning_distill.cli import main

    monkeypatch.chdir(tmp_path)
    teacher = shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "soft.yaml").read_text())
    config["trainer"].update(enable_checkpointing=True, limit_val_batches=0, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}}])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    fit = ["fit", "--config", str(tmp_path / "run.yaml")]
    main([*fit, "--model.init_args.teacher", str(teacher)])
    first = tmp_path / "checkpoints" / "step-2.ckpt"
    shutil.copy(tmp_path / "checkpoints" / "last.ckpt", first)
    moved = shutil.move(teacher, tmp_path / "moved")
    main([*fit, "--ckpt_path", str(first), "--model.init_args.teacher", str(moved), "--trainer.max_steps", "3",
          "--model.init_args.optimization.learning_rate", "0.5"])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    assert saved["hyper_parameters"]["optimization"]["learning_rate"] == 0.5
    assert {group["initial_lr"] for group in saved["optimizer_states"][0]["param_groups"]} == {0.5}
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.5, 0.5]

    for extra, message in (
        (["--model", "lightning_distill.HardDistill"], r"written by SoftDistill, and this run's model.class_path is "
                                                        r"'lightning_distill.HardDistill'"),
        (["--model.init_args.student.from_teacher.layers", "3"], r"its student has num_hidden_layers=2, this run's "
                                                                 r"student=.* gives 3"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*fit, "--ckpt_path", str(first), "--model.init_args.teacher", str(moved), *extra])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in error
        assert re.search(message, error), error


@requires_litdata
def test_a_truncated_chunk_of_a_prepared_corpus_is_refused(tiny_teacher_dir, tmp_path):
    """corpus.json records each chunk's SHA-256: a chunk cut short is refused before any block is read, naming it
    (checked up front, once per copy: an unchanged chunk is not hashed again)."""
    from lightning_distill.backbone import load_tokenizer

    prepared = Path(prepared_corpus(tmp_path / "corpus", tiny_teacher_dir))
    data = DistillDataModule(corpus=str(prepared), block_size=16, batch_size=4)
    data.set_tokenizer(load_tokenizer(tiny_teacher_dir))
    data.setup("fit")  # intact: verified
    chunk = next((prepared / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:-64])
    again = DistillDataModule(corpus=str(prepared), block_size=16, batch_size=4)
    again.set_tokenizer(load_tokenizer(tiny_teacher_dir))
    with pytest.raises(ValueError, match=rf"chunk train/{chunk.name} .* does not match the SHA-256 corpus.json "
                                         r"records for it \(truncated or changed\)"):
        again.setup("fit")
