"""Two teachers routed per source against either alone, at equal steps, on two domains.

The domains: the Python docs and Shakespeare, each cut into train documents and held-out documents (files written
under the work folder: the Python docs' topics in name order, Shakespeare's speeches in text order, the last ~20% of
each held out). The teachers: ``general``, the embedded default, and ``prose``, the embedded default fine-tuned on
the Shakespeare train speeches (plain cross-entropy, ``--prose-steps`` steps, seed 0 whatever ``--seed`` says:
the teachers are the same for every seed of the students; made once per step count, kept in the work folder).
Every student is the same 6-layer ``from_teacher`` prune of the embedded teacher, trained on both train sets
(``corpus=[python docs, shakespeare]``) for the same steps with SoftDistill's defaults (forward KL + 0.5 CE), its
teacher being:

- ``ce_only``: none (cross-entropy only, the baseline);
- ``general_only`` / ``prose_only``: one teacher for all the text;
- ``routed``: ``Teachers(sources=...)``, the Python docs graded by ``general``, Shakespeare by ``prose``;
- ``mixture``: ``Teachers(weights={general: 1, prose: 1})`` at every position.

Each student (and each teacher) is then measured on both held-out sets: perplexity and KL to each teacher.

    python benchmarks/teachers.py                   # ~10 min on 2 quiet CPU cores (bf16)
    python benchmarks/teachers.py --steps 4 --prose-steps 2 --out /tmp/teachers   # a smoke run

Writes ``benchmarks/results/teachers.{json,md}`` (``--out`` without extension).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_distill import DistillDataModule, SoftDistill, Teachers
from lightning_distill.backbone import DEFAULT_TEACHER, bf16_is_fast
from lightning_distill.callbacks import ExportStudent
from lightning_distill.data.sources import SHAKESPEARE, builtin_documents
from lightning_distill.options import Optimization, Performance

RESULTS = Path(__file__).parent / "results"
STUDENT = {"from_teacher": {"layers": 6}}
HELD_OUT = 0.2


def write_domains(folder: Path, docs_share: float) -> dict[str, str]:
    """The train and held-out JSONL files of both domains: ``{docs, docs_heldout, prose, prose_heldout}``. The
    Python docs' train file keeps ``docs_share`` of its topics (so that Shakespeare is not drowned out)."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = builtin_documents("builtin:python-docs")
    speeches = [s.strip() for s in re.split(r"\n\s*\n", SHAKESPEARE.read_text(encoding="utf-8")) if s.strip()]
    kept = topics[: max(2, round(len(topics) * docs_share))]
    split = {"docs": kept, "prose": speeches}
    paths = {}
    for name, docs in split.items():
        cut = len(docs) - max(2, round(HELD_OUT * len(docs)))
        for suffix, part in (("", docs[:cut]), ("_heldout", docs[cut:])):
            path = folder / f"{name}{suffix}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
            paths[name + suffix] = str(path)
    return paths


def trainer(steps: int, folder: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     precision="bf16-mixed" if bf16_is_fast() else "32-true", default_root_dir=str(folder), **kwargs)


def make_prose_teacher(paths: dict[str, str], folder: Path, steps: int, seed: int) -> tuple[str, float]:
    """The embedded teacher fine-tuned on the Shakespeare train speeches (cross-entropy), exported to ``folder``;
    kept and reused when it is there. Returns its folder and the seconds it took (0 when reused)."""
    done = folder / f"prose_teacher_{steps}steps"
    if (done / "config.json").exists():
        return str(done), 0.0
    L.seed_everything(seed, verbose=False)
    model = SoftDistill(student=DEFAULT_TEACHER, ce_weight=1.0, optimization=Optimization(learning_rate=1e-4),
                        performance=Performance(teacher_dtype="auto"))
    data = DistillDataModule(corpus=paths["prose"], block_size=128, batch_size=4, val_fraction=0.1, seed=seed)
    start = time.perf_counter()
    trainer(steps, folder / "prose_run", callbacks=[ExportStudent(str(done))]).fit(model, data)
    return str(done), time.perf_counter() - start


def evaluate(model: SoftDistill, paths: dict[str, str], folder: Path) -> dict[str, float]:
    """Perplexity (and, with teachers, KL to each) on both held-out sets, each served whole as the second loader."""
    out = {}
    for domain in ("docs", "prose"):
        data = DistillDataModule(corpus=paths[domain], ood_corpus=paths[f"{domain}_heldout"], block_size=128,
                                 batch_size=4, val_fraction=0.1)
        validator = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                              precision="bf16-mixed" if bf16_is_fast() else "32-true", default_root_dir=str(folder))
        validator.validate(model, data, verbose=False)
        for key, value in validator.callback_metrics.items():
            if key.startswith("val_ood/"):
                out[f"{domain}/{key.removeprefix('val_ood/')}"] = float(value)
    return out


