"""Every GPU claim measured in one command, within a time budget: the CUDA halves of the speed benchmark and of the
FSDP check, the GPU-marked tests, and on-policy and served-teacher training smoke-tested on the device.

    make gpu-wheels                                          # here, with network: .gpu_wheels/ (git-ignored)
    python3 benchmarks/gpu_proof.py --wheels .gpu_wheels     # on the CUDA machine: ~8 minutes, no network needed
    python benchmarks/gpu_proof.py --dry-run --out /tmp/gpu_proof    # CPU, tiny shapes, the same code paths

The parts, each in its own process with its own time box (a part that fails or runs out of time records why, and the
next one still runs; the results are rewritten as each part ends, so a run stopped midway keeps what it measured):

1. ``machine``: the GPU, versions, and its measured bf16 matrix-product rate (8192^3, the peak a step is compared
   to) beside the vendor's dense bf16 figure where this file knows the chip;
2. ``loss_head``: ``benchmarks/speed.py --head-only``: the loss head against naive torch and Liger Kernel at
   V=49152 (H 576/576) and V=128256 (H 2048/4096), 8192 positions, bf16;
3. ``steps``: ``benchmarks/speed.py --steps-only --step-models shaped``: whole steps of 8 x 1024 tokens, a random
   SmolLM2-1.7B-shaped teacher and a 135M-shaped student: CE only, online KD, stored-label KD, the teacher's forward,
   TRL's GKDTrainer and SFTTrainer, Liger-patched and compiled variants; the student's achieved TFLOP/s (model FLOPs:
   ``benchmarks/step_worker.py``'s ``student_flops``) and its share of the measured and the vendor's peak;
4. ``profile``: ``torch.profiler``'s top kernels of the fused loss head when it is slower than Liger's, and of the
   CE-only student step when it runs below ``--far-from-peak`` of the measured peak (``--profile always|never``);
5. at once, sharing the device: ``fsdp`` (``benchmarks/fsdp_check.py``: every method, 3 steps, no FSDP / FSDP1 /
   FSDP2 in bf16-mixed, reload, export, memory per rank; a tiny random teacher), ``gpu_tests`` (``pytest -m gpu``)
   and ``served`` (``lightning-distill serve`` on the device and SoftDistill(teacher="http://...") off- and
   on-policy, and a live teacher on-policy, a few steps each).

Packages the GPU image lacks travel as wheels in ``--wheels DIR`` (``make gpu-wheels`` fills ``.gpu_wheels/`` from
``benchmarks/gpu_wheels.txt``): each wheel whose distribution is missing, or older than the wheel, is installed with
``pip install --no-index --no-deps`` (into ``WORK/site`` on ``PYTHONPATH`` when the interpreter's own folder is not
writable). The repository needs no install: it is put on ``PYTHONPATH``. Writes ``gpu_proof.json`` and
``gpu_proof.md`` to ``--out`` (default ``benchmarks/results``; with ``--dry-run`` a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
#: The parts in order, and the share of the budget left when a part starts that it may take (the parts of one
#: phase run at once and share one box).
PARTS = {"machine": (1, 0.05), "loss_head": (2, 0.22), "steps": (3, 0.55), "profile": (4, 0.25),
         "fsdp": (5, 1.0), "gpu_tests": (5, 1.0), "served": (5, 1.0)}
#: The whole-step rows, most wanted first (rows past the time box are the ones lost).
STEP_ROWS = ["CE only", "online KD", "stored-label KD", "teacher forward (hidden states)", "TRL GKDTrainer",
             "TRL SFTTrainer", "CE only, Liger kernels", "online KD, Liger kernels", "TRL SFTTrainer + Liger",
             "online KD, compiled student"]
#: The dry run's: each kind of row once, but the compiler's (minutes on CPU); skipped rows still appear.
DRY_STEP_ROWS = ["online KD", "stored-label KD", "teacher forward (hidden states)", "TRL GKDTrainer",
                 "TRL SFTTrainer", "CE only, Liger kernels", "online KD, Liger kernels", "TRL SFTTrainer + Liger"]
#: The packages whose versions the results record.
VERSIONS = ("torch", "triton", "lightning", "transformers", "accelerate", "trl", "liger-kernel", "datasets",
            "litserve", "jsonargparse")
#: Vendors' dense bf16 tensor-core peaks (TFLOP/s, without sparsity), by a name's substring, first match wins.
SPEC_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0)]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", default=None, help="folder of wheels to install when missing (no network)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the same code paths")
    parser.add_argument("--budget", type=float, default=None, help="seconds for every part (default 480; dry 240)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {', '.join(PARTS)}")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="auto: when the fused loss is slower than Liger's or the step is far from the peak")
    parser.add_argument("--far-from-peak", type=float, default=0.4,
                        help="profile the step when the student runs below this share of the measured peak")
    parser.add_argument("--out", default=None, help="folder for gpu_proof.json and .md")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one part, in its own process (internal)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the wheels
def install(folder: Path, work: Path) -> dict[str, Any]:
    """Install each wheel of ``folder`` whose distribution is missing or older, without the network or
    dependency resolution (the folder holds what the image lacks); into ``WORK/site`` on ``PYTHONPATH`` when the
    interpreter's packages are not writable."""
    from packaging.version import Version

    wanted, present = [], []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]  # a wheel's file name: NAME-VERSION-...
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and Version(have) >= Version(version):
            present.append(f"{name} {have}")
        else:
            wanted.append((f"{name} {version}" + (f" (over {have})" if have else ""), str(wheel)))
    report: dict[str, Any] = {"folder": str(folder), "installed": [w[0] for w in wanted], "present": present}
    if not wanted:
        return report
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
               "--find-links", str(folder), *[w[1] for w in wanted]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:  # e.g. a read-only environment: a folder of our own on PYTHONPATH
        site = work / "site"
        done = subprocess.run([*command, "--target", str(site)], capture_output=True, text=True, timeout=180,
                              check=False)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        sys.path.insert(0, str(site))
        report["target"] = str(site)
    if done.returncode != 0:
        report["error"] = (done.stdout + done.stderr)[-2000:]
    return report


