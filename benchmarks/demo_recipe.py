"""How the demo's recipe was chosen: the demo's run (teacher, data, 6-layer student, steps, batch, precision,
validation) with candidate student layers, feature distillation and learning rates, each reported as the student's
perplexity over the teacher's, in domain (held-out Python docs) and out of domain (Shakespeare).

    python benchmarks/demo_recipe.py                       # every candidate: ~2.5 min each on 2 quiet CPU cores
    python benchmarks/demo_recipe.py --only today,importance --steps 120
    python benchmarks/demo_recipe.py --only today --steps 2 --val-batches 1 --out /tmp/demo_recipe   # a smoke run

Every candidate runs the steps of ``make demo`` (``lightning_distill.demo``), except the ``*_160steps`` ones, which
ask whether more steps fit the demo's earlier wall time now that steps are faster: the layers a student keeps and
the feature term hardly change the cost of a step, so the table's fit wall-time column compares them. Writes
``benchmarks/results/demo_recipe.{json,md}`` with the machine, versions, command and date; ``--keep`` keeps the rows
of an earlier run whose candidates are not run again (a sweep in parts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from quality import plain

from lightning_distill.backbone import bf16_is_fast
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.data import DistillDataModule, sources
from lightning_distill.modules import SoftDistill
from lightning_distill.options import Features, Optimization

RESULTS = Path(__file__).parent / "results"
EVENLY = {"from_teacher": {"layers": 6}}
IMPORTANCE = {"from_teacher": {"layers": 6, "select": "importance"}}
FEATURES = {"features": Features(weight=1.0)}  # the feature term at weight 1 (cosine, the matched layers)
LR_2E3 = {"optimization": Optimization(learning_rate=2e-3)}
FROZEN_EMB = Optimization(learning_rate=2e-3, train_embeddings=False)
L8 = {"from_teacher": {"layers": 8, "select": "importance"}}
L9 = {"from_teacher": {"layers": 9, "select": "importance"}}
WRITING = "builtin:smollm2-writing"  # 144 documents the teacher wrote (lightning_distill.data.writing)
RECIPE = {"student": IMPORTANCE, **FEATURES, "ce_weight": 0.25, **LR_2E3}  # the demo's recipe since 2026-11-30
CANDIDATES: dict[str, dict[str, Any]] = {  # name -> SoftDistill arguments (student spec included)
    "today": {"student": EVENLY},
    "importance": {"student": IMPORTANCE},
    "features": {"student": EVENLY, **FEATURES},
    "importance_features": {"student": IMPORTANCE, **FEATURES},
    "importance_lr2e-3": {"student": IMPORTANCE, **LR_2E3},
    "importance_features_lr2e-3": {"student": IMPORTANCE, **FEATURES, **LR_2E3},
    "importance_pure_kl": {"student": IMPORTANCE, "ce_weight": 0.0},
    "importance_features_pure_kl": {"student": IMPORTANCE, **FEATURES, "ce_weight": 0.0},
    "importance_features_pure_kl_lr2e-3": {"student": IMPORTANCE, **FEATURES, "ce_weight": 0.0, **LR_2E3},
    "importance_features_ce0.25_lr2e-3": {"student": IMPORTANCE, **FEATURES, "ce_weight": 0.25, **LR_2E3},
    # issue #25: from the recipe above, toward <= 2.0x in domain and <= 8x on Shakespeare in the demo's wall time
    "recipe_T2": {**RECIPE, "temperature": 2.0},
    "recipe_frozen_emb": {**RECIPE, "optimization": Optimization(learning_rate=2e-3, train_embeddings=False)},
    "recipe_frozen_emb_160steps": {**RECIPE, "optimization": Optimization(learning_rate=2e-3, train_embeddings=False),
                                   "steps": 160},
    "recipe_lr3e-3": {**RECIPE, "optimization": Optimization(learning_rate=3e-3)},
    "recipe_T2_lr3e-3": {**RECIPE, "temperature": 2.0, "optimization": Optimization(learning_rate=3e-3)},
    "L8_recipe": {**RECIPE, "student": {"from_teacher": {"layers": 8, "select": "importance"}}},
    "L8_recipe_frozen_emb": {**RECIPE, "student": {"from_teacher": {"layers": 8, "select": "importance"}},
                             "optimization": FROZEN_EMB},
    "L7_recipe_frozen_emb": {**RECIPE, "student": {"from_teacher": {"layers": 7, "select": "importance"}},
                             "optimization": FROZEN_EMB},
    "L8_frozen_emb_ce0.1": {**RECIPE, "student": {"from_teacher": {"layers": 8, "select": "importance"}},
                            "optimization": FROZEN_EMB, "ce_weight": 0.1},
    "recipe_frozen_emb_ce0.1_160steps": {**RECIPE, "optimization": FROZEN_EMB, "ce_weight": 0.1, "steps": 160},
    # issue #25, sweep 4: text the teacher wrote (`lightning-distill write`) mixed into training; mix_documents: its
    # first N documents (the builtin holds 144), and fused AdamW from here on (the same numbers, cheaper steps)
    "L8_recipe_mix288": {**RECIPE, "student": L8, "mix": WRITING, "mix_documents": 288},
    "L8_recipe_mix192": {**RECIPE, "student": L8, "mix": WRITING, "mix_documents": 192},
    "L8_recipe_mix144": {**RECIPE, "student": L8, "mix": WRITING, "mix_documents": 144},
    "L8_recipe_mix96": {**RECIPE, "student": L8, "mix": WRITING, "mix_documents": 96},
    "L8_no_features_mix144": {**RECIPE, "student": L8, "features": None, "mix": WRITING, "mix_documents": 144},
    "L8_recipe_mix144_130steps": {**RECIPE, "student": L8, "mix": WRITING, "mix_documents": 144, "steps": 130},
    "L9_recipe_mix144": {**RECIPE, "student": L9, "mix": WRITING, "mix_documents": 144},
    "L9_recipe_mix144_112steps": {**RECIPE, "student": L9, "mix": WRITING, "mix_documents": 144, "steps": 112},
    "L9_mix288": {"student": L9, "mix": WRITING, "mix_documents": 288, **LR_2E3},  # SoftDistill's defaults, 9 layers
    "L9_mix288_112steps": {"student": L9, "mix": WRITING, "mix_documents": 288, **LR_2E3, "steps": 112},
    "L9_mix": {"student": L9, "mix": WRITING, **LR_2E3},  # the builtin writing (144 documents)
    "L9_mix_112steps": {"student": L9, "mix": WRITING, **LR_2E3, "steps": 112},  # the demo since sweep 4
    "importance_160steps": {"student": IMPORTANCE, "steps": 160},
    "importance_features_160steps": {"student": IMPORTANCE, **FEATURES, "steps": 160},
}
"""``steps``: this candidate's optimizer steps instead of ``--steps`` (more steps in the demo's wall time); ``mix``: a
corpus mixed into training (validation stays on the Python docs), ``mix_documents``: only its first N documents."""
RUN_KEYS = ("steps", "mix", "mix_documents")


def mix_source(mix: str, documents: int | None, args: argparse.Namespace) -> str:
    """The corpus to mix in: ``mix``, or a JSONL file of the first ``documents`` documents of ``mix`` (of
    ``--writing`` when given, in place of the builtin writing: exactly what ``lightning-distill write --documents N``
    writes when N is a multiple of its batch size, 48; the builtin holds the first 144 of the sweep's 288)."""
    if documents is None:
        return mix
    mix = args.writing if mix == WRITING and args.writing else mix
    texts = sources.documents(mix)
    if len(texts) < documents:
        raise SystemExit(f"{mix} holds {len(texts)} documents, this candidate mixes {documents}: write them with "
                         f"`lightning-distill write --documents 288 --out writing.jsonl`, then pass --writing "
                         "writing.jsonl")
    path = Path(tempfile.mkdtemp(prefix="demo_recipe_mix_")) / f"mix_{documents}.jsonl"  # this process' own
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:documents]))
    return str(path)


