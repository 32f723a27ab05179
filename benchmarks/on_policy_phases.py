"""On-policy from a good start: off-policy distillation first, then the same wall time either continued off-policy
or spent on-policy (GKD's lmbda 0.5 or 1; reverse KL over full distributions, or the sampled-token loss).

Phase 1 trains the embedded default's student with SoftDistill's defaults (the 6 most important teacher layers,
forward KL + CE) for ``--phase1-steps`` and exports it, as ``configs/soft.yaml`` does. Each phase-2 arm starts from
that export (as ``configs/on_policy.yaml`` does), with a fresh optimizer at a constant learning rate (phase 1's
final one by default), and trains until its training batches have taken ``--seconds`` of wall time (validation
excluded): equal wall time, not equal steps, since an on-policy step also samples from the student. Every arm is
then validated the same way:

- the teacher's mean log-prob per token of the student's own greedy continuations of held-out prompts (what
  on-policy training optimizes), and KL(student || teacher) on them;
- what keeps that score honest, since a student that writes little, or loops on text the teacher finds likely,
  scores well too: the continuations' mean length (tokens up to EOS) and their distinct 2- and 4-gram shares;
- perplexity on real held-out text, in domain (Python docs) and out of domain (Shakespeare).

    python benchmarks/on_policy_phases.py --seeds 0,1 --seconds 90  # the measured run: 23 min on 2 quiet CPU cores
    python benchmarks/on_policy_phases.py --seeds 0 --phase1-steps 4 --seconds 5 --out /tmp/phases   # smoke run

Writes ``benchmarks/results/on_policy_phases.{json,md}`` (after every arm: an interrupted run keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from quality import History

from lightning_distill import DistillDataModule, SoftDistill
from lightning_distill.backbone import bf16_is_fast
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.options import OnPolicy, Optimization, Validation

RESULTS = Path(__file__).parent / "results"
ROLLOUT = {"prompt_tokens": 32, "max_new_tokens": 64}  # the student continues 32-token prompts for 64 tokens
ARMS: dict[str, OnPolicy | None] = {  # name -> on-policy settings (None: off-policy, SoftDistill's default loss)
    "off_policy": None,
    "rkl_0.5": OnPolicy(lmbda=0.5, loss="reverse_kl", **ROLLOUT),
    "rkl_1": OnPolicy(lmbda=1.0, loss="reverse_kl", **ROLLOUT),
    "token_0.5": OnPolicy(lmbda=0.5, loss="sampled_token", **ROLLOUT),
    "token_1": OnPolicy(lmbda=1.0, loss="sampled_token", **ROLLOUT),
}
LABELS = {"off_policy": "off-policy, continued", "rkl_0.5": "on-policy reverse KL, lmbda 0.5",
          "rkl_1": "on-policy reverse KL, lmbda 1", "token_0.5": "on-policy sampled-token, lmbda 0.5",
          "token_1": "on-policy sampled-token, lmbda 1"}
METRICS = {  # column -> (metric, format); higher log-prob is better, lower KL, perplexities better
    "teacher log-prob / token": ("val/teacher_logprob", "{:.3f}"),
    "KL(student‖teacher) on own text": ("val/on_policy_rkl", "{:.3f}"),
    "length (tokens)": ("val/length", "{:.1f}"),
    "distinct-2": ("val/distinct_2", "{:.3f}"),
    "distinct-4": ("val/distinct_4", "{:.3f}"),
    "ppl docs": ("val/ppl", "{:.1f}"),
    "ppl Shakespeare": ("val_ood/ppl", "{:.1f}"),
}


class TrainTime(History):
    """quality.py's :class:`History` (training-batch seconds, validation excluded) that stops training once they
    reach ``seconds`` (0: never)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        if self.seconds and self.train_seconds >= self.seconds:
            trainer.should_stop = True


def trainer(steps: int, root: Path, callbacks: list[L.Callback], val_batches: int = 0) -> L.Trainer:
    """Training without validation (``val_batches=0``), or the validation of :func:`validate`."""
    return L.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=val_batches, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, precision="bf16-mixed" if bf16_is_fast() else "32-true",
                     default_root_dir=str(root), callbacks=[*callbacks, ReuseFreedMemory()])


def validate(model: SoftDistill, data: DistillDataModule, root: Path, val_batches: int) -> dict[str, float]:
    checker = trainer(1, root, [], val_batches)
    checker.validate(model, data, verbose=False)
    return {k: float(v) for k, v in checker.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}


def data_for(seed: int) -> DistillDataModule:
    return DistillDataModule(corpus="builtin:python-docs", ood_corpus="builtin:shakespeare", block_size=128,
                             batch_size=4, seed=seed)


