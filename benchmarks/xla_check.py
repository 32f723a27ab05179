"""The XLA path (TPU placement) exercised on the CPU: every method fits a few steps on torch-xla's CPU device
(``PJRT_DEVICE=CPU``), and each step's compilations are counted, so what runs, what recompiles every step and what
fails is on record. Not part of ``make test``: it sets up its own environment.

    python benchmarks/xla_check.py                   # set up the environment (once, ~3 GB), run, write the results
    python benchmarks/xla_check.py --steps 6 --methods soft,hard

1. The environment: a virtual environment at ``--venv`` (default ``~/.cache/lightning_distill/xla-venv``, outside
   the repository) with ``torch-xla==2.9.0`` and the ``torch`` it is built against (``torch==2.9.0``) from the
   package index, pytest (the tests' tiny teacher), and this repository installed into it (``pip install .``,
   redone at every run so that it checks the code as it is).
2. Each method in its own process of that environment: ``soft`` (live teacher, the fused chunked loss), ``hard``
   (the teacher's arg-max), ``co`` (CoDistill: a teacher trained alongside), ``stored`` (SoftDistill from a top-32
   label store, written first on the CPU), ``on_policy`` (SoftDistill with every batch the student's own samples,
   generated with the KV cache), on a tiny random Llama teacher (``tests/conftest.py``), blocks of 32 tokens, 2 per
   batch. Through Lightning's XLA accelerator (``Trainer(accelerator="tpu")``) when it accepts the CPU device, else
   the same module stepped by hand on ``torch_xla``'s device (``training_step``, backward, the module's gradient
   rescaling, AdamW, ``torch_xla.sync()``).
3. Per step, from ``torch_xla.debug.metrics``: the graphs compiled (``UncachedCompile``), the compile time, and the
   operators that fell back to the CPU (``aten::`` counters). A method *recompiles every step* when each of its
   steps after the second compiles a new graph (a shape or a constant that changes from step to step).

Writes ``benchmarks/results/xla_check.json`` and ``xla_check.md``; when the environment cannot be made (no wheel for
this Python, no network), they say exactly why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
VENV = Path.home() / ".cache" / "lightning_distill" / "xla-venv"
PINS = ["torch==2.9.0", "torch-xla==2.9.0"]  # torch-xla 2.9 is built against torch 2.9.0 exactly
METHODS = ("soft", "hard", "co", "stored", "on_policy")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(VENV), help="the environment's folder (made when missing)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per method")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per method")
    parser.add_argument("--out", default=str(RESULTS), help="folder for xla_check.json and .md")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one method, inside the environment
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- the environment
def setup(venv: Path) -> dict[str, Any]:
    """Make the environment (once) and install this repository into it (every time); what was done, or the
    error of the step that failed."""
    python = venv / "bin" / "python"
    steps = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
        steps.append([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    steps.append([str(python), "-m", "pip", "install", "-q", *PINS, "pytest"])
    steps.append([str(python), "-m", "pip", "install", "-q", str(REPO), *PINS])  # the dependencies, torch kept
    steps.append([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)])
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"error": f"`{shlex.join(command)}` failed (exit {done.returncode}): "
                             f"{(done.stdout + done.stderr)[-3000:]}"}
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=False).stdout
    keep = ("torch", "torch-xla", "torch_xla", "lightning", "transformers", "lightning-distill", "lightning_distill")
    versions = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return {"python": str(python), "versions": {k: v for k, v in versions.items() if k.lower() in keep}}


# ----------------------------------------------------------------------------------------- one method inside
def build(method: str, teacher: str, store: str) -> Any:
    from lightning_distill import CoDistill, HardDistill, OnPolicy, Performance, Schedule, SoftDistill

    common = {"teacher": teacher, "student": {"from_teacher": {"layers": 2}}}
    if method == "soft":
        return SoftDistill(**common, performance=Performance(chunk_size=16))
    if method == "stored":
        return SoftDistill(**common, labels=store)
    if method == "hard":
        return HardDistill(**common)
    if method == "co":
        return CoDistill(**common, kd_weight=0.5, schedule=Schedule(kind="constant"))
    return SoftDistill(**common, on_policy=OnPolicy(lmbda=1.0, prompt_tokens=8, max_new_tokens=8))


class StepMetrics:
    """Each step's compilations, compile seconds and CPU fallbacks, read from ``torch_xla.debug.metrics``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.last = self.read()

    @staticmethod
    def read() -> dict[str, Any]:
        import torch_xla.debug.metrics as met

        compile_time = met.metric_data("CompileTime")
        fallbacks = {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}
        return {"compiles": met.counter_value("UncachedCompile") or 0,
                "cached": met.counter_value("CachedCompile") or 0,
                "compile_ns": compile_time[1] if compile_time else 0, "fallbacks": fallbacks}

    def step(self, loss: float) -> None:
        now = self.read()
        fallbacks = {k: v - self.last["fallbacks"].get(k, 0) for k, v in now["fallbacks"].items()
                     if v - self.last["fallbacks"].get(k, 0)}
        self.steps.append({"loss": loss, "compiles": now["compiles"] - self.last["compiles"],
                           "cached": now["cached"] - self.last["cached"],
                           "compile_seconds": (now["compile_ns"] - self.last["compile_ns"]) / 1e9,
                           "fallbacks": fallbacks})
        self.last = now


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit one method ``spec["steps"]`` steps on the XLA CPU device: through Lightning's accelerator when it takes
    the device, else by hand; each step's metrics."""
    import lightning as L
    import torch
    import torch_xla

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_data

    torch.manual_seed(0)
    model = build(spec["method"], spec["teacher"], spec["store"])
    metrics = StepMetrics()
    data = tiny_data(batch_size=2, max_documents=4)
    route = {"route": "lightning", "accelerator": "tpu"}
    try:
        from lightning.pytorch.accelerators import XLAAccelerator

        available = XLAAccelerator.is_available()  # it counts TPU chips (torch_xla._internal.tpu)
        route["lightning_accepts_device"] = available
    except Exception as error:
        available = False
        route["lightning_refused"] = f"{type(error).__name__}: {error}"
    if available:

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                metrics.step(float(trainer.callback_metrics["train/loss"]))

        L.Trainer(accelerator="tpu", devices=1, max_steps=spec["steps"], limit_val_batches=0, num_sanity_val_steps=0,
                  logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  default_root_dir=spec["dir"], callbacks=[Record()]).fit(model, data)
    else:
        route["route"] = "torch_xla by hand"
        device = torch_xla.device()
        model.configure_model()
        model.setup("fit")  # what the Trainer calls: a label store is opened here
        model.to(device)
        data.set_tokenizer(model.tokenizer)
        data.prepare_data()
        data.setup("fit")
        optimizers = model.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        model.train()
        for step, batch in zip(range(spec["steps"]), data.train_dataloader(), strict=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = model.training_step(batch, step)
            loss.backward()
            model.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            torch_xla.sync()
            metrics.step(float(loss))
    return {**route, "steps": metrics.steps}


def verdict(steps: list[dict[str, Any]]) -> str:
    """``recompiles every step`` when each step after the second compiles a new graph, ``steady`` when none of
    them does, else ``recompiles at some steps``."""
    later = [s["compiles"] for s in steps[2:]]
    if not later:
        return "too few steps to tell"
    if all(c > 0 for c in later):
        return "recompiles every step"
    return "steady" if not any(later) else "recompiles at some steps"


def inside(spec: dict[str, Any]) -> None:
    """The body of a ``--run`` process: one method, its result as the last line of stdout."""
    start = time.perf_counter()
    try:
        result = run_method(spec)
        result["verdict"] = verdict(result["steps"])
    except Exception as error:
        import traceback

        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, default=str))