def rows(prose_teacher: str, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    models = {"general": DEFAULT_TEACHER, "prose": prose_teacher}
    sources = {paths["docs"]: "general", paths["prose"]: "prose"}
    return {
        "ce_only": {"teacher": DEFAULT_TEACHER, "ce_weight": 1.0},
        "general_only": {"teacher": DEFAULT_TEACHER},
        # every student is pruned from the main (first) teacher, the general one: here it grades nothing
        "prose_only": {"teacher": Teachers(models=models, sources={path: "prose" for path in sources})},
        "routed": {"teacher": Teachers(models=models, sources=sources)},
        "mixture": {"teacher": Teachers(models=models, weights={"general": 1.0, "prose": 1.0})},
    }


def judge(models: dict[str, str]) -> Teachers:
    """Both teachers, on every block: a module whose validation logs each one's KL to the student under test."""
    return Teachers(models=models, weights={name: 1.0 for name in models})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps of every student")
    parser.add_argument("--prose-steps", type=int, default=10,
                        help="fine-tuning steps of the prose teacher (60 overfit its 28 train blocks)")
    parser.add_argument("--docs-share", type=float, default=0.15, help="share of the Python docs' topics trained on")
    parser.add_argument("--methods", default="ce_only,general_only,prose_only,routed,mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "teachers"), help="output path without extension")
    args = parser.parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "ld_teachers"
    paths = write_domains(workdir / "domains", args.docs_share)
    prose_teacher, prose_seconds = make_prose_teacher(paths, workdir, args.prose_steps, seed=0)
    print(f"[teachers] prose teacher: {prose_teacher} ({prose_seconds:.0f} s)", flush=True)
    table = rows(prose_teacher, paths)
    teachers = {"general": DEFAULT_TEACHER, "prose": prose_teacher}
    results: dict[str, Any] = {}
    for name in args.methods.split(","):
        L.seed_everything(args.seed, verbose=False)
        model = SoftDistill(**{"student": STUDENT, "performance": Performance(teacher_dtype="auto"), **table[name]})
        data = DistillDataModule(corpus=[paths["docs"], paths["prose"]], block_size=128, batch_size=4,
                                 val_fraction=0.1, seed=args.seed)
        start = time.perf_counter()
        trainer(args.steps, workdir / name).fit(model, data)
        wall = time.perf_counter() - start
        scored = SoftDistill(teacher=judge(teachers), student=STUDENT, performance=Performance(teacher_dtype="auto"))
        scored.configure_model()
        scored.student.load_state_dict(model.student.state_dict())
        results[name] = {"wall_s": wall, **evaluate(scored, paths, workdir / name)}
        row = results[name]
        print(f"[teachers] {name}: ppl docs {row['docs/ppl']:.1f}, Shakespeare {row['prose/ppl']:.1f}, {wall:.0f} s",
              flush=True)
    teacher_rows = {}
    for name, spec in teachers.items():  # each teacher's own perplexity on the held-out sets
        alone = SoftDistill(teacher=spec, student=spec, performance=Performance(teacher_dtype="auto"))
        teacher_rows[name] = evaluate(alone, paths, workdir / f"teacher_{name}")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{'no GPU' if not torch.cuda.is_available() else torch.cuda.get_device_name()}, precision "
               f"{'bf16-mixed' if bf16_is_fast() else 'fp32'}")
    command = "python benchmarks/teachers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(Path(args.out), results, teacher_rows, vars(args), prose_seconds, machine, command.strip())


def write(out: Path, results: dict[str, Any], teacher_rows: dict[str, Any], settings: dict[str, Any],
          prose_seconds: float, machine: str, command: str) -> None:
    date = time.strftime("%Y-%m-%d")
    payload = {"machine": machine, "command": command, "date": date, "settings": settings,
               "prose_teacher_seconds": prose_seconds, "teachers": teacher_rows, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    lines = [f"Machine: {machine}. Command: `{command}`. Date: {date}.", "",
             f"Students: 6-layer prunes of the embedded teacher, {settings['steps']} steps x 4x128 tokens on the "
             "Python docs' and Shakespeare's train documents together; measured on each domain's held-out "
             f"documents. The prose teacher: the embedded one fine-tuned {settings['prose_steps']} steps on the "
             "Shakespeare train speeches.", "",
             "| student's teacher | ppl Python docs | ppl Shakespeare | KL to general (docs) | KL to prose "
             "(Shakespeare) | train wall time |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in teacher_rows.items():
        lines.append(f"| *teacher {name} itself* | {row['docs/ppl']:.1f} | {row['prose/ppl']:.1f} | | | |")
    for name, row in results.items():
        lines.append(f"| {name} | {row['docs/ppl']:.1f} | {row['prose/ppl']:.1f} | "
                     f"{row.get('docs/kl_general', float('nan')):.3f} | {row.get('prose/kl_prose', float('nan')):.3f} "
                     f"| {row['wall_s']:.0f} s |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"[teachers] wrote {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
