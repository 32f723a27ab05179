"""A 2-process DDP run (CPU, gloo) of SoftDistill: completes, keeps ranks in sync, and keeps the frozen teacher out
of DDP's gradient buckets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_ddp_two_processes_cpu(tiny_teacher_dir, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run([sys.executable, str(worker), tiny_teacher_dir, str(out)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["wrapped"] == "DistributedDataParallel"
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["teacher_ignored"] and not report["teacher_in_buckets"]
    assert report["student_in_buckets"]
    assert report["ranks_agree"]