# ----------------------------------------------------------------------------------------------- the check
def label_store(python: str, teacher: str, store: str) -> dict[str, Any]:
    """The top-32 store the ``stored`` method reads, written on the CPU (plain torch) in the environment."""
    code = ("import sys; sys.path.insert(0, {tests!r}); import lightning as L; from conftest import tiny_data; "
            "from lightning_distill import SoftDistill; from lightning_distill.store import LabelWriter; "
            "L.Trainer(accelerator='cpu', logger=False, enable_progress_bar=False, "
            "callbacks=[LabelWriter({store!r}, kind='topk', k=32)]).predict("
            "SoftDistill(teacher={teacher!r}, student={{'from_teacher': {{'layers': 2}}}}), "
            "datamodule=tiny_data(batch_size=2, max_documents=4), return_predictions=False)").format(
                tests=str(REPO / "tests"), store=store, teacher=teacher)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, env=environment(), check=False)
    return {} if done.returncode == 0 else {"error": (done.stdout + done.stderr)[-2000:]}


def environment() -> dict[str, str]:
    """The environment's processes: XLA on the CPU; the repository only as the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PJRT_DEVICE": "CPU", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.run:
        inside(json.loads(args.run))
        return 0
    out = Path(args.out)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/xla_check.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "venv": args.venv, "steps": args.steps, "methods": {}}
    start = time.perf_counter()
    report["setup"] = setup(Path(args.venv))
    report["setup_seconds"] = round(time.perf_counter() - start, 1)
    write(report, out)
    if "error" in report["setup"]:
        print(f"xla_check: the environment could not be made: {report['setup']['error']}")
        return 1
    python = report["setup"]["python"]
    work = Path(tempfile.mkdtemp(prefix="xla_check_"))
    maker = ("import sys; sys.path.insert(0, {tests!r}); from conftest import make_tiny_model_dir; "
             "make_tiny_model_dir(__import__('pathlib').Path({folder!r}))")
    teacher = str(work / "teacher")
    subprocess.run([python, "-c", maker.format(tests=str(REPO / "tests"), folder=teacher)], check=True,
                   env=environment())
    store = str(work / "store")
    methods = [m for m in args.methods.split(",") if m]
    if "stored" in methods:
        labelled = label_store(python, teacher, store)
        if "error" in labelled:
            report["methods"]["stored"] = {"error": f"writing the label store failed: {labelled['error']}"}
            methods.remove("stored")
    for method in methods:
        spec = {"method": method, "teacher": teacher, "store": store, "steps": args.steps,
                "dir": str(work / method)}
        print(f"xla_check: {method}", flush=True)
        try:
            done = subprocess.run([python, __file__, "--run", json.dumps(spec)], capture_output=True, text=True,
                                  env=environment(), timeout=args.timeout, cwd=work, check=False)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {
                "error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {args.timeout} s"}
        report["methods"][method] = result
        print(f"xla_check: {method}: {result.get('verdict') or result.get('error', '')[:300]}", flush=True)
        write(report, out)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write(report, out)
    print(markdown(report))
    return 0 if all("error" not in r for r in report["methods"].values()) else 1


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "xla_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "xla_check.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    setup_ = report["setup"]
    lines = ["# XLA on the CPU (`benchmarks/xla_check.py`)", "", f"- command: `{report['command']}`",
             f"- date: {report['date']}", f"- host: {report['host']}", f"- environment: `{report['venv']}`, "
             + (f"FAILED: {setup_['error']}" if "error" in setup_ else
                ", ".join(f"{k} {v}" for k, v in setup_.get("versions", {}).items())),
             f"- `PJRT_DEVICE=CPU`, {report['steps']} steps per method, tiny random teacher, 2 x 32 tokens per step",
             ""]
    if not report["methods"]:
        return "\n".join(lines).rstrip() + "\n"
    lines += ["| method | route | result | graphs compiled per step | compile s per step | losses | CPU fallbacks |",
              "|---|---|---|---|---|---|---|"]
    for method, r in report["methods"].items():
        if "error" in r:
            lines.append(f"| {method} | {r.get('route', '')} | FAILED: {r['error'][:400]} | | | | |")
            continue
        steps = r["steps"]
        fallbacks = sorted({k for s in steps for k in s["fallbacks"]})
        compiles = ", ".join(str(s["compiles"]) for s in steps)
        seconds = ", ".join(f"{s['compile_seconds']:.1f}" for s in steps)
        losses = ", ".join(f"{s['loss']:.3f}" for s in steps)
        lines.append(f"| {method} | {r['route']} | {r['verdict']} | {compiles} | {seconds} | {losses} | "
                     f"{', '.join(fallbacks) or 'none'} |")
    route = next((r for r in report["methods"].values() if "lightning_accepts_device" in r), None)
    if route is not None:
        lines += ["", "Lightning's XLA accelerator (`Trainer(accelerator=\"tpu\")`) " + (
            "accepted" if route["lightning_accepts_device"] else "did not accept") + " the CPU device: it counts "
            "TPU chips (`torch_xla._internal.tpu.num_available_devices()`, which asks a TPU VM's metadata server for "
            "its TPU environment: none here), whatever `PJRT_DEVICE` says"
            + ("." if route["lightning_accepts_device"] else
               "; so each method was stepped by hand on `torch_xla.device()`.")]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