# ------------------------------------------------------------------------------------------------- the parts
def part_machine(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine, the versions, and the measured bf16 matrix-product rate of the device."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    versions = {}
    for package in VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info = {"cpu": cpu, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "versions": versions}
    device = spec["device"]
    n, rounds = (8192, 10) if device == "cuda" else (256, 3)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        a @ b
    sync()
    measured = 2 * n**3 * rounds / (time.perf_counter() - start) / 1e12
    spec_peak = next((tflops for key, tflops in SPEC_BF16_TFLOPS if key in (info["gpu"] or "")), None)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    multiprocessors=props.multi_processor_count)
    return {**info, "matmul": f"bf16 {n}x{n}x{n}, mean of {rounds} after 3 warm-ups",
            "measured_bf16_tflops": measured, "spec_bf16_tflops": spec_peak}


def part_loss_head(spec: dict[str, Any]) -> dict[str, Any]:
    """``speed.py --head-only`` on the device (the dry run: 256 positions, V=1024, one round, no memory process)."""
    import speed

    argv = ["--head-only", "--out", str(Path(spec["work"]) / "speed_head"), "--row-timeout", str(spec["row_timeout"])]
    argv += (["--rows", "256", "--vocab", "1024", "--no-sweep", "--repeats", "1", "--warmup", "0", "--precisions",
              "bf16-mixed", "--no-cpu-memory", "--head-methods", "naive,checkpointed,fused"]  # no compiler on CPU
             if spec["dry_run"] else ["--repeats", "3"])
    args = speed.parse(argv)
    rows, notes = speed.loss_head_rows(args, spec["device"])
    speed.ratios(rows)
    return {"argv": argv, "ce_weight": args.ce_weight, "rows": rows, "notes": notes}


