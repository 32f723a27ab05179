"""How SoftDistill's default recipe was chosen: a sweep of divergence, CE weight, temperature, learning rate and
frozen embeddings at one budget, each against the CE-only baseline, on the embedded default.

    python benchmarks/recipe_sweep.py                      # 1-10 min per candidate on 2 cores (results/)
    python benchmarks/recipe_sweep.py --steps 120 --only ce_only,fkl_ce0.5

Writes ``benchmarks/results/recipe_sweep.{json,md}``. A good default keeps more of the teacher's general skill than
CE-only (lower out-of-domain perplexity, higher agreement) while staying close in domain.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from quality import RESULTS, Budget, Method, TeacherCache, plain, run

from lightning_distill import SoftDistill
from lightning_distill.losses import GeneralizedJSD, SkewKL
from lightning_distill.options import Optimization

LR_5E4, LR_1E3, LR_2E3 = (Optimization(learning_rate=lr) for lr in (5e-4, 1e-3, 2e-3))
FROZEN_EMB_5E4 = Optimization(learning_rate=5e-4, train_embeddings=False)
CANDIDATES: dict[str, dict] = {  # SoftDistill arguments; quality.run adds performance (teacher_dtype, chunk_size=0)
    "ce_only": {"ce_weight": 1.0, "optimization": LR_5E4},
    "ce_only_frozen_emb": {"ce_weight": 1.0, "optimization": FROZEN_EMB_5E4},
    "fkl_pure": {"ce_weight": 0.0, "optimization": LR_5E4},
    "fkl_ce0.5": {"ce_weight": 0.5, "optimization": LR_5E4},
    "fkl_ce0.5_frozen_emb": {"ce_weight": 0.5, "optimization": FROZEN_EMB_5E4},
    "fkl_pure_frozen_emb": {"ce_weight": 0.0, "optimization": FROZEN_EMB_5E4},
    "fkl_ce0.5_lr1e-3": {"ce_weight": 0.5, "optimization": LR_1E3},
    "fkl_ce0.5_T2": {"ce_weight": 0.5, "temperature": 2.0, "optimization": LR_5E4},
    "ce_only_lr1e-3": {"ce_weight": 1.0, "optimization": LR_1E3},
    "fkl_pure_lr1e-3": {"ce_weight": 0.0, "optimization": LR_1E3},
    "fkl_ce0.5_lr2e-3": {"ce_weight": 0.5, "optimization": LR_2E3},
    "jsd_ce0.5": {"ce_weight": 0.5, "loss": GeneralizedJSD(beta=0.5), "optimization": LR_5E4},
    "skew_kl_ce0.5": {"ce_weight": 0.5, "loss": SkewKL(alpha=0.1), "optimization": LR_5E4},
    "rkl_ce0.5": {"ce_weight": 0.5, "loss": "reverse_kl", "optimization": LR_5E4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--out", default=str(RESULTS / "recipe_sweep"))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    budget = Budget(steps=args.steps, batch_size=args.batch_size, val_every=args.steps, max_documents=None)
    cache = TeacherCache()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "ld_sweep"
    rows = [run(n, Method(SoftDistill, CANDIDATES[n], "live logits"), budget, cache, 0, workdir) for n in names]
    lines = [f"Recipe sweep, {args.steps} steps x {args.batch_size}x128 tokens, seed 0, {time.strftime('%Y-%m-%d')}",
             "", "| candidate | arguments | ppl in domain | ppl Shakespeare | KL | agreement | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        f = row["final"]
        lines.append(f"| {row['method']} | `{json.dumps(plain(CANDIDATES[row['method']]))}` | {f['val/ppl']:.1f} | "
                     f"{f['val_ood/ppl']:.1f} | {f['val/kl']:.3f} | {f['val/agreement']:.3f} | {row['wall_s']:.0f} s |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
