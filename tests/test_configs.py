"""Every YAML in configs/ opens with the command that runs it and parses with that command's CLI parser; every
tiny config runs ``fit`` end to end in a subprocess (as litgpt's tests/test_config_hub.py does for its configs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_data, tiny_trainer

from lightning_distill import SoftDistill
from lightning_distill.cli import DistillCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
TINY = sorted((REPO / "configs" / "tiny").glob("*.yaml"))
COMMAND = re.compile(r"^#\s+lightning-distill (\w+) --config (\S+)", re.MULTILINE)


def launch_command(path: Path) -> str:
    """The subcommand named by the config's opening comment ``#   lightning-distill <command> --config <path>``."""
    found = COMMAND.search(path.read_text())
    assert found, f"{path} must open with the command that runs it: '#   lightning-distill fit --config ...'"
    assert found[2] == str(path.relative_to(REPO)), f"{path}'s opening command names {found[2]}"
    return found[1]


def test_configs_found():
    assert len(CONFIGS) >= 6 and len(TINY) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses(path, capsys):
    command = launch_command(path)
    with pytest.raises(SystemExit) as exit_:
        DistillCLI(args=[command, "--config", str(path), "--print_config"])  # parses and checks, instantiates none
    assert exit_.value.code in (0, None), capsys.readouterr().err[-3000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    assert resolved["model"]["class_path"] == written["model"]["class_path"]
    for key, value in written.get("trainer", {}).items():  # every trainer setting survives parsing
        if not isinstance(value, (dict, list)):
            assert resolved["trainer"][key] == value, key


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_config_fits(path, tiny_teacher_dir, tmp_path):
    teacher = yaml.safe_load(path.read_text())["model"]["init_args"].get("teacher")
    several = isinstance(teacher, dict) and "models" in teacher  # named teachers: each is the tiny one
    setting = (["--model.init_args.teacher.models", json.dumps({name: tiny_teacher_dir for name in teacher["models"]})]
               if several else ["--model.init_args.teacher", tiny_teacher_dir])
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(path), *setting,
               "--trainer.default_root_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, whatever the venv has installed
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=" in done.stdout + done.stderr
    assert (tmp_path / "config.yaml").is_file()  # the resolved config, saved by the CLI


def test_on_policy_phase_two_starts_from_an_exported_student(tiny_teacher_dir, tmp_path):
    """configs/on_policy.yaml's shape, tiny: phase 1 exports a student folder, phase 2 names it as the student and
    trains it on-policy from the command line."""
    phase1 = SoftDistill(teacher=tiny_teacher_dir, student={"from_teacher": {"layers": 2}})
    tiny_trainer(tmp_path / "phase1", max_steps=2).fit(phase1, tiny_data())
    exported = phase1.export(str(tmp_path / "student"))
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(REPO / "configs/tiny/on_policy.yaml"),
               "--model.init_args.teacher", tiny_teacher_dir, "--model.init_args.student", exported,
               "--trainer.default_root_dir", str(tmp_path / "phase2")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=" in done.stdout + done.stderr
