"""A 2-process DDP run (CPU, gloo) of SoftDistill: completes, keeps ranks in sync, and keeps the frozen teacher out
of DDP's gradient buckets; also with feature distillation through a trained projection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(teacher_dir: str, tmp_path: Path, kwargs: dict | None = None) -> dict:
    """The report of a 2-rank DDP fit by ddp_worker.py with these SoftDistill arguments (an option group as a dict
    of its fields)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = Path(__file__).with_name("ddp_worker.py")
    extra = [json.dumps(kwargs)] if kwargs else []
    result = subprocess.run([sys.executable, str(worker), teacher_dir, str(out), *extra], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_two_processes_cpu(tiny_teacher_dir, tmp_path):
    report = run_worker(tiny_teacher_dir, tmp_path)
    assert report["wrapped"] == "DistributedDataParallel"
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["teacher_ignored"] and not report["teacher_in_buckets"]
    assert report["student_in_buckets"]
    assert report["ranks_agree"]


def test_ddp_with_feature_distillation_and_its_projection(tiny_teacher_dir, tmp_path):
    """Feature distillation through a projection (a student half the teacher's width): the projection is trained
    and all-reduced with the student, the ranks stay in sync, the frozen teacher stays out."""
    narrow = {"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1}}
    report = run_worker(tiny_teacher_dir, tmp_path, {"student": narrow, "features": {"weight": 1.0}})
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["teacher_ignored"] and not report["teacher_in_buckets"]
    assert report["student_in_buckets"] and report["projection_in_buckets"]
    assert report["ranks_agree"]
    assert report["feature_loss"] > 0
