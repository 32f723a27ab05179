"""Speed and memory of the loss head (forward + backward of KD (forward KL) mixed with CE from hidden states) and
of whole training steps, ours beside TRL's (``benchmarks/speed_steps.py``).

    python benchmarks/speed.py                 # CPU: fp32 and bf16 autocast; CUDA: bf16; then the whole-step table
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py   # when other jobs share the cores (see below)
    python benchmarks/speed.py --head-only --rows 512 --vocab 4096 --repeats 1 --no-sweep --out /tmp/speed  # smoke
    python benchmarks/speed.py --steps-only --step-models tiny --step-shape 2x32 --out /tmp/speed   # smoke, steps

The student's hidden states (N, H_s) go through its head (V, H_s); the teacher's hidden states (N, H_t) through
its frozen head (V, H_t); ``loss = (1 - w) * KL(p_t || p_s) + w * CE`` with w = ``--ce-weight``, labels with one
position in 16 masked (``-100``). Methods:

- ``naive``: :func:`lightning_distill.losses.distill_loss` on the full logits ``hidden @ W.T``, teacher logits
  ``teacher_hidden @ W_t.T`` under no grad, then backward;
- ``checkpointed``: :func:`lightning_distill.losses.chunked_distill_loss` with ``fused=False`` (each chunk
  recomputed in backward), teacher from its hidden states (:class:`~lightning_distill.losses.TeacherHidden`);
- ``fused``: the same with the gradients computed in the forward pass (the default), eager;
- ``fused+compile``: the same with its chunk function under ``torch.compile`` (the default on CUDA only);
- ``liger``: Liger Kernel's ``LigerFusedLinearJSDLoss(beta=0)`` (forward KL) mixed with CE, on CUDA when
  ``liger_kernel`` is importable;
- ``fused@C``: the fused loss at other chunk sizes (the sweep behind ``losses.DEFAULT_CHUNK_SIZE``).

Time: the methods of one shape and precision run in one fresh process on the same inputs, interleaved (each
round runs every method once, ``--warmup`` rounds untimed, then ``--repeats``), so that a change of load from
other jobs hits them alike; the median wall time (CUDA events on GPU) and, on CPU, the median CPU time of the
process (user + system, all threads), steadier than wall time on shared cores. Memory on CPU: each row once more
in its own fresh process, where the kernel's peak-RSS mark (VmHWM) is reset once the inputs exist (and after a
warm-up call for compiled rows, whose compiler is not counted); the peak above the RSS before the call counts
everything the op touches (logits, softmax buffers, the head's (V, H) gradient). On CUDA:
``torch.cuda.max_memory_allocated`` above the allocated memory before the call. On CPU every row's process keeps
freed memory for reuse (:func:`lightning_distill.callbacks.reuse_freed_memory`, called at its start), as the CLI and
the demo do in training. Writes
``benchmarks/results/speed.json`` and ``speed.md``, with the whole-training-step table and its ratios.

When other jobs share the cores, an OpenMP thread that finishes a parallel region first spins (libgomp's default
active wait) while the other is descheduled: that costs every parallel region, so more, smaller operations (the
chunked losses) pay more than the few large ones of the naive loss. ``OMP_WAIT_POLICY=PASSIVE`` (or
``--threads 1``) removes that artifact; the environment is recorded with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import speed_steps
import step_worker
import torch
import torch.nn.functional as F
from step_worker import proc_status

from lightning_distill import callbacks, losses

RESULTS = Path(__file__).parent / "results"
CPU_SHAPES = [{"shape": "smollm2", "vocab": 49152, "rows": 4096, "hidden": 576, "teacher_hidden": 576}]
CUDA_SHAPES = [{"shape": "smollm2", "vocab": 49152, "rows": 8192, "hidden": 576, "teacher_hidden": 576},
               {"shape": "llama3", "vocab": 128256, "rows": 8192, "hidden": 2048, "teacher_hidden": 4096}]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--ce-weight", type=float, default=0.5, help="weight of CE in the loss")
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                        help="comma-separated: fp32, bf16-mixed (autocast, fp32 weights), bf16 (bf16 tensors); "
                             "default fp32,bf16-mixed on CPU, bf16 on CUDA")
    parser.add_argument("--sweep", type=lambda s: [int(c) for c in s.split(",")], default=[128, 512],
                        help="other chunk sizes measured for the fused loss (first shape and precision)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_const", const=[], help="skip the sweep")
    parser.add_argument("--rows", type=int, default=None, help="override N of every shape (quick runs)")
    parser.add_argument("--vocab", type=int, default=None, help="override V of every shape (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--row-timeout", type=float, default=None,
                        help="seconds one row's process may take before it is stopped and the row failed")
    parser.add_argument("--head-methods", type=lambda s: s.split(","), default=None,
                        help="loss head: only these methods (default naive,checkpointed,fused,fused+compile and "
                             "liger on CUDA when installed)")
    parser.add_argument("--no-cpu-memory", action="store_true",
                        help="loss head on CPU: skip the peak-RSS process of each row (quick runs)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for speed.json and speed.md")
    speed_steps.add_arguments(parser)  # --head-only, --steps-only, --step-models, --step-shape, --step-repeats
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one row, in a subprocess
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one measurement
def make_inputs(row: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Seeded inputs of one row: weights at the scale of a trained head, labels with 1/16 masked."""
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if row["precision"] == "bf16" else torch.float32

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    n, v = row["rows"], row["vocab"]
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[::16] = losses.IGNORE_INDEX
    return {"hidden": randn(n, row["hidden"]).requires_grad_(), "teacher_hidden": randn(n, row["teacher_hidden"]),
            "weight": randn(v, row["hidden"], scale=row["hidden"] ** -0.5).requires_grad_(),
            "teacher_weight": randn(v, row["teacher_hidden"], scale=2 * row["teacher_hidden"] ** -0.5),
            "labels": labels}