def phase1(seed: int, steps: int, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The off-policy start: SoftDistill's defaults for ``steps``, exported to ``root/phase1``."""
    L.seed_everything(seed, verbose=False)
    model = SoftDistill(validation=Validation(new_tokens=args.new_tokens))
    clock, data = TrainTime(0), data_for(seed)
    start = time.perf_counter()
    trainer(steps, root, [clock]).fit(model, data)
    wall = time.perf_counter() - start
    position = data.state_dict()  # where phase 2 goes on in the training order, as a resumed run would
    path = model.export(str(root / "phase1"))
    final_lr = model.hparams.optimization.learning_rate * model.hparams.optimization.min_lr_ratio
    print(f"[phases] seed {seed}: phase 1, {steps} steps in {clock.train_seconds:.0f} s of training", flush=True)
    return {"steps": steps, "train_s": clock.train_seconds, "wall_s": wall, "path": path, "final_lr": final_lr,
            "position": position,
            "metrics": validate(model, data_for(seed), root, args.val_batches)}


def phase2(name: str, on_policy: OnPolicy | None, seed: int, start: dict[str, Any], root: Path,
           args: argparse.Namespace) -> dict[str, Any]:
    """One arm from the phase-1 student, for ``args.seconds`` of training batches at a constant learning rate."""
    L.seed_everything(seed + 1000, verbose=False)
    lr = args.learning_rate or start["final_lr"]
    model = SoftDistill(student=start["path"], on_policy=on_policy, validation=Validation(new_tokens=args.new_tokens),
                        optimization=Optimization(learning_rate=lr, warmup_steps=0, min_lr_ratio=1.0))
    clock, data = TrainTime(args.seconds), data_for(seed)
    data.load_state_dict(start["position"])  # the batches after phase 1's
    fit = trainer(100_000, root / name, [clock])
    fit.fit(model, data)
    metrics = validate(model, data_for(seed), root, args.val_batches)
    print(f"[phases] seed {seed}: {name}: {fit.global_step} steps in {clock.train_seconds:.0f} s, teacher log-prob "
          f"{metrics['val/teacher_logprob']:.3f}, length {metrics['val/length']:.1f}, distinct-2 "
          f"{metrics['val/distinct_2']:.3f}, ppl {metrics['val/ppl']:.1f} / {metrics['val_ood/ppl']:.1f}", flush=True)
    return {"steps": fit.global_step, "train_s": clock.train_seconds, "learning_rate": lr, "metrics": metrics}


def markdown(report: dict[str, Any]) -> str:
    seeds = [int(s) for s in report["seeds"]]
    done = [s for s in seeds if str(s) in report["runs"]]
    lines = [f"Measured by `{report['command']}` on {report['date']}: {report['machine']}.", "",
             f"Phase 1: SoftDistill's defaults for {report['phase1_steps']} steps of 4 x 128 tokens (off-policy). "
             f"Phase 2, per arm, from that student: {report['seconds']:.0f} s of training batches at a constant "
             "learning rate (phase 1's last), fresh optimizer; on-policy rollouts continue 32-token corpus prompts "
             f"for 64 sampled tokens. Validation: {report['val_batches']} batches per split; the student's greedy "
             f"continuations ({report['new_tokens']} tokens) of the held-out prompts, scored by the teacher. Each "
             f"cell: mean of seeds {', '.join(map(str, done))}, then (spread: max - min over the seeds).", "",
             "| arm | steps | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    names = ["phase 1 (the start)", *ARMS]
    for name in names:
        found = [report["runs"][str(s)]["phase1" if name == names[0] else name] for s in done
                 if (name == names[0]) or name in report["runs"][str(s)]]
        if not found:
            continue
        steps = "/".join(str(r["steps"]) for r in found)
        cells = []
        for key, fmt in METRICS.values():
            values = [r["metrics"][key] for r in found]
            cell = fmt.format(statistics.mean(values))
            if len(values) > 1:
                cell += f" ({fmt.format(max(values) - min(values))})"
            cells.append(cell)
        lines.append(f"| {LABELS.get(name, name)} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--phase1-steps", type=int, default=120, help="off-policy steps before the arms split")
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall time of every phase-2 arm")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="phase 2's constant learning rate (default: phase 1's final one)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens the teacher scores per prompt")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "on_policy_phases"))
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose among {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "ld_phases"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{'bf16-mixed' if bf16_is_fast() else 'fp32'}",
        "date": time.strftime("%Y-%m-%d"), "seeds": seeds, "phase1_steps": args.phase1_steps,
        "seconds": args.seconds, "new_tokens": args.new_tokens, "val_batches": args.val_batches, "runs": {}}
    for seed in seeds:
        root = workdir / f"seed{seed}"
        runs = report["runs"][str(seed)] = {"phase1": phase1(seed, args.phase1_steps, root, args)}
        for name in arms:
            runs[name] = phase2(name, ARMS[name], seed, runs["phase1"], root, args)
            out.with_suffix(".json").write_text(json.dumps(report, indent=1))
            out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
