"""How SoftDistill's defaults were chosen: a sweep of CE weight, learning rate, feature term (and, earlier,
divergence, temperature and frozen embeddings), each row trained at the budgets of ``benchmarks/quality.py``.

    python benchmarks/recipe_sweep.py --only imp_ce0.5_lr1e-3,imp_ce0.25_lr2e-3 --out benchmarks/results/defaults_sweep
    python benchmarks/recipe_sweep.py --steps 60 --only ce_only,fkl_ce0.5    # the 2026-11-27 sweep's budget

``--budgets`` takes quality.py's budget names (``short``: 40 steps over the whole corpus, ``multi_epoch``: 60 steps
over 8 documents) and ``stepsN`` (N steps over the whole corpus, validated once at the end; ``--steps N`` is the
same). Writes OUT.{json,md}.
The rule that picks a default: the lowest geometric mean of the student's perplexities, in domain and on
Shakespeare, at every budget run (``score`` column: the mean log perplexity). The ``imp_*`` candidates keep the 6
teacher layers of highest measured importance, the others name the evenly spaced 6 layers the earlier sweep used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from quality import BUDGETS, RESULTS, Budget, Method, TeacherCache, plain, run

from lightning_distill import SoftDistill
from lightning_distill.backbone import bf16_is_fast
from lightning_distill.losses import GeneralizedJSD, SkewKL
from lightning_distill.options import Features, Optimization

LR_5E4, LR_1E3, LR_2E3, LR_3E3 = (Optimization(learning_rate=lr) for lr in (5e-4, 1e-3, 2e-3, 3e-3))
FROZEN_EMB_5E4 = Optimization(learning_rate=5e-4, train_embeddings=False)
EVENLY = {"student": {"from_teacher": {"layers": 6, "select": "evenly"}}}
IMPORTANCE = {"student": {"from_teacher": {"layers": 6, "select": "importance"}}}
FEATURES = {"features": Features(weight=1.0)}
CANDIDATES: dict[str, dict] = {  # SoftDistill arguments; quality.run adds performance (teacher_dtype, chunk_size=0)
    "ce_only": {**EVENLY, "ce_weight": 1.0, "optimization": LR_5E4},
    "ce_only_frozen_emb": {**EVENLY, "ce_weight": 1.0, "optimization": FROZEN_EMB_5E4},
    "fkl_pure": {**EVENLY, "ce_weight": 0.0, "optimization": LR_5E4},
    "fkl_ce0.5": {**EVENLY, "ce_weight": 0.5, "optimization": LR_5E4},
    "fkl_ce0.5_frozen_emb": {**EVENLY, "ce_weight": 0.5, "optimization": FROZEN_EMB_5E4},
    "fkl_pure_frozen_emb": {**EVENLY, "ce_weight": 0.0, "optimization": FROZEN_EMB_5E4},
    "fkl_ce0.5_lr1e-3": {**EVENLY, "ce_weight": 0.5, "optimization": LR_1E3},
    "fkl_ce0.5_T2": {**EVENLY, "ce_weight": 0.5, "temperature": 2.0, "optimization": LR_5E4},
    "ce_only_lr1e-3": {**EVENLY, "ce_weight": 1.0, "optimization": LR_1E3},
    "fkl_pure_lr1e-3": {**EVENLY, "ce_weight": 0.0, "optimization": LR_1E3},
    "fkl_ce0.5_lr2e-3": {**EVENLY, "ce_weight": 0.5, "optimization": LR_2E3},
    "jsd_ce0.5": {**EVENLY, "ce_weight": 0.5, "loss": GeneralizedJSD(beta=0.5), "optimization": LR_5E4},
    "skew_kl_ce0.5": {**EVENLY, "ce_weight": 0.5, "loss": SkewKL(alpha=0.1), "optimization": LR_5E4},
    "rkl_ce0.5": {**EVENLY, "ce_weight": 0.5, "loss": "reverse_kl", "optimization": LR_5E4},
    # 2026-12-03 (issue #25): from the importance-selected student, at quality.py's budgets
    "imp_ce0.5_lr1e-3": {**IMPORTANCE, "ce_weight": 0.5, "optimization": LR_1E3},
    "imp_ce0.5_lr2e-3": {**IMPORTANCE, "ce_weight": 0.5, "optimization": LR_2E3},
    "imp_ce0.25_lr2e-3": {**IMPORTANCE, "ce_weight": 0.25, "optimization": LR_2E3},
    "imp_ce0.25_lr3e-3": {**IMPORTANCE, "ce_weight": 0.25, "optimization": LR_3E3},
    "imp_pure_lr2e-3": {**IMPORTANCE, "ce_weight": 0.0, "optimization": LR_2E3},
    "imp_ce0.25_lr2e-3_features": {**IMPORTANCE, **FEATURES, "ce_weight": 0.25, "optimization": LR_2E3},
    "imp_ce0.5_lr2e-3_features": {**IMPORTANCE, **FEATURES, "ce_weight": 0.5, "optimization": LR_2E3},
}


def budget(name: str) -> Budget:
    """quality.py's budget ``name``, or ``stepsN``: N steps over the whole corpus, validated at the end."""
    if name.startswith("steps") and name[5:].isdigit():
        return Budget(steps=int(name[5:]), batch_size=4, val_every=int(name[5:]), max_documents=None)
    if name not in BUDGETS:
        raise SystemExit(f"--budgets: unknown {name!r}; use {list(BUDGETS)} or stepsN")
    return BUDGETS[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="short,multi_epoch", help="quality.py budget names, or stepsN")
    parser.add_argument("--steps", type=int, default=None, help="= --budgets stepsN (the 2026-11-27 sweep's form)")
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "recipe_sweep"))
    args = parser.parse_args()
    if args.steps is not None:
        args.budgets = f"steps{args.steps}"
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose among {list(CANDIDATES)}")
    budgets = {name: budget(name) for name in args.budgets.split(",")}
    cache = TeacherCache()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "ld_sweep"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{'bf16-mixed' if bf16_is_fast() else 'fp32'}")
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    rows: dict[str, dict[str, dict]] = {}  # candidate -> budget -> quality.run's row
    for name in names:  # written after every run: an interrupted sweep keeps what finished
        for budget_name, spec in budgets.items():
            method = Method(SoftDistill, CANDIDATES[name], "live logits")
            rows.setdefault(name, {})[budget_name] = run(name, method, spec, cache, args.seed, workdir)
            report = {"command": command, "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"),
                      "seed": args.seed, "budgets": {k: b.label for k, b in budgets.items()}, "rows": rows}
            out.with_suffix(".json").write_text(json.dumps(report, indent=1))
            out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