def part_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """``speed.py --steps-only`` with the shaped models, our rows at chunk 256 (CUDA's default), the rows of
    :data:`STEP_ROWS` in that order; the student's achieved TFLOP/s per row. Partial results after each row."""
    import speed
    import speed_steps

    argv = ["--steps-only", "--step-chunks", str(speed_steps.CHUNK), "--row-timeout", str(spec["row_timeout"])]
    if spec["dry_run"]:
        argv += ["--step-models", "shaped-tiny", "--step-shape", "2x32", "--step-repeats", "1",
                 "--step-rows", ";".join(DRY_STEP_ROWS)]
    else:
        argv += ["--step-models", "shaped", "--step-repeats", "3", "--step-rows", ";".join(STEP_ROWS)]
    args = speed.parse(argv)
    out = Path(spec["work"]) / "steps.json"
    peaks = {"measured": spec.get("measured_bf16_tflops"), "spec": spec.get("spec_bf16_tflops")}

    def save(rows: list[dict[str, Any]], notes: list[str] | None = None) -> dict[str, Any]:
        result = {"argv": argv, "rows": [utilisation(r, peaks) for r in rows],
                  "ratios": speed_steps.ratios(rows), "notes": notes or []}
        out.write_text(json.dumps(result, indent=1, default=str))
        return result

    measure = lambda task, row: speed.in_subprocess(task, row, args.row_timeout)  # noqa: E731
    rows, notes = speed_steps.step_rows(args, spec["device"], measure, on_row=save)
    return save(rows, notes)


def utilisation(row: dict[str, Any], peaks: dict[str, float | None]) -> dict[str, Any]:
    """The student's model TFLOP/s in the row's step and its share of each peak (rows of our steps only)."""
    if "student_flops_per_step" not in row or "seconds" not in row:
        return row
    tflops = row["student_flops_per_step"] / row["seconds"] / 1e12
    shares = {f"share_of_{k}_peak": tflops / v for k, v in peaks.items() if v}
    return {**row, "student_tflops": tflops, **shares}


