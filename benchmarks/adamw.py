"""What fused AdamW saves: the optimizer step alone, and whole training steps, of the demo's students.

    python benchmarks/adamw.py                      # ~3 min on 2 quiet CPU cores
    python benchmarks/adamw.py --layers 6 --steps 5 --out /tmp/adamw   # a smoke run

For each student (``{"from_teacher": {"layers": N}}`` of the embedded teacher): the AdamW step over its trainable
parameters with torch's three implementations (the single-tensor default on CPU, ``foreach`` and ``fused``; median
of ``--repeats`` after 3 untimed), then the demo's training (``SoftDistill``'s defaults with the feature term, the
demo's recipe until its sweep 4; 4 x 128 tokens of the Python docs, bf16-mixed where fast) for ``--steps`` steps with
the modules' AdamW (fused where :func:`~lightning_distill.modules.base.fused_adamw` allows) and with the default
forced, side by side in this process: median seconds per step after 3 untimed ones. Writes
``benchmarks/results/adamw.{json,md}`` with the machine, versions, command and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch

from lightning_distill.backbone import bf16_is_fast
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.data import DistillDataModule
from lightning_distill.demo import RECIPE
from lightning_distill.modules import SoftDistill, base
from lightning_distill.options import Features, Optimization

RESULTS = Path(__file__).parent / "results"
FUSED_ADAMW = base.fused_adamw  # the modules' rule, kept before a row patches it


class StepTimes(L.Callback):
    """Wall seconds of each training step, from its batch to its optimizer step's end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def student(layers: int) -> SoftDistill:
    """SoftDistill's defaults with the feature term at weight 1 (the demo's recipe until its sweep 4)."""
    return SoftDistill(student={"from_teacher": {"layers": layers}}, ce_weight=RECIPE["ce_weight"],
                       optimization=Optimization(learning_rate=RECIPE["learning_rate"]), features=Features(weight=1.0))


def optimizer_steps(model: SoftDistill, repeats: int) -> dict[str, float]:
    """Median milliseconds of one AdamW step over the student's parameters, per implementation."""
    found = {}
    for name, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_() for p in model.student.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), **options)
        times = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            optimizer.step()
            if i >= 3:
                times.append(1000 * (time.perf_counter() - start))
        found[name] = statistics.median(times)
    return found


def training_steps(layers: int, steps: int, fused: bool) -> float:
    """Median seconds per demo training step, AdamW fused or forced to the default."""
    L.seed_everything(0, verbose=False)
    model = student(layers)
    data = DistillDataModule(corpus="builtin:python-docs", block_size=128, batch_size=4)
    times = StepTimes()
    trainer = L.Trainer(max_steps=steps + 3, precision="bf16-mixed" if bf16_is_fast() else "32-true", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[times, ReuseFreedMemory()])
    with mock.patch.object(base, "fused_adamw", lambda params: fused and FUSED_ADAMW(params)):
        trainer.fit(model, data)
    return statistics.median(times.seconds[3:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="6,8", help="comma-separated student depths (the demo's 6, and 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    parser.add_argument("--repeats", type=int, default=10, help="timed optimizer steps per implementation")
    parser.add_argument("--out", default=str(RESULTS / "adamw"), help="OUT.json and OUT.md are written")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = []
    for layers in map(int, args.layers.split(",")):
        model = student(layers)
        model.configure_model()  # builds the student (a Trainer does it at fit)
        row = {"layers": layers, "parameters": sum(p.numel() for p in model.student.parameters()),
               "optimizer_ms": optimizer_steps(model, args.repeats)}
        del model
        row["step_s"] = {"fused": training_steps(layers, args.steps, True),
                         "default": training_steps(layers, args.steps, False)}
        print(f"[adamw] {row}", flush=True)
        rows.append(row)
    versions = {p: __import__(p).__version__ for p in ("torch", "transformers", "lightning")}
    report = {"command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, "
                         + ", ".join(f"{k} {v}" for k, v in versions.items())
                         + ", load average (1, 5, 15 min) {:.1f}, {:.1f}, {:.1f} before, {:.1f}, {:.1f}, {:.1f} after"
                           .format(*load_before, *os.getloadavg()),
              "precision": "bf16-mixed" if bf16_is_fast() else "32-true", "steps": args.steps, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured by `{report['command']}` on {report['date']}: {report['machine']}.", "",
             "AdamW over the demo student's trainable parameters (milliseconds per step, median), and the demo's "
             f"training step ({report['precision']}, 4 x 128 tokens, seconds, median of {report['steps']}) with "
             "the modules' fused AdamW and with torch's default forced, in one process.", "",
             "| student | parameters | AdamW default | foreach | fused | fused speed-up | training step, default "
             "| fused | saved |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ms, step = r["optimizer_ms"], r["step_s"]
        lines.append(f"| {r['layers']} layers | {r['parameters'] / 1e6:.1f}M | {ms['default']:.0f} ms | "
                     f"{ms['foreach']:.0f} ms | {ms['fused']:.0f} ms | {ms['default'] / ms['fused']:.1f}x | "
                     f"{step['default']:.3f} s | {step['fused']:.3f} s | "
                     f"{1 - step['fused'] / step['default']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