def run(name: str, kwargs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One candidate, set up as ``lightning_distill.demo.main`` sets up the demo: metrics before and after."""
    L.seed_everything(0, verbose=False)
    start = time.perf_counter()
    steps = kwargs.get("steps", args.steps)
    model = SoftDistill(**{k: v for k, v in kwargs.items() if k not in RUN_KEYS})
    corpus = "builtin:python-docs"
    mixed = {}
    if "mix" in kwargs:  # validated on the Python docs alone, as the demo
        mixed = {"corpus": [corpus, mix_source(kwargs["mix"], kwargs.get("mix_documents"), args)],
                 "val_sources": [corpus]}
    data = DistillDataModule(**{"corpus": corpus, **mixed}, ood_corpus="builtin:shakespeare", block_size=128,
                             batch_size=4)
    data.set_tokenizer(model.tokenizer, model.max_positions)
    data.prepare_data()
    data.setup("fit")
    epochs = math.ceil(steps / math.ceil(len(data.train_blocks) / 4))
    precision = "bf16-mixed" if bf16_is_fast() else "32-true"
    trainer = L.Trainer(max_steps=steps, max_epochs=epochs, precision=precision,
                        limit_val_batches=args.val_batches, val_check_interval=steps,
                        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, enable_progress_bar=False,
                        callbacks=[ReuseFreedMemory()],  # as the demo: on CPU, freed memory kept for reuse
                        default_root_dir=str(Path(args.out).parent / "demo_recipe_runs" / name))
    trainer.validate(model, data, verbose=False)
    before = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}
    fit_start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - fit_start
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}
    layers = getattr(model.student.config, "distill_teacher_layers", None)
    row = {"name": name, "kwargs": plain(kwargs), "steps": steps, "teacher_layers": layers, "before": before,
           "after": after, "fit_s": fit_s, "total_s": time.perf_counter() - start,
           "ratio": after["val/ppl"] / after["val/teacher_ppl"],
           "ratio_ood": after["val_ood/ppl"] / after["val_ood/teacher_ppl"]}
    print(f"[demo_recipe] {name}: layers {layers}, ppl {after['val/ppl']:.1f} ({row['ratio']:.2f}x teacher), "
          f"Shakespeare {after['val_ood/ppl']:.1f} ({row['ratio_ood']:.2f}x), fit {fit_s:.0f} s", flush=True)
    return row


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    teacher = rows[0]["after"]
    lines = [f"Measured by `{report['command']}` on {report['date']}: {report['machine']}.", "",
             f"The demo's run ({report['steps']} steps of 4 x 128 tokens unless a row says, SoftDistill's loss, "
             f"{report['precision']}) per candidate; teacher perplexity {teacher['val/teacher_ppl']:.1f} in domain, "
             f"{teacher['val_ood/teacher_ppl']:.1f} on Shakespeare. Ratio: student perplexity / teacher's."
             + (f" {report['note']}" if report.get("note") else ""), "",
             "| candidate | steps | teacher layers kept | ppl as pruned | ppl in domain | ratio | ppl Shakespeare "
             "| ratio | top-1 agreement | KL | fit wall time |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["after"]
        lines.append(f"| {r['name']} | {r.get('steps', report['steps'])} | {r['teacher_layers']} | "
                     f"{r['before']['val/ppl']:.3g} | {a['val/ppl']:.1f} | "
                     f"{r['ratio']:.2f}x | {a['val_ood/ppl']:.1f} | {r['ratio_ood']:.2f}x | "
                     f"{a['val/agreement']:.3f} | {a['val/kl']:.3f} | {r['fit_s']:.0f} s |")
    lines += ["", "Arguments per candidate: " + "; ".join(f"`{r['name']}`: `{json.dumps(r['kwargs'])}`"
                                                          for r in rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidate names")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (120: the demo's until sweep 4)")
    parser.add_argument("--val-batches", type=int, default=8, help="validation batches per split (the demo's 8)")
    parser.add_argument("--out", default=str(RESULTS / "demo_recipe"), help="OUT.json and OUT.md are written")
    parser.add_argument("--writing", default=None, help="the teacher's writing to mix in instead of the builtin (sweep "
                        "4 ran on `lightning-distill write --documents 288`'s file; the builtin is its first 144)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of OUT.json whose candidates are not run now (a sweep in parts)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"--only: unknown candidates {unknown}; known: {sorted(CANDIDATES)}")
    load_before = os.getloadavg()
    versions = {p: __import__(p).__version__ for p in ("torch", "transformers", "lightning")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.with_suffix(".json").read_text()) if args.keep and out.with_suffix(".json").exists() \
        else {"rows": []}
    rows: list[dict[str, Any]] = [row for row in earlier["rows"] if row["name"] not in names]
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if rows:  # the earlier part's command too
        command = f"{earlier['command']}`, then `{command}"
    for name in names:  # the files are rewritten after each candidate: an interrupted sweep keeps what finished
        rows.append(run(name, CANDIDATES[name], args))
        report = {"command": command,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                             + ", ".join(f"{k} {v}" for k, v in versions.items())
                             + ", load average (1, 5, 15 min) {:.1f}, {:.1f}, {:.1f} before, {:.1f}, {:.1f}, {:.1f} now"
                               .format(*load_before, *os.getloadavg()),
                  "steps": args.steps, "precision": "bf16-mixed" if bf16_is_fast() else "32-true", "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
