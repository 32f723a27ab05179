"""``benchmarks/gpu_proof.py --dry-run``: the GPU proof's code paths on the CPU at tiny shapes, so that the script
cannot rot between the times a GPU is lent. Every part must end ok, and every row must be in the JSON and the
markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_proof  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_proof")
    # a generous budget: the boxes are the GPU run's concern; here every part must run to its end, on shared cores
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--dry-run", "--out", str(out),
               "--budget", "900"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    markdown = (out / "gpu_proof.md").read_text()
    assert done.returncode == 0, markdown[-6000:] + done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "gpu_proof.json").read_text()), markdown


def test_every_part_runs_within_its_box(dry_run):
    report, markdown = dry_run
    assert list(report["parts"]) == list(gpu_proof.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["log_tail"])
        assert part["seconds"] <= part["box_s"] + 5
        assert f"| {name} | ok |" in markdown
    assert report["wall_seconds"] <= report["budget_s"] + 10


def test_the_loss_head_and_the_steps_have_every_row(dry_run):
    report, markdown = dry_run
    head = report["parts"]["loss_head"]["result"]["rows"]
    assert [r["method"] for r in head] == ["naive", "checkpointed", "fused"]
    for row in head:
        assert row["seconds"] > 0 and row["time_vs_naive"] > 0
        assert f"| {row['precision']} | {row['method']} |" in markdown
    steps = report["parts"]["steps"]["result"]["rows"]
    assert [r["name"] for r in steps] == gpu_proof.DRY_STEP_ROWS
    for row in steps:
        assert f"| {row['name']} |" in markdown
        assert ("seconds" in row) != ("skip" in row), row  # measured, or says why not
    measured = {r["name"]: r for r in steps if "seconds" in r}
    assert set(measured) == {"online KD", "stored-label KD", "teacher forward (hidden states)"} | (
        {"TRL GKDTrainer", "TRL SFTTrainer"} & set(measured))  # TRL's when it is installed here
    for name in ("online KD", "stored-label KD"):  # the student's rate is worked out for our rows
        assert measured[name]["student_tflops"] > 0 and measured[name]["student_flops_per_step"] > 0
        assert f"| {name} | 64 |" in markdown  # 2 x 32 tokens per step in its row of the rate table


def test_the_profiles_fsdp_the_gpu_tests_and_the_served_teacher_are_reported(dry_run):
    report, markdown = dry_run
    profile = report["parts"]["profile"]["result"]
    assert "fused" in profile["loss_head"]["tables"] and profile["step"]["table"]
    assert "Self CPU" in markdown  # the profiler's tables
    fsdp = report["parts"]["fsdp"]["result"]
    soft = fsdp["runs"]["soft"]["none"]
    assert len(soft["losses"]) == 3 and soft["reload_equals_export"]
    tests = report["parts"]["gpu_tests"]["result"]
    assert tests["outcomes"] and set(tests["outcomes"].values()) == {"SKIPPED"}  # no CUDA here
    assert all(f"| `{test}` | SKIPPED |" in markdown for test in tests["outcomes"])
    runs = report["parts"]["served"]["result"]["runs"]
    assert list(runs) == ["served, off-policy top-32", "served, on-policy sampled-token",
                          "served, on-policy reverse KL (top-32)", "live teacher, on-policy reverse KL"]
    for name, run in runs.items():
        assert run.get("ok"), (name, run)
        assert f"| {name} |" in markdown


def test_wheels_already_present_are_not_installed(tmp_path):
    import importlib.metadata

    version = importlib.metadata.version("pytest")
    (tmp_path / f"pytest-{version}-py3-none-any.whl").write_bytes(b"")  # never opened: pytest is present
    report = gpu_proof.install(tmp_path, tmp_path)
    assert report["installed"] == [] and report["present"] == [f"pytest {version}"] and "error" not in report
