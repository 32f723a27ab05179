"""A 2-process DDP run (CPU, gloo) of SoftDistill: completes, keeps ranks in sync, and keeps the frozen teacher out
of DDP's gradient buckets; also with feature distillation through a trained projection; and 2 ranks at batch b train
exactly as 1 rank at batch 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


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


def test_ddp_with_several_teachers_keeps_every_frozen_teacher_out(tiny_teacher_dir, second_tiny_teacher_dir,
                                                                   tmp_path):
    """Two teachers mixed: the second one's model is frozen beside the first, neither is broadcast nor all-reduced,
    and the ranks stay in sync."""
    teachers = {"models": {"a": tiny_teacher_dir, "b": second_tiny_teacher_dir}, "weights": {"a": 1.0, "b": 1.0}}
    report = run_worker(tiny_teacher_dir, tmp_path, {"teacher": teachers})
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["other_teachers"] == ["b"]
    assert report["teacher_ignored"] and report["other_teachers_ignored"]
    assert not report["teacher_in_buckets"] and not report["other_teachers_in_buckets"]
    assert report["student_in_buckets"] and report["ranks_agree"]


def test_two_ranks_at_batch_b_train_as_one_rank_at_batch_2b(tiny_teacher_dir, tmp_path):
    """The order is a function of the seed and the global batch: 2 ranks x 2 blocks see, step by step, the blocks 1
    rank x 4 sees, and end with the same weights (fp32, CPU); 10 train blocks make epochs of 3 steps (4, 4, 2), so the
    6 steps cross an epoch boundary after a short last batch."""
    from pydoc_data.topics import topics

    texts = [topics[name][:72] for name in sorted(topics)[:7]]  # 10 train blocks of 16 tokens
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = Path(__file__).with_name("global_batch_worker.py")
    runs = {}
    for world, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"w{world}"
        out.mkdir()
        done = subprocess.run([sys.executable, str(worker), tiny_teacher_dir, str(corpus), str(out), str(world),
                               str(batch)], env=env, cwd=out, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        blocks = [json.loads((out / f"blocks-{rank}.json").read_text()) for rank in range(world)]
        steps = [[b for part in step for b in part] for step in zip(*blocks, strict=True)]  # the ranks' blocks
        runs[world] = steps, torch.load(out / "weights.pt")
    (one, weights_one), (two, weights_two) = runs[1], runs[2]
    assert len(one) == 6 and [len(b) for b in one] == [4, 4, 2, 4, 4, 2]
    assert two == one  # the same global batches, step by step, across the epoch boundary
    assert max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one) <= 1e-6
