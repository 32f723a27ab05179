"""The README's two commands on the tiny teacher: ``lightning-distill serve`` (the session's server) and
``lightning-distill fit --config configs/served.yaml`` in another process, which trains and checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_served_config_trains_from_a_running_server(served_tiny_teacher, tiny_teacher_dir, tmp_path):
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(REPO / "configs" / "served.yaml"),
               "--model.init_args.teacher", served_tiny_teacher.url, "--model.init_args.tokenizer", tiny_teacher_dir,
               "--data.tokenizer", tiny_teacher_dir,
               "--model.init_args.student", '{"from_teacher": {"layers": 2}}', "--data.block_size", "32",
               "--data.max_documents", "4", "--data.ood_corpus", "null", "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in output
    assert (tmp_path / "runs" / "served" / "checkpoints" / "last.ckpt").is_file()