def part_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Top kernels of the fused loss head (and Liger's) at the shape asked, and of a CE-only student step."""
    import speed
    import speed_steps
    import step_worker
    import torch
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    asked = spec["profile"]
    cuda = spec["device"] == "cuda"
    if asked.get("loss_head"):
        reason, row = asked["loss_head"]
        x = speed.make_inputs(row, torch.device(row["device"]))
        tables = {}
        for method in ("fused", "liger") if row.get("liger") else ("fused",):
            op = speed.make_op({**row, "method": method}, x)
            speed.call(op, x, row)  # warm-up (the compiled chunk function compiles here)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(2):
                    speed.call(op, x, row)
            tables[method] = step_worker.top_kernels(prof, cuda)
        out["loss_head"] = {"reason": reason, "shape": {k: row[k] for k in ("shape", "rows", "vocab", "hidden",
                                                                          "teacher_hidden", "precision")},
                            "tables": tables}
    if asked.get("step"):
        reason, row = asked["step"]
        row = {**row, **speed_steps.models(row["models"]), "profile": True, "repeats": 2}
        result = step_worker.work("step", row)
        out["step"] = {"reason": reason, "row": row["name"], "seconds": result.get("seconds"),
                       "table": result.get("profile"), "error": result.get("error")}
    return out


def part_fsdp(spec: dict[str, Any]) -> dict[str, Any]:
    """``fsdp_check.py`` with a tiny random teacher, its runs 4 at a time (the dry run: soft on CPU, strategy
    none)."""
    import fsdp_check

    out = Path(spec["work"]) / "fsdp"
    argv = ["--teacher", "tiny", "--out", str(out), "--timeout", str(int(spec["row_timeout"]))]
    argv += (["--accelerator", "cpu", "--strategies", "none", "--methods", "soft", "--block-size", "32",
              "--batch-size", "2", "--max-documents", "4"] if spec["dry_run"] else ["--devices", "1", "--jobs", "4"])
    code = fsdp_check.main(argv)
    return {"argv": argv, "exit_code": code, **json.loads((out / "fsdp.json").read_text())}


def part_gpu_tests(spec: dict[str, Any]) -> dict[str, Any]:
    """``pytest -m gpu`` over the test files that mark a test so (with pytest-xdist, 8 at a time): each test's
    outcome as it is printed, so a run stopped by its box keeps those that finished."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    xdist = importlib.util.find_spec("xdist") is not None and not spec["dry_run"]
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", *files,
               *(["-n", "8"] if xdist else [])]
    log = Path(spec["work"]) / "gpu_tests.log"
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(spec["box"] - 15, 10))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timed out"
    text = log.read_text(errors="replace")
    outcomes = {}
    for match in re.finditer(r"(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|"
                             r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+)", text):
        test, outcome = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        outcomes[test] = outcome
    summary = next((line.strip("= ") for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|"
                    r"skipped|deselected|error)", line)), "")
    return {"command": shlex.join(command[1:]), "exit_code": code, "files": files, "outcomes": outcomes,
            "summary": summary, "failures": text[-4000:] if code not in (0, 5) else ""}


def part_served(spec: dict[str, Any]) -> dict[str, Any]:
    """``lightning-distill serve`` of a tiny random teacher on the device, then a few steps of SoftDistill from it
    off-policy and on-policy (sampled-token and top-k reverse KL), and from the live teacher on-policy."""
    sys.path.insert(0, str(REPO / "tests"))
    import serving
    from conftest import TINY_STUDENT, make_tiny_model_dir

    from lightning_distill import OnPolicy

    work = Path(spec["work"]) / "served"
    teacher = str(make_tiny_model_dir(work / "teacher"))
    cuda = spec["device"] == "cuda"
    on_policy = {"prompt_tokens": 8, "max_new_tokens": 8, "lmbda": 1.0}
    runs: dict[str, Any] = {}
    args = ("--accelerator", spec["device"], "--dtype", "bfloat16" if cuda else "float32")
    try:
        server = serving.start(teacher, work / "serve.log", *args, timeout=max(spec["box"] * 0.6, 45))
        (Path(spec["work"]) / "served.group").write_text(str(server.process.pid))  # stopped by finish() on a timeout
    except Exception as error:  # the server did not come up: the live run still runs
        runs["server"] = {"error": str(error)[-2000:]}
        server = None
    plan = [("live teacher, on-policy reverse KL", teacher, OnPolicy(**on_policy))]
    if server is not None:
        plan = [("served, off-policy top-32", server.url, None),
                ("served, on-policy sampled-token", server.url, OnPolicy(**on_policy, loss="sampled_token")),
                ("served, on-policy reverse KL (top-32)", server.url, OnPolicy(**on_policy)), *plan]
    try:
        for name, source, policy in plan:
            local = teacher if source != teacher else None  # a served teacher: its local copy builds the student
            runs[name] = fit_smoke(source, TINY_STUDENT, policy, spec["device"], work / name.replace(" ", "_"),
                                   tokenizer=local)
            print(name, runs[name], flush=True)
    finally:
        if server is not None:
            serving.stop(server)
    return {"teacher": "tiny random Llama (4 layers, hidden 32, vocabulary 384)", "server": " ".join(args),
            "runs": runs}


def fit_smoke(teacher: str, student: dict[str, Any], on_policy: Any, device: str, folder: Path,
              tokenizer: str | None = None) -> dict[str, Any]:
    """3 steps of SoftDistill on ``device`` (bf16-mixed on CUDA): the losses, seconds, and whether all are finite.
    A served ``teacher`` needs ``tokenizer``: a local copy of it, which builds the pruned student."""
    import lightning as L
    from conftest import tiny_data

    from lightning_distill import SoftDistill

    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, *args: Any) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    start = time.perf_counter()
    try:
        model = SoftDistill(teacher=teacher, student=student, tokenizer=tokenizer, on_policy=on_policy)
        L.Trainer(accelerator=device, devices=1, precision="bf16-mixed" if device == "cuda" else "32-true",
                  max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(folder),
                  callbacks=[Losses()]).fit(model, tiny_data())
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[-2000:], "losses": losses}
    return {"losses": losses, "seconds": time.perf_counter() - start,
            "ok": len(losses) == 3 and all(math.isfinite(x) for x in losses)}


def run_part(spec: dict[str, Any]) -> None:
    """A part in this process: its result to ``WORK/NAME.json`` (read back by the parent)."""
    result = globals()[f"part_{spec['name']}"](spec)
    result["complete"] = True  # the part's work is done (a part stopped while it exits is still ok)
    (Path(spec["work"]) / f"{spec['name']}.json").write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- the schedule
def launch(spec: dict[str, Any]) -> subprocess.Popen:
    log = open(Path(spec["work"]) / f"{spec['name']}.log", "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, __file__, "--part", json.dumps(spec)]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, spec: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Wait for a part until ``deadline`` (then stop it and its processes); its result, status and log's end."""
    try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        group = Path(spec["work"]) / f"{spec['name']}.group"  # a server the part started in a session of its own
        if group.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(group.read_text()), signal.SIGKILL)
        status = f"timed out after its {spec['box']:.0f} s box"
    process.log.close()  # type: ignore[attr-defined]
    work = Path(spec["work"])
    partial = work / f"{spec['name']}.json"  # the steps part rewrites it after each row
    result = json.loads(partial.read_text()) if partial.is_file() else None
    if status.startswith("timed out") and (result or {}).get("complete"):
        status = "ok"  # its work was done and written; only its interpreter's exit ran past the box
    tail = (work / f"{spec['name']}.log").read_text(errors="replace")[-3000:]
    return {"status": status, "box_s": spec["box"], "result": result, "log_tail": tail if status != "ok" else ""}


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.part:
        run_part(json.loads(args.part))
        return 0
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_proof: no CUDA device here; `--dry-run` runs the same code paths on the CPU")
        return 2
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu_proof_dry_") if args.dry_run else RESULTS))
    work = Path(tempfile.mkdtemp(prefix="gpu_proof_work_"))
    budget = args.budget or (240.0 if args.dry_run else 480.0)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/gpu_proof.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "device": device, "budget_s": budget, "python": platform.python_version(),
        "host": {"cpu_cores": os.cpu_count(), "machine": platform.machine()}, "parts": {}}
    if args.wheels:
        report["wheels"] = install(Path(args.wheels), work)
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts names {unknown}; the parts are {', '.join(PARTS)}")
    for phase in sorted({PARTS[p][0] for p in wanted}):
        names = [p for p in wanted if PARTS[p][0] == phase]
        left = budget - (time.monotonic() - start)
        box = max(left * PARTS[names[0]][1], 20.0)
        machine = result(report["parts"], "machine") or {}
        spec = {"work": str(work), "device": device, "dry_run": args.dry_run, "box": box,
                "row_timeout": box / 3 if "steps" in names else box * 0.8,
                "measured_bf16_tflops": machine.get("measured_bf16_tflops"),
                "spec_bf16_tflops": machine.get("spec_bf16_tflops")}
        if names == ["profile"]:
            spec["profile"] = profile_plan(report, args)
            if not any(spec["profile"].values()):
                report["parts"]["profile"] = {"status": "not needed", "box_s": 0, "result": spec["profile"],
                                              "log_tail": ""}
                write(report, out)
                continue
        env_threads = {} if len(names) == 1 else {"OMP_NUM_THREADS": str(max((os.cpu_count() or 2) // 8, 1))}
        os.environ.update(env_threads)
        began, deadline = time.monotonic(), time.monotonic() + box
        running = {name: launch({**spec, "name": name}) for name in names}
        print(f"gpu_proof: {', '.join(names)} (box {box:.0f} s)", flush=True)
        while running:
            done = [n for n, p in running.items() if p.poll() is not None] or (
                list(running) if time.monotonic() > deadline else [])
            for name in done:
                report["parts"][name] = {**finish(running.pop(name), {**spec, "name": name}, deadline),
                                         "seconds": round(time.monotonic() - began, 1)}
                print(f"gpu_proof: {name}: {report['parts'][name]['status']}", flush=True)
                write(report, out)
            time.sleep(0.2)
    report["parts"] = {name: report["parts"][name] for name in PARTS if name in report["parts"]}  # parallel parts
    report["wall_seconds"] = round(time.monotonic() - start, 1)                                # end in any order
    write(report, out)
    print(f"gpu_proof: wrote {out / 'gpu_proof.json'} and {out / 'gpu_proof.md'} in {report['wall_seconds']} s")
    return 0 if all(p["status"] in ("ok", "not needed") for p in report["parts"].values()) else 1


def profile_plan(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Which profiles to take, each with its reason and its row: the fused loss head where it is slower than
    Liger's, the CE-only step where the student runs below ``--far-from-peak`` of the measured peak."""
    if args.profile == "never":
        return {"loss_head": None, "step": None}
    always = args.profile == "always" or args.dry_run
    plan: dict[str, Any] = {"loss_head": None, "step": None}
    head = (report["parts"].get("loss_head", {}).get("result") or {}).get("rows", [])
    fused = [r for r in head if r["method"] == "fused" and "seconds" in r]
    slower = [r for r in fused if r.get("time_vs_liger", 0) > 1]
    if slower:
        worst = max(slower, key=lambda r: r["time_vs_liger"])
        plan["loss_head"] = (f"the fused loss took {worst['time_vs_liger']:.2f}x Liger's time", {**worst, "liger": 1})
    elif always and fused:
        plan["loss_head"] = ("asked (--profile always or --dry-run)", {**fused[0], "liger": "time_vs_liger" in
                                                                       fused[0]})
    steps = (report["parts"].get("steps", {}).get("result") or {}).get("rows", [])
    ours = [r for r in steps if "student_flops_per_step" in r and "seconds" in r]
    ce = next((r for r in ours if r["name"] == "CE only"), ours[0] if ours and always else None)
    if ce is not None:
        share = ce.get("share_of_measured_peak")
        models = "shaped-tiny" if args.dry_run else "shaped"
        keep = {k: v for k, v in ce.items() if k not in ("teacher", "student", "times", "warmup_times")}
        if share is not None and share < args.far_from_peak:
            plan["step"] = (f"the {ce['name']} student step ran at {share:.1%} of the measured bf16 peak",
                            {**keep, "models": models})
        elif always:
            plan["step"] = ("asked (--profile always or --dry-run)", {**keep, "models": models})
    return plan


# ------------------------------------------------------------------------------------------------ the report
def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_proof.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_proof.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    import fsdp_check
    import speed
    import speed_steps

    parts = report["parts"]
    machine = (parts.get("machine") or {}).get("result") or {}
    lines = ["# GPU proof (`benchmarks/gpu_proof.py`)" + (": DRY RUN on the CPU, tiny shapes" if report["dry_run"]
                                                          else ""), "",
             f"- command: `{report['command']}`", f"- date: {report['date']}",
             f"- device: {machine.get('gpu') or report['device']}"
             + (f", {machine['gpu_memory_gib']:.0f} GiB, CUDA {machine['cuda']}" if "cuda" in machine else "")
             + f"; host {machine.get('cpu', '?')}, {report['host']['cpu_cores']} cores, Python {report['python']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in machine.get('versions', {}).items())}",
             f"- budget {report['budget_s']:.0f} s, wall {report.get('wall_seconds', '(running)')} s", ""]
    if machine.get("measured_bf16_tflops"):
        spec_peak = machine.get("spec_bf16_tflops")
        lines += [f"Peak: {machine['matmul']}: **{machine['measured_bf16_tflops']:.3g} TFLOP/s** measured"
                  + (f"; vendor's dense bf16 figure {spec_peak:.0f} TFLOP/s" if spec_peak else "") + ".", ""]
    if "wheels" in report:
        w = report["wheels"]
        lines += [f"Wheels from `{w['folder']}`: installed {', '.join(w['installed']) or 'none'}; already present "
                  f"{', '.join(w['present']) or 'none'}" + (f"; ERROR {w['error']}" if "error" in w else ""), ""]
    lines += ["| part | status | seconds | box, s |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {p['status']} | {p.get('seconds', '')} | {p['box_s']:.0f} |" for name, p in parts.items()]
    head = result(parts, "loss_head")
    if head:
        lines += ["", "## 1. Loss head (`benchmarks/speed.py --head-only`)", "",
                  *speed.loss_head_markdown({"loss_head": head["rows"], "notes": head["notes"],
                                             "ce_weight": head["ce_weight"]})]
    steps = result(parts, "steps")
    if steps:
        lines += ["", "## 2. Whole training steps (`benchmarks/speed.py --steps-only --step-models shaped`)", "",
                  *speed_steps.markdown({"training_step": steps["rows"], "training_step_ratios": steps["ratios"],
                                         "training_step_notes": steps["notes"]}), "", *utilisation_markdown(steps)]
    profile = result(parts, "profile")
    if profile and any(profile.get(k) for k in ("loss_head", "step")):
        lines += ["", "## 3. Where the time goes (`torch.profiler`, top kernels by their own time)", ""]
        head_profile = profile.get("loss_head")
        if head_profile and "tables" in head_profile:
            for method, table in head_profile["tables"].items():
                lines += [f"Loss head, {method}, {head_profile['shape']} ({head_profile['reason']}):", "", "```",
                          table.rstrip(), "```", ""]
        step_profile = profile.get("step")
        if step_profile and "row" in step_profile:
            lines += [f"Whole step, {step_profile['row']} ({step_profile['reason']}):", "", "```",
                      (step_profile.get("table") or f"failed: {step_profile.get('error')}").rstrip(), "```", ""]
    fsdp = result(parts, "fsdp")
    if fsdp:
        lines += ["", "## 4. FSDP (`benchmarks/fsdp_check.py`)", "", *fsdp_check.markdown(fsdp)]
    tests = result(parts, "gpu_tests")
    if tests:
        lines += ["", "## 5. GPU-marked tests (`pytest -m gpu`)", "", f"`{tests['command']}`: "
                  f"{tests['summary'] or 'no summary'} (exit {tests['exit_code']})", "", "| test | outcome |",
                  "|---|---|", *[f"| `{t}` | {o} |" for t, o in tests["outcomes"].items()]]
    served = result(parts, "served")
    if served:
        lines += ["", "## 6. On-policy and the served teacher", "",
                  f"`lightning-distill serve {served['server']}` of a {served['teacher']}; SoftDistill 3 steps each:",
                  "", "| run | losses | seconds | finite |", "|---|---|---:|---|"]
        for name, r in served["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {one_line(r['error'])[-400:]} | | |")
            else:
                lines.append(f"| {name} | {', '.join(f'{x:.4f}' for x in r['losses'])} | {r['seconds']:.1f} | "
                             f"{r['ok']} |")
    failed = [(name, p) for name, p in parts.items() if p["status"] not in ("ok", "not needed")]
    if failed:
        lines += ["", "## Failures (the end of each part's log)", ""]
        for name, p in failed:
            lines += [f"{name}: {p['status']}", "", "```", p["log_tail"].rstrip()[-2500:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def one_line(text: str) -> str:
    """``text`` fit for a table cell."""
    return " ".join(text.split()).replace("|", "/")


def result(parts: dict[str, Any], name: str) -> dict[str, Any] | None:
    return (parts.get(name) or {}).get("result")


def utilisation_markdown(steps: dict[str, Any]) -> list[str]:
    """The student's achieved TFLOP/s per row of ours and its share of the measured and vendor's peaks."""
    rows = [r for r in steps["rows"] if "student_tflops" in r]
    if not rows:
        return []
    lines = ["**The student's achieved rate** (its model FLOPs per step over the step's time, the teacher's work "
             "not counted):", "", "| row | tokens / step | student TFLOP / step | TFLOP/s | share of measured peak | "
             "share of vendor's peak |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shares = [f"{r[k]:.1%}" if k in r else "" for k in ("share_of_measured_peak", "share_of_spec_peak")]
        lines.append(f"| {r['name']} | {r['tokens_per_step']:,} | {r['student_flops_per_step'] / 1e12:.2f} | "
                     f"{r['student_tflops']:.1f} | {shares[0]} | {shares[1]} |")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
