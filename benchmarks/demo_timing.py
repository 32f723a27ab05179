"""The wall time of ``make demo`` at two commits, side by side on one machine: from a fresh clone, then alternately
with the environment in place.

    python benchmarks/demo_timing.py --before 3aa1661 --after HEAD          # ~10 min on 2 quiet CPU cores
    python benchmarks/demo_timing.py --before HEAD --after HEAD --repeats 0 --keep /tmp/clones   # a smoke run

Each commit is cloned from this repository into its own folder and ``make demo`` runs there (creating ``.venv``,
installing, then the demo: the README's first command), timed from outside; then ``--repeats`` more runs per commit,
alternating, reuse the environments. The pip cache and ``~/.cache/lightning_distill`` (the converted teacher, token
caches) are whatever this machine has, the same for both. From each run's output it reads the demo's own timing line
and its two perplexity ratios. Run it alone: anything else on the machine moves the times. Writes
``benchmarks/results/demo_timing.{json,md}`` with the machine, versions, command and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def clone(commit: str, where: Path) -> str:
    """A clone of this repository at ``commit`` in ``where``; its full hash."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", commit], check=True)
    return subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_demo(where: Path, kind: str) -> dict[str, Any]:
    """``make demo`` in ``where``, timed; what the demo printed about itself."""
    start = time.perf_counter()
    done = subprocess.run(["make", "demo"], cwd=where, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"make demo failed in {where}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    out = done.stdout
    timing = re.search(r"training: (\d+) steps and the final validation in (\d+) s; whole demo (\d+) s", out)
    ratios = re.findall(r"perplexity / teacher's, [^│]*│\s*1x\s*│[^│]*│\s*([\d.]+)x", out)
    row = {"kind": kind, "seconds": round(seconds, 2), "ratios": [float(r) for r in ratios]}
    if timing:
        row.update(steps=int(timing[1]), fit_s=int(timing[2]), demo_s=int(timing[3]))
    print(f"[demo_timing] {where.name} {kind}: {seconds:.1f} s {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="3aa1661", help="the commit to compare against")
    parser.add_argument("--after", default="HEAD", help="the commit measured")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs per commit with .venv in place")
    parser.add_argument("--keep", default=None, help="clone into this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS / "demo_timing"), help="OUT.json and OUT.md are written")
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="demo_timing_"))
    load_before = os.getloadavg()
    clones = {name: root / name for name in ("before", "after")}
    commits = {name: clone(getattr(args, name), clones[name]) for name in clones}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clones}
    try:
        for name in clones:
            runs[name].append(run_demo(clones[name], "fresh clone"))
        for _ in range(args.repeats):
            for name in clones:
                runs[name].append(run_demo(clones[name], "environment in place"))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, lightning; print(torch.__version__, "
                               "transformers.__version__, lightning.__version__)"], capture_output=True, text=True)
    report = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch / transformers / lightning "
                         f"{versions.stdout.strip()}, load average (1, 5, 15 min) "
                         + "{:.1f}, {:.1f}, {:.1f} before, {:.1f}, {:.1f}, {:.1f} after".format(
                             *load_before, *os.getloadavg()),
              "commits": commits, "runs": runs}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured by `{report['command']}` on {report['date']}: {report['machine']}.", "",
             "`make demo` at each commit, in run order per kind (fresh clone: `.venv` created and installed, then "
             "the demo; then alternately with the environment in place). Wall time from outside; the demo's own "
             "timing line and ratios as it printed them.", "",
             "| commit | run | wall time | steps | training + final validation | whole demo | ratio docs | "
             "ratio Shakespeare |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in report["runs"].items():
        for run in runs:
            ratios = run["ratios"] + [float("nan")] * (2 - len(run["ratios"]))
            lines.append(f"| {name} ({report['commits'][name][:7]}) | {run['kind']} | {run['seconds']:.1f} s | "
                         f"{run.get('steps', '-')} | {run.get('fit_s', '-')} s | {run.get('demo_s', '-')} s | "
                         f"{ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
