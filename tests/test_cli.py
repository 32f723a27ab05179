"""The `lightning-distill` command: fit a tiny config, export the checkpoint's student, run the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lightning_distill import demo

ROOT = Path(__file__).parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lightning_distill", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fit_then_export(tiny_teacher_dir, tmp_path):
    config = ROOT / "configs" / "tiny" / "soft.yaml"
    cli("fit", "--config", str(config), "--model.init_args.teacher", tiny_teacher_dir,
        "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    out = tmp_path / "exported"
    result = cli("export", "--ckpt", str(checkpoints[0]), "--out", str(out), cwd=tmp_path)
    assert "exported the student" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_export_rejects_foreign_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lightning_distill", "export", "--ckpt", str(path), "--out",
                             str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not written by a lightning_distill module" in result.stderr


def test_demo_runs_end_to_end_on_a_tiny_teacher(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table's rows to the terminal's width
    results = demo.main(["--teacher", tiny_teacher_dir, "--layers", "2", "--steps", "3", "--batch-size", "2",
                         "--block-size", "32", "--val-batches", "1", "--out", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert "student distilled" in printed and "exported student" in printed
    assert "perplexity / teacher's, Shakespeare" in printed and "kept (importance)" in printed
    assert "trained on Python docs + builtin:smollm2-writing (validated on the docs alone)" in printed
    assert results["after"]["val/ppl"] > 0 and "val_ood/ppl" in results["after"]
    config = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())
    assert len(config["distill_teacher_layers"]) == 2  # the demo's student keeps the layers importance chose
