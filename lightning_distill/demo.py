"""The main job (``make demo``): distil the embedded teacher into a 9-layer student and print what it achieved.

SmolLM2-135M-Instruct (30 layers) -> a depth-pruned 9-layer student (~60M parameters) keeping the 9 teacher layers
of highest measured importance (:mod:`lightning_distill.pruning`), trained with SoftDistill's defaults (forward KL,
CE at 0.25, lr 2e-3) on the built-in corpus (the Python documentation) with text the teacher wrote itself mixed in
(``builtin:smollm2-writing``, :mod:`lightning_distill.data.writing`): the recipe a measured sweep chose
(:data:`RECIPE`, ``benchmarks/demo_recipe.py``). The table compares the teacher, the student as pruned and the
student after training, in domain (held-out Python docs) and out of domain (Shakespeare), with the student's
perplexity as a multiple of the teacher's, then the student is exported as a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_distill import checks
from lightning_distill.backbone import bf16_is_fast
from lightning_distill.callbacks import reuse_freed_memory
from lightning_distill.data import DistillDataModule
from lightning_distill.modules import SoftDistill
from lightning_distill.options import Features, Optimization

MIX = "builtin:smollm2-writing"
"""Text mixed into the demo's training: what the teacher wrote itself (:mod:`lightning_distill.data.writing`)."""
RECIPE = {"layers": 9, "steps": 112, "learning_rate": 2e-3, "ce_weight": 0.25, "feature_weight": 0.0}
"""The student depth and SoftDistill arguments a measured sweep chose for the demo, with :data:`MIX`
(``benchmarks/results/demo_recipe_sweep4.md``)."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightning-distill demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"],
                        help=f"optimizer steps (default {RECIPE['steps']}: the demo's time before the 9-layer student)")
    parser.add_argument("--layers", type=int, default=RECIPE["layers"],
                        help=f"student layers kept from the teacher's 30 (default {RECIPE['layers']})")
    parser.add_argument("--select", choices=("importance", "evenly"), default="importance",
                        help="which teacher layers the student keeps (default: the most important ones)")
    parser.add_argument("--learning-rate", type=float, default=RECIPE["learning_rate"], help="peak learning rate")
    parser.add_argument("--ce-weight", type=float, default=RECIPE["ce_weight"],
                        help="weight of CE on the real text against the KL term")
    parser.add_argument("--feature-weight", type=float, default=RECIPE["feature_weight"],
                        help="weight of the feature term (each student layer's states matched to its teacher layer's; "
                             "default 0: off)")
    parser.add_argument("--mix", default=MIX, help="general text mixed into training beside the Python docs, never "
                        f"validated on (default {MIX}: what the teacher wrote itself); 'none': Python docs only")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=8, help="validation batches per split")
    parser.add_argument("--out", default="runs/demo", help="where the checkpoint and the exported student go")
    parser.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "val_batches"):  # the rest is checked by the objects they build
        checks.integer(f"--{name.replace('_', '-')}", getattr(args, name), ">= 1", lambda v: v >= 1)
    return args


def validate(trainer: L.Trainer, model: SoftDistill, data: DistillDataModule) -> dict[str, float]:
    trainer.validate(model, data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse(argv or [])
    start = time.perf_counter()
    out = Path(args.out)
    console = Console()
    device = "CUDA" if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    device += ", bf16" if bf16_is_fast() else ", fp32"
    console.print(f"[bold]lightning-distill demo[/]: {args.teacher} -> {args.layers}-layer student, "
                  f"{args.steps} steps of {args.batch_size}x{args.block_size} tokens on {device}")
    reuse_freed_memory()  # the demo owns its process: keep freed CPU memory for reuse (measured faster)
    model = SoftDistill(teacher=args.teacher, student={"from_teacher": {"layers": args.layers, "select": args.select}},
                        ce_weight=args.ce_weight, optimization=Optimization(learning_rate=args.learning_rate),
                        features=Features(weight=args.feature_weight) if args.feature_weight > 0 else None)
    corpus = "builtin:python-docs"
    mixed = {} if args.mix == "none" else {"corpus": [corpus, args.mix], "val_sources": [corpus]}
    data = DistillDataModule(**{"corpus": corpus, **mixed}, ood_corpus="builtin:shakespeare",
                             block_size=args.block_size, batch_size=args.batch_size)
    precision = "bf16-mixed" if bf16_is_fast() else "32-true"
    data.set_tokenizer(model.tokenizer, model.max_positions)
    data.prepare_data()
    data.setup("fit")
    epochs = math.ceil(args.steps / math.ceil(len(data.train_blocks) / args.batch_size))  # for the progress bar
    # Validate once, at the last step (the "after" numbers); check_val_every_n_epoch=None counts in steps.
    trainer = L.Trainer(max_steps=args.steps, max_epochs=epochs, precision=precision,
                        limit_val_batches=args.val_batches, val_check_interval=args.steps,
                        check_val_every_n_epoch=None, logger=False, default_root_dir=str(out),
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5)
    before = validate(trainer, model, data)
    fit_start = time.perf_counter()
    trainer.fit(model, data)  # ends with a validation at the last step
    fit_time = time.perf_counter() - fit_start
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}
    exported = model.export(str(out / "student"))
    kept = getattr(model.student.config, "distill_teacher_layers", None)
    report(console, before, after, fit_time, time.perf_counter() - start, exported, args, kept)
    return {"before": before, "after": after}


def report(console: Console, before: dict[str, float], after: dict[str, float], fit_time: float, total: float,
           exported: str, args: argparse.Namespace, kept: list[int] | None = None) -> None:
    table = Table(title="SoftDistill on the embedded default")
    for column in ("metric", "teacher", "student as pruned", "student distilled"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    rows = [("perplexity, Python docs (held out)", "val/teacher_ppl", "val/ppl", "{:.1f}"),
            ("perplexity, Shakespeare (out of domain)", "val_ood/teacher_ppl", "val_ood/ppl", "{:.1f}"),
            ("top-1 agreement with teacher, Python docs", None, "val/agreement", "{:.1%}"),
            ("KL(teacher || student), Python docs", None, "val/kl", "{:.3f}")]
    for label, teacher_key, student_key, fmt in rows:
        teacher = fmt.format(after[teacher_key]) if teacher_key else "-"
        table.add_row(label, teacher, fmt.format(before[student_key]), fmt.format(after[student_key]))
    ratios = (("perplexity / teacher's, Python docs", "val"), ("perplexity / teacher's, Shakespeare", "val_ood"))
    for label, prefix in ratios:
        teacher, pruned, distilled = (d[f"{prefix}/{k}"] for d, k in ((after, "teacher_ppl"), (before, "ppl"),
                                                                       (after, "ppl")))
        table.add_row(label, "1x", f"{pruned / teacher:,.0f}x", f"{distilled / teacher:.2f}x")
    console.print(table)
    mixed = "Python docs only" if args.mix == "none" else f"Python docs + {args.mix} (validated on the docs alone)"
    console.print(f"student: teacher layers {kept} kept ({args.select}); loss: forward KL, CE weight {args.ce_weight}, "
                  f"feature weight {args.feature_weight}; lr {args.learning_rate:g}; trained on {mixed}")
    console.print(f"training: {args.steps} steps and the final validation in {fit_time:.0f} s; whole demo "
                  f"{total:.0f} s")
    console.print(f"exported student: {exported} (AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    main()
