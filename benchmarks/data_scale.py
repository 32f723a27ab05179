"""Data at scale, measured: preparing (tokenizing once) and streaming synthetic corpora of 10^6, 10^7 and 10^8 tokens,
against the in-memory path, and a label store written and read at 10^7 tokens.

    python benchmarks/data_scale.py                                    # ~30 min on 2 CPU cores
    python benchmarks/data_scale.py --sizes 1e6 --label-tokens 1e5 --student-steps 1 --out /tmp/ds   # smoke run

Corpora are JSONL shards of the built-in documents (``pydoc_data.topics``), repeated in seeded shuffled order with a
numbered header each, up to the target token count of the embedded teacher's tokenizer (SmolLM2, vocab 49152);
nothing is downloaded. Every measurement runs in its own subprocess, sampled every 0.2 s for the memory of its
whole process tree (preparation and loader workers included): the peak sum of RSS, and the peak sum of PSS (shared
pages counted once, the memory the tree really takes).

1. Preparation: ``prepare_corpus`` with 1 and 2 worker processes (one tokenizer thread each), chunks of 4M tokens;
   tokens/s over the call.
2. The in-memory path (``DistillDataModule(corpus=jsonl files)``: tokenize, cache, pack), 10^6 and 10^7 tokens.
3. Training loads: one epoch of the streamed train loader (batches of 4 x 1024, 2 DataLoader workers); tokens/s and
   memory. The student's own training speed (6 of 30 layers, bf16 autocast, 4 x 128 tokens, forward + backward +
   AdamW) is what the loader must outpace.
4. Labels: a 10^7-token corpus in the tiny test tokenizer (vocab 384) labelled by a tiny random teacher (top-8, fp16)
   through ``trainer.predict`` + ``LabelWriter``, then read back along one shuffled epoch of the streamed corpus.

Writes ``benchmarks/results/data_scale.json`` and ``.md``. The machine is shared: compare within a run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "builtin:smollm2-135m-instruct"
THREADS = 1  # torch threads per process (--threads): on a loaded machine 2 threads of small ops thrash


# --- the measured tasks, each run in a subprocess: python data_scale.py --task NAME ARGS_JSON ----------------------


def task_prepare(a: dict[str, Any]) -> dict[str, Any]:
    from lightning_distill.data import prepare_corpus

    shutil.rmtree(a["out"], ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    prepare_corpus(f"{a['corpus']}/*.jsonl", a["out"], a["tokenizer"], block_size=a["block_size"],
                   num_workers=a["workers"])
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    manifest = json.loads(Path(a["out"], "corpus.json").read_text())
    tokens = sum(c["tokens"] for s in manifest["splits"].values() for c in s["chunks"])
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu,
            "tokens_per_cpu_s": tokens / cpu, "chunks": sum(len(s["chunks"]) for s in manifest["splits"].values())}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the preparation workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def task_in_memory(a: dict[str, Any]) -> dict[str, Any]:
    from lightning_distill import DistillDataModule

    os.environ["LIGHTNING_DISTILL_DATA_CACHE"] = a["cache"]
    start = time.perf_counter()
    data = DistillDataModule(corpus=f"{a['corpus']}/*.jsonl", tokenizer=a["tokenizer"], block_size=a["block_size"])
    data.prepare_data()
    data.setup("fit")
    seconds = time.perf_counter() - start
    tokens = (len(data.train_blocks) + len(data.val_blocks)) * a["block_size"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def task_load(a: dict[str, Any]) -> dict[str, Any]:
    from lightning_distill import DistillDataModule

    data = DistillDataModule(corpus=a["corpus"], tokenizer=a["tokenizer"], block_size=a["block_size"],
                             batch_size=a["batch_size"], num_workers=a["workers"])
    data.setup("fit")
    tokens, start = 0, time.perf_counter()
    for batch in data.train_dataloader():
        tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def task_student(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lightning_distill.backbone import build_student, load_teacher

    teacher, _ = load_teacher(TEACHER)
    student = build_student({"from_teacher": {"layers": 6}}, teacher)
    del teacher
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = torch.randint(student.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(a["steps"] + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2] if a["steps"] else times[0]
    return {"seconds_per_step": step, "tokens_per_s": ids.numel() / step}


def task_label(a: dict[str, Any]) -> dict[str, Any]:
    import lightning as L

    from lightning_distill import DistillDataModule, SoftDistill
    from lightning_distill.callbacks import ReuseFreedMemory
    from lightning_distill.store import LabelWriter

    shutil.rmtree(a["store"], ignore_errors=True)
    model = SoftDistill(teacher=a["teacher"], student={"from_teacher": {"layers": 1}})  # only its teacher runs
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LabelWriter(a["store"], kind="topk", k=8, shard_blocks=256),
                                   ReuseFreedMemory()])  # freed memory kept for reuse, as the modules did before
    data = DistillDataModule(corpus=a["corpus"], block_size=a["block_size"], batch_size=256)
    start = time.perf_counter()
    trainer.predict(model, datamodule=data)
    seconds = time.perf_counter() - start
    manifest = json.loads(Path(a["store"], "manifest.json").read_text())
    tokens = sum(s["blocks"] for s in manifest["splits"].values()) * a["block_size"]
    nbytes = sum(f.stat().st_size for f in Path(a["store"]).iterdir())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "bytes": nbytes,
            "bytes_per_token": nbytes / tokens, "shards": sum(len(s["shards"]) for s in manifest["splits"].values())}


def task_read(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lightning_distill import DistillDataModule
    from lightning_distill.store import LabelStore

    start = time.perf_counter()
    store = LabelStore(a["store"])  # every shard's checksum verified
    verify = time.perf_counter() - start
    labels = store.split("train")
    data = DistillDataModule(corpus=a["corpus"], tokenizer=a["teacher"], block_size=a["block_size"], batch_size=8,
                             num_workers=2)
    data.setup("fit")
    tokens, start = 0, time.perf_counter()
    for batch in data.train_dataloader():  # as StoredLabels.records joins them, by block_idx
        rows = [labels[b] for b in batch["block_idx"].tolist()]
        stored = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        tokens += stored["topk_ids"].shape[0] * stored["topk_ids"].shape[1]
    seconds = time.perf_counter() - start
    return {"verify_seconds": verify, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def task_control(a: dict[str, Any]) -> dict[str, Any]:
    """The machine's own ceiling for 2 processes at this moment: the same tokenizer work (the built-in documents,
    12 times) in one process, then split over two forked ones, no litdata involved."""
    from multiprocessing import get_context

    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _CONTROL.append(AutoTokenizer.from_pretrained(a["tokenizer"]))
    start = time.perf_counter()
    _control_work(12)
    one = time.perf_counter() - start
    with get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_control_work, [6, 6])
        two = time.perf_counter() - start
    return {"one_process_seconds": one, "two_processes_seconds": two, "speedup": one / two}


_CONTROL: list[Any] = []


def _control_work(times: int) -> None:
    from pydoc_data.topics import topics

    for _ in range(times):
        _CONTROL[0](list(topics.values()), add_special_tokens=False)


TASKS = {"prepare": task_prepare, "in_memory": task_in_memory, "load": task_load, "student": task_student,
         "label": task_label, "read": task_read, "control": task_control}


# --- the driver ------------------------------------------------------------------------------------------------


def measure(task: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run a task in a subprocess; its result plus the peak RSS and PSS sums of its process tree (GiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)}
    child = subprocess.Popen([sys.executable, __file__, "--task", task, json.dumps(args)], env=env,
                             stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0, "one": 0}

    def sample() -> None:
        root = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                infos = [p.memory_full_info() for p in tree]
            except psutil.Error:
                continue
            peak["rss"] = max(peak["rss"], sum(i.rss for i in infos))
            peak["pss"] = max(peak["pss"], sum(i.pss for i in infos))
            peak["one"] = max(peak["one"], *(i.rss for i in infos))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"task {task} failed ({child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_gib": peak["rss"] / 2**30, "peak_pss_gib": peak["pss"] / 2**30,
            "peak_process_rss_gib": peak["one"] / 2**30}


def make_corpus(folder: Path, tokens: int, tokenizer: Any, seed: int = 0) -> None:
    """JSONL shards of the built-in documents in seeded shuffled order, numbered, up to about ``tokens`` tokens."""
    from pydoc_data.topics import topics

    import numpy as np

    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = sorted(topics)
    per_char = sum(len(tokenizer(topics[n], add_special_tokens=False)["input_ids"]) for n in names) / sum(
        len(topics[n]) for n in names)
    rng, chars, number, shard, lines = np.random.default_rng(seed), 0, 0, 0, []
    while chars * per_char < tokens:
        for name in rng.permutation(names):
            text = f"Document {number}: {name}\n\n{topics[name]}"
            lines.append(json.dumps({"text": text}) + "\n")
            chars, number = chars + len(text), number + 1
            if sum(map(len, lines)) > 8 * 2**20 or chars * per_char >= tokens:
                (folder / f"part-{shard:04d}.jsonl").write_text("".join(lines))
                shard, lines = shard + 1, []
            if chars * per_char >= tokens:
                break
    (folder / "done").write_text(str(number))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lightning_distill.backbone import resolve_model_path

    work = Path(args.work)
    tokenizer_path = resolve_model_path(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    results: dict[str, Any] = {"prepare": {}, "in_memory": {}, "load": {}, "control": []}
    for size in args.sizes:
        name = f"{size:.0e}".replace("+0", "")
        corpus = work / f"corpus-{name}"
        make_corpus(corpus, int(size), tokenizer)
        rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(args.rounds if size < 5e7 else 1):  # alternating: load from other jobs hits both alike
            for workers in (1, 2):
                rounds[workers].append(measure("prepare", {
                    "corpus": str(corpus), "out": str(work / f"prepared-{name}"), "tokenizer": tokenizer_path,
                    "block_size": 1024, "workers": workers}))
                print(f"prepare {name} tokens, {workers} worker(s): {json.dumps(rounds[workers][-1])}", flush=True)
        for workers, runs in rounds.items():  # the fastest round, with the peak memory of all
            best = min(runs, key=lambda r: r["seconds"])
            results["prepare"][f"{name}/{workers}"] = {
                **best, **{k: max(r[k] for r in runs) for k in best if k.startswith("peak")},
                "rounds_seconds": [r["seconds"] for r in runs]}
        results["control"].append(measure("control", {"tokenizer": tokenizer_path}))
        print(f"control: {json.dumps(results['control'][-1])}", flush=True)
        result = measure("load", {"corpus": str(work / f"prepared-{name}"), "tokenizer": tokenizer_path,
                                  "block_size": 1024, "batch_size": 4, "workers": 2})
        results["load"][name] = result
        print(f"load {name}: {json.dumps(result)}", flush=True)
        if size <= 2e7:
            result = measure("in_memory", {"corpus": str(corpus), "tokenizer": tokenizer_path, "block_size": 1024,
                                           "cache": str(work / f"cache-{name}-{time.time_ns()}")})
            results["in_memory"][name] = result
            print(f"in memory {name}: {json.dumps(result)}", flush=True)
    results["student"] = measure("student", {"steps": args.student_steps})
    print(f"student: {json.dumps(results['student'])}", flush=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model_dir

    teacher = work / "tiny-teacher"
    if not (teacher / "config.json").exists():
        make_tiny_model_dir(teacher)
    corpus = work / "corpus-labels"
    make_corpus(corpus, int(args.label_tokens), AutoTokenizer.from_pretrained(teacher))
    prepared = work / "prepared-labels"
    measure("prepare", {"corpus": str(corpus), "out": str(prepared), "tokenizer": str(teacher), "block_size": 128,
                        "workers": 2})
    common = {"corpus": str(prepared), "teacher": str(teacher), "block_size": 128, "store": str(work / "labels")}
    results["label"] = measure("label", common)
    print(f"label: {json.dumps(results['label'])}", flush=True)
    results["read"] = measure("read", common)
    print(f"read: {json.dumps(results['read'])}", flush=True)
    return results


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    prep, load, student = results["prepare"], results["load"], results["student"]
    names = list(load)

    def row(label: str, r: dict[str, Any], corpus: str = "") -> str:
        return (f"| {corpus} | {label} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_gib']:.2f} | "
                f"{r['peak_pss_gib']:.2f} | {r['peak_process_rss_gib']:.2f} |")

    lines = [f"Measured by `{meta['command']}` on {meta['date']}: {meta['machine']}. Load average before / after: "
             f"{meta['load_before']} / {meta['load_after']} (a shared machine: compare within this run).", "",
             "Memory: the peaks over the whole process tree (preparation or loader workers included) of the summed RSS "
             "(forked workers' shared pages counted in each), of the summed PSS (shared pages counted once: the memory "
             "the tree takes), and of the largest single process' RSS.", "",
             "| corpus | path | time (s) | tokens / s | peak RSS, sum (GiB) | peak PSS, sum (GiB) | peak RSS, "
             "largest process (GiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        tokens = f"{prep[name + '/1']['tokens']:,} tokens"
        lines.append(row("prepare, 1 worker", prep[f"{name}/1"], tokens))
        lines.append(row("prepare, 2 workers", prep[f"{name}/2"]))
        lines.append(row("one streamed training epoch (4 x 1024, 2 loader workers)", load[name]))
        if name in results["in_memory"]:
            lines.append(row("in memory, today's path (tokenize + pack)", results["in_memory"][name]))
    speedups = [f"{n}: {prep[n + '/2']['tokens_per_s'] / prep[n + '/1']['tokens_per_s']:.2f}x" for n in names]
    control = [f"{c['speedup']:.2f}x" for c in results["control"]]
    cpu = [f"{n}: {prep[n + '/1']['tokens_per_cpu_s']:,.0f} / {prep[n + '/2']['tokens_per_cpu_s']:,.0f}" for n in names]
    over_student = [f"{n}: {load[n]['tokens_per_s'] / student['tokens_per_s']:,.0f}x" for n in names]
    over_issue = [f"{n}: {load[n]['tokens_per_s'] / 650:,.0f}x" for n in names]
    lab, read = results["label"], results["read"]
    lines += ["", f"Preparation speed-up, 2 workers over 1 (fastest of alternating rounds below 10^8 tokens): "
              f"{', '.join(speedups)}. Control, the same tokenizer work in 2 plain processes over 1, measured after "
              f"each size: {', '.join(control)} (what this machine allowed 2 processes then). Tokens per CPU-second "
              f"(all processes of the preparation, 1 / 2 workers): {', '.join(cpu)}.", "",
              f"Student training step (6 of 30 layers, bf16 autocast, 4 x 128 tokens, forward + backward + AdamW): "
              f"{student['seconds_per_step']:.2f} s, {student['tokens_per_s']:,.0f} tokens/s. The streamed loader "
              f"delivers {', '.join(over_student)} that ({', '.join(over_issue)} the issue's 650 tokens/s).", "",
              f"Labels at {lab['tokens']:,} tokens (tiny random teacher, top-8 fp16, {lab['shards']} shards aligned "
              f"with the corpus chunks): written at {lab['tokens_per_s']:,.0f} tokens/s ({lab['seconds']:.0f} s), "
              f"{lab['bytes'] / 2**20:.0f} MiB, {lab['bytes_per_token']:.1f} bytes/token, peak RSS "
              f"{lab['peak_rss_gib']:.2f} GiB (PSS {lab['peak_pss_gib']:.2f}); read back along a shuffled streamed "
              f"epoch at {read['tokens_per_s']:,.0f} tokens/s after {read['verify_seconds']:.1f} s of checksums, peak "
              f"RSS {read['peak_rss_gib']:.2f} GiB (PSS {read['peak_pss_gib']:.2f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--task":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(TASKS[sys.argv[2]](json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[1e6, 1e7, 1e8])
    parser.add_argument("--label-tokens", type=float, default=1e7)
    parser.add_argument("--student-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (2 thrash when shared)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1- and 2-worker preparations below 5e7")
    parser.add_argument("--work", default="/tmp/data-scale-work", help="corpora, prepared folders, label store")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    import litdata
    import torch
    import transformers

    meta = {"command": " ".join(["python benchmarks/data_scale.py", shlex.join(sys.argv[1:])]).strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
                       f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"litdata {litdata.__version__}, {args.threads} torch thread(s) per process",
            "load_before": [round(x, 1) for x in os.getloadavg()]}
    results = run(args)
    meta["load_after"] = [round(x, 1) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "data_scale.md").write_text(report(results, meta))
    print(report(results, meta))


if __name__ == "__main__":
    main()