def score(row: dict[str, dict]) -> float:
    """The mean log perplexity, in domain and on Shakespeare, over a candidate's budgets (lower is better)."""
    logs = [math.log(r["final"][k]) for r in row.values() for k in ("val/ppl", "val_ood/ppl")]
    return sum(logs) / len(logs)


def markdown(report: dict) -> str:
    budgets = list(report["budgets"])
    lines = [f"Measured by `{report['command']}` on {report['date']}: {report['machine']}, seed {report['seed']}.",
             "", "Budgets: " + "; ".join(f"`{k}`: {v}" for k, v in report["budgets"].items()) + ". Score: the mean "
             "log perplexity (in domain and Shakespeare, every budget; lower is better).", "",
             "| candidate | arguments | " + " | ".join(f"{b}: ppl docs / Shakespeare / agreement / wall"
                                                      for b in budgets) + " | score |",
             "|---|---|" + "---:|" * (len(budgets) + 1)]
    complete = {n: r for n, r in report["rows"].items() if all(b in r for b in budgets)}
    for name, row in sorted(complete.items(), key=lambda item: score(item[1])):
        cells = []
        for b in budgets:
            f = row[b]["final"]
            cells.append(f"{f['val/ppl']:.1f} / {f['val_ood/ppl']:.1f} / {f['val/agreement']:.3f} / "
                         f"{row[b]['wall_s']:.0f} s")
        lines.append(f"| {name} | `{json.dumps(plain(CANDIDATES[name]))}` | {' | '.join(cells)} | "
                     f"{score(row):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