def make_op(row: dict[str, Any], x: dict[str, Any]) -> Callable[[], None]:
    """Forward + backward of the row's method on inputs ``x``."""
    method, ce = row["method"], row["ce_weight"]
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # lazily: CUDA only, optional

        options = {"beta": 0.0, "weight_hard_loss": ce, "weight_soft_loss": 1 - ce, "temperature": 1.0,
                   "ignore_index": losses.IGNORE_INDEX}
        accepted = inspect.signature(LigerFusedLinearJSDLoss).parameters
        liger = LigerFusedLinearJSDLoss(**{k: v for k, v in options.items() if k in accepted})
        biases = {k: None for k in ("student_bias", "teacher_bias") if k in inspect.signature(liger.forward).parameters}
        return lambda: liger(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"],
                             **biases).backward()
    if method == "naive":
        def op() -> None:
            logits = F.linear(x["hidden"], x["weight"])  # (N, V)
            with torch.no_grad():
                teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])  # (N, V)
            losses.distill_loss(logits, teacher_logits, x["labels"], ce_weight=ce)["loss"].backward()
        return op
    options = {"checkpointed": {"fused": False}, "fused": {"compiled": False}, "fused+compile": {"compiled": True}}
    kwargs = options[method.split("@")[0]]
    teacher = losses.TeacherHidden(x["teacher_hidden"], x["teacher_weight"])  # hidden (N, H_t), head weight (V, H_t)

    def op() -> None:
        out = losses.chunked_distill_loss(x["hidden"], x["weight"], teacher, x["labels"], ce_weight=ce,
                                          chunk_size=row["chunk_size"], **kwargs)
        out["loss"].backward()
    return op


def autocast(row: dict[str, Any]) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16-mixed`` rows (fp32 weights, bf16 matmuls, as Lightning's bf16-mixed)."""
    if row["precision"] == "bf16-mixed":
        return torch.autocast(row["device"], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def call(op: Callable[[], None], x: dict[str, Any], row: dict[str, Any]) -> tuple[float, float]:
    """One forward + backward of ``op``: its wall seconds (CUDA events on GPU) and the CPU seconds of this
    process meanwhile (all threads; less sensitive than wall time to other jobs on the cores)."""
    x["hidden"].grad = x["weight"].grad = None
    cuda = row["device"] == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    clock, cpu = time.perf_counter(), time.process_time()
    with autocast(row):
        op()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, time.process_time() - cpu
    return time.perf_counter() - clock, time.process_time() - cpu


def time_group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time the rows of one shape and precision in this process on shared inputs, interleaved (round r runs
    every row once), so that a change of load hits every method alike; medians over the timed rounds. On CUDA
    the peak memory of each row is measured here too (in its first timed round)."""
    x = make_inputs(rows[0], torch.device(rows[0]["device"]))
    ops = [make_op(row, x) for row in rows]
    times: list[list[tuple[float, float]]] = [[] for _ in rows]
    peaks = [0] * len(rows)
    for r in range(rows[0]["warmup"] + rows[0]["repeats"]):
        for i, (row, op) in enumerate(zip(rows, ops, strict=True)):
            if row["device"] == "cuda" and r == row["warmup"]:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                seconds = call(op, x, row)
                peaks[i] = torch.cuda.max_memory_allocated() - before
            else:
                seconds = call(op, x, row)
            if r >= row["warmup"]:
                times[i].append(seconds)
            print(f"  round {r} {row['method']}: {seconds[0]:.3f} s wall, {seconds[1]:.3f} s CPU", file=sys.stderr,
                  flush=True)
    return [{**row, "seconds": statistics.median(w for w, _ in t), "cpu_seconds": statistics.median(c for _, c in t),
             "times": [w for w, _ in t], "cpu_times": [c for _, c in t], **({"peak_bytes": p} if p else {})}
            for row, t, p in zip(rows, times, peaks, strict=True)]


def cpu_peak(row: dict[str, Any]) -> dict[str, int]:
    """Peak resident-set growth of one forward + backward of ``row``, in this (fresh) process: the kernel's
    high-water mark (VmHWM) is reset to the current RSS once the inputs exist (and after a warm-up call for
    compiled rows, so that the compiler's own memory is not counted), then read after the call."""
    x = make_inputs(row, torch.device("cpu"))
    op = make_op(row, x)
    if "compile" in row["method"]:
        call(op, x, row)
        x["hidden"].grad = x["weight"].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
    before = proc_status("VmRSS")
    call(op, x, row)
    return {"peak_bytes": proc_status("VmHWM") - before, "rss_before": before}


def in_subprocess(task: str, row: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``task`` (``cpu_peak``, ``time_group``, or a task of ``step_worker.work``) of ``row`` in a fresh Python
    process: its JSON result; ``{"error": ...}`` when it fails or runs past ``timeout`` seconds (then it is
    stopped, with the processes it started)."""
    command = [sys.executable, __file__, "--worker", json.dumps({"task": task, "row": row})]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)  # stderr: progress
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": f"timed out after {timeout:.0f} s (--row-timeout)"}
    done = subprocess.CompletedProcess(command, process.returncode, stdout)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode} (its traceback is in the log)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the tables
def loss_head_rows(args: argparse.Namespace, device: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the loss-head table (shape x precision x method, then the chunk-size sweep) and notes."""
    cuda = device == "cuda"
    precisions = args.precisions or (["bf16"] if cuda else ["fp32", "bf16-mixed"])
    methods = args.head_methods or ["naive", "checkpointed", "fused", "fused+compile"]
    notes = []
    if cuda and importlib.util.find_spec("liger_kernel") is not None:
        methods.append("liger")
    else:
        notes.append("Liger Kernel: not measured (" + ("`liger_kernel` is not installed)" if cuda else
                                                       "its kernels are Triton, CUDA only)"))
    base = {"device": device, "ce_weight": args.ce_weight, "chunk_size": losses.DEFAULT_CHUNK_SIZE,
            "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    overrides = {k: v for k, v in (("rows", args.rows), ("vocab", args.vocab)) if v is not None}
    shapes = [{**shape, **overrides} for shape in (CUDA_SHAPES if cuda else CPU_SHAPES)]
    groups = [[{**base, **shape, "precision": p, "method": m} for m in methods] for shape in shapes
              for p in precisions]
    groups[0] += [{**groups[0][0], "method": f"fused@{c}", "chunk_size": c} for c in args.sweep]  # interleaved
    results = []
    for group in groups:
        print(f"{group[0]['shape']} {group[0]['precision']}: timing {[r['method'] for r in group]}", flush=True)
        timed = in_subprocess("time_group", group, args.row_timeout)
        timed = timed if isinstance(timed, list) else [{**row, **timed} for row in group]
        for row in timed:
            if not cuda and "error" not in row and not args.no_cpu_memory:
                row.update(in_subprocess("cpu_peak", row, args.row_timeout))
            print(json.dumps({k: row.get(k) for k in ("method", "chunk_size", "seconds", "peak_bytes", "error")}),
                  flush=True)
            results.append(row)
    return results, notes


def ratios(results: list[dict[str, Any]]) -> None:
    """Add time and memory ratios vs naive (and vs Liger) of the same shape and precision, in place."""
    for ref in ("naive", "liger"):
        by_key = {(r["shape"], r["precision"]): r for r in results if r["method"] == ref and "error" not in r}
        for r in results:
            other = by_key.get((r["shape"], r["precision"]))
            if other is not None and "error" not in r:
                r[f"time_vs_{ref}"] = r["seconds"] / other["seconds"]
                r[f"cpu_time_vs_{ref}"] = r["cpu_seconds"] / other["cpu_seconds"]
                if "peak_bytes" in r and "peak_bytes" in other:  # not measured with --no-cpu-memory
                    r[f"memory_vs_{ref}"] = r["peak_bytes"] / max(other["peak_bytes"], 1)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    versions = {}
    for package in ("torch", "transformers", "lightning", "trl", "liger-kernel", "triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min": os.getloadavg(),
            "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "versions": versions}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = m["gpu"] or "no GPU"
    lines = [f"Measured by `{report['command']}` on {report['date']}: {m['cpu']}, {m['cores']} cores "
             f"({m['torch_threads']} torch threads), {gpu}; "
             + "".join(f"{k}={v}, " for k, v in m["environment"].items())
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
             + "; load average (1, 5, 15 min) {:.1f}, {:.1f}, {:.1f} before, {:.1f}, {:.1f}, {:.1f} after: ".format(
                 *m["load_average_1_5_15_min"], *report["load_average_after"])
             + "other jobs shared the cores when it is above the core count; compare ratios within the run.", ""]
    return "\n".join(lines + loss_head_markdown(report) + speed_steps.markdown(report)).rstrip() + "\n"


def loss_head_markdown(report: dict[str, Any]) -> list[str]:
    """The loss-head table, as markdown lines."""
    if not report["loss_head"]:
        return []
    lines = ["**Loss head**, forward + backward of (1 - w) KL(teacher || student) + w CE from hidden states, "
             f"w = {report['ce_weight']}, teacher from its hidden states and head (see the docstring of "
             "`benchmarks/speed.py` for how time and memory are measured):", ""]
    liger = any("time_vs_liger" in r for r in report["loss_head"])
    on_cpu = all(r["device"] == "cpu" for r in report["loss_head"])
    columns = [("s", lambda r: f"{r['seconds']:.3f}"), ("peak MB", lambda r: f"{r['peak_bytes'] / 2**20:,.0f}"),
               ("time / naive", lambda r: f"{r['time_vs_naive']:.2f}"),
               ("memory / naive", lambda r: f"{r['memory_vs_naive']:.3f}")]
    if on_cpu:  # CPU seconds of the process: the steadier measure when other jobs share the cores
        columns[1:1] = [("CPU s", lambda r: f"{r['cpu_seconds']:.3f}")]
        columns[4:4] = [("CPU time / naive", lambda r: f"{r['cpu_time_vs_naive']:.2f}")]
    if liger:
        columns += [("time / Liger", lambda r: f"{r['time_vs_liger']:.2f}"),
                    ("memory / Liger", lambda r: f"{r['memory_vs_liger']:.3f}")]
    lines += ["| shape | precision | method | chunk | " + " | ".join(name for name, _ in columns) + " |",
              "|---|---|---|---:|" + "---:|" * len(columns)]
    for r in report["loss_head"]:
        shape = f"{r['shape']} N={r['rows']} V={r['vocab']} H={r['hidden']}/{r['teacher_hidden']}"
        chunk = "" if r["method"] in ("naive", "liger") else r["chunk_size"]
        cells = [f"failed: {r['error']}"] if "error" in r else [_cell(cell, r) for _, cell in columns]
        lines.append(f"| {shape} | {r['precision']} | {r['method']} | {chunk} | " + " | ".join(cells) + " |")
    return [*lines, "", *[f"- {note}" for note in report["notes"]], ""]


def _cell(cell: Callable[[dict[str, Any]], str], row: dict[str, Any]) -> str:
    """A table cell, empty where the row lacks the value (no reference row to divide by)."""
    try:
        return cell(row)
    except KeyError:
        return ""


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.worker:  # a measurement in this fresh process: the result is the last line of stdout
        job = json.loads(args.worker)
        first = job["row"][0] if isinstance(job["row"], list) else job["row"]
        if first["threads"]:
            torch.set_num_threads(first["threads"])
        if first.get("malloc_as_is"):  # glibc's malloc left as it is (the modules do not change it either)
            os.environ[callbacks.REUSE_MEMORY_ENV] = "0"
        elif first.get("device", "cpu") == "cpu":  # every row alike (ours, the naive loss, the teacher, TRL)
            callbacks.reuse_freed_memory()
        tasks = {"cpu_peak": cpu_peak, "time_group": time_group}
        task = tasks.get(job["task"], lambda row: step_worker.work(job["task"], row))
        print(json.dumps(task(job["row"])))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = shlex.join(["python", "benchmarks/speed.py", *argv])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    machine_before = machine()
    results, notes = loss_head_rows(args, device) if not args.steps_only else ([], [])
    ratios(results)
    measure = functools.partial(in_subprocess, timeout=args.row_timeout)
    steps, step_notes = speed_steps.step_rows(args, device, measure) if not args.head_only else ([], [])
    report = {"command": command, "date": date, "machine": machine_before, "ce_weight": args.ce_weight,
              "loss_head": results, "notes": notes, "training_step": steps,
              "training_step_ratios": speed_steps.ratios(steps), "training_step_notes": step_notes,
              "wall_seconds": time.perf_counter() - clock, "load_average_after": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "speed.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main(sys.argv[1:])
