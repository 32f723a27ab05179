"""A teacher behind a server, measured on this machine over loopback: bytes per token on the wire, labelling
throughput (served vs local), and the training step (served with prefetch on and off, vs a live teacher, vs stored
labels), with the server and the trainer on the same cores or pinned to separate ones.

    python benchmarks/remote.py                        # embedded teacher, ~15 min on 2 quiet CPU cores
    python benchmarks/remote.py --pin                  # server on core 1, trainer on core 0 (taskset), one thread each
    python benchmarks/remote.py --steps 6 --max-documents 3 --label-batches 2   # a quick smoke run

1. Bytes per token: the answer bodies for one batch (``--batch-size`` x ``--block-size`` tokens) of vLLM's JSON
   (``/v1/completions``, ``prompt_logprobs=32``, our server answering in vLLM's shape), our binary top-32, sampled-12
   and token log-probs (``/v1/distill``), divided by the tokens.
2. Labelling throughput: ``trainer.predict`` with a top-32 LabelWriter over ``--label-batches`` batches (after a
   first one), the teacher in this process vs behind the server; tokens per second of the median batch.
3. Step time: SoftDistill (6-layer pruned student, forward KL + 0.5 CE) for ``--steps`` steps in each variant, the
   time between consecutive step ends (data, targets, forward, backward, AdamW), median of the steps after the
   first two. The teacher's answer alone (one request for a batch, the trainer idle) and the student's step alone
   (the stored-label step) give max(student step, teacher answer), what a prefetched step should approach when the
   two run on separate cores.

The server runs one torch thread (``OMP_NUM_THREADS=1``). Timings on a shared machine are noisy: compare the ratios
measured within one run. Writes
``benchmarks/results/remote.json`` and ``benchmarks/results/remote.md`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_distill import DistillDataModule, Served, SoftDistill
from lightning_distill.backbone import DEFAULT_TEACHER, PROBE_TEXT, load_tokenizer, tokenizer_fingerprint
from lightning_distill.serve import openai, wire
from lightning_distill.serve.client import TeacherClient
from lightning_distill.store import LabelWriter

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import serving  # noqa: E402  (tests/serving.py: a server process on a free port, stopped with its children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-documents", type=int, default=6)
    parser.add_argument("--label-batches", type=int, default=8)
    parser.add_argument("--pin", action="store_true", help="server on core 1, trainer on core 0, one thread each")
    parser.add_argument("--out", default=str(RESULTS / "remote"))
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="remote_bench_"))
    prefix = ["taskset", "-c", "1"] if args.pin else []
    server = start_server(args.teacher, work / "serve.log", prefix)
    try:
        results = {"setup": setup(args), "wire": wire_bytes(server.url, args),
                   "labelling": labelling(server.url, args, work), "steps": steps(server.url, args, work)}
    finally:
        serving.stop(server)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(report(results))
    print(report(results))


def start_server(teacher: str, log: Path, prefix: list[str]) -> serving.Server:
    """``lightning-distill serve`` on a free port (float32), pinned with ``prefix`` (``taskset -c 1``)."""
    if not prefix:
        return serving.start(teacher, log, timeout=300)
    port = serving.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*prefix, sys.executable, "-m", "lightning_distill", "serve", "--teacher", teacher, "--port", str(port),
               "--dtype", "float32"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = serving.Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(OSError):
            if serving.get(f"{server.url}/health")[0] == 200:
                return server
        if process.poll() is not None or time.monotonic() > deadline:
            serving.stop(server)
            raise RuntimeError(server.output()[-3000:])
        time.sleep(0.5)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    return {"teacher": args.teacher, "batch": [args.batch_size, args.block_size], "steps": args.steps,
            "pinned": args.pin, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python", *sys.argv])}


def data(args: argparse.Namespace) -> DistillDataModule:
    return DistillDataModule(corpus="builtin:python-docs", block_size=args.block_size, batch_size=args.batch_size,
                             max_documents=args.max_documents, seed=0)


def wire_bytes(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Answer bytes per token of one batch in each format."""
    tokenizer = load_tokenizer(args.teacher)
    client = TeacherClient(url)
    client.connect(tokenizer_fingerprint(tokenizer), tokenizer.encode(PROBE_TEXT), PROBE_TEXT, 32)
    ids = torch.randint(0, len(tokenizer), (args.batch_size, args.block_size),
                        generator=torch.Generator().manual_seed(0))
    tokens, out = ids.numel(), {}
    for name, kind, settings in (("binary_top32", "topk", {"k": 32}), ("sampled12", "sampled", {"num_samples": 12}),
                                 ("token_logprobs", "tokens", {})):
        body = json.dumps(wire.distill_request(ids, kind=kind, **settings)).encode()
        out[name] = len(client._post(0, "/v1/distill", body)[1]) / tokens
    body = json.dumps(openai.request(ids.tolist(), 32, client.model)).encode()
    out["vllm_json_top32"] = len(client._post(0, "/v1/completions", body)[1]) / tokens
    client.close()
    return out


def labelling(url: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Tokens per second of a top-32 labelling over ``--label-batches`` batches, local vs served."""
    out = {}
    for name, model in (("local", SoftDistill(teacher=args.teacher)),
                        ("served", SoftDistill(teacher=url, tokenizer=args.teacher))):
        writer, clock = LabelWriter(str(work / f"labels_{name}"), kind="topk", k=32, splits=["train"]), BatchClock()
        trainer = L.Trainer(accelerator="cpu", callbacks=[writer, clock], logger=False, enable_progress_bar=False,
                            limit_predict_batches=args.label_batches + 1)
        trainer.predict(model, datamodule=data(args))
        out[f"{name}_tokens_per_second"] = args.batch_size * args.block_size / clock.median()
    return out


class BatchClock(L.Callback):
    """The time between consecutive ends of predict batches (labelled and written): the first batch, which pays
    for start-up, is not counted."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_predict_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def median(self) -> float:
        return statistics.median(b - a for a, b in zip(self.ends, self.ends[1:], strict=False))


class StepClock(L.Callback):
    """The time between consecutive ends of training steps."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def median(self) -> float:
        gaps = [b - a for a, b in zip(self.ends[1:], self.ends[2:], strict=False)]
        return statistics.median(gaps)


def steps(url: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Median step seconds per variant, the teacher's answer alone, and the prefetched step over max(student step,
    teacher answer)."""
    store = LabelWriter(str(work / "store"), kind="topk", k=32, splits=["train"])
    L.Trainer(accelerator="cpu", callbacks=[store], logger=False, enable_progress_bar=False).predict(
        SoftDistill(teacher=args.teacher), datamodule=data(args))
    variants = {"live": lambda: SoftDistill(teacher=args.teacher),
                "stored": lambda: SoftDistill(teacher=args.teacher, labels=store.path),
                "served_prefetch": lambda: SoftDistill(teacher=url, tokenizer=args.teacher),
                "served_no_prefetch": lambda: SoftDistill(teacher=url, tokenizer=args.teacher,
                                                          served=Served(prefetch=False))}
    out = {}
    for name, make in variants.items():
        clock = StepClock()
        trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, limit_val_batches=0, logger=False,
                            enable_progress_bar=False, enable_checkpointing=False, callbacks=[clock])
        trainer.fit(make(), data(args))
        out[f"{name}_step_seconds"] = clock.median()
    out["teacher_answer_seconds"] = answer_seconds(url, args)
    bound = max(out["stored_step_seconds"], out["teacher_answer_seconds"])
    out["prefetch_over_bound"] = out["served_prefetch_step_seconds"] / bound
    out["no_prefetch_over_bound"] = out["served_no_prefetch_step_seconds"] / bound
    return out


def answer_seconds(url: str, args: argparse.Namespace, repeats: int = 5) -> float:
    """Median seconds of one top-32 request for a batch, the trainer idle."""
    tokenizer = load_tokenizer(args.teacher)
    client = TeacherClient(url)
    client.connect(tokenizer_fingerprint(tokenizer), tokenizer.encode(PROBE_TEXT), PROBE_TEXT, 32)
    ids = torch.randint(0, len(tokenizer), (args.batch_size, args.block_size),
                        generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.ask("topk", ids, k=32)
        times.append(time.perf_counter() - start)
    client.close()
    return statistics.median(times)


def report(results: dict[str, Any]) -> str:
    setup, wire_, label, step = results["setup"], results["wire"], results["labelling"], results["steps"]
    cores = "server on core 1 and trainer on core 0" if setup["pinned"] else "server and trainer sharing the cores"
    lines = [f"# A teacher behind a server ({setup['date']})", "",
             f"`{setup['command']}`: teacher {setup['teacher']}, batches of {setup['batch'][0]} x {setup['batch'][1]} "
             f"tokens, {setup['steps']} steps, {cores}, {setup['cpus']} CPUs ({setup['machine']}).", "",
             "| on the wire | bytes per token |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in wire_.items()]
    lines += ["", "| labelling (top-32) | tokens per second |", "|---|---|",
              f"| local | {label['local_tokens_per_second']:.0f} |",
              f"| served | {label['served_tokens_per_second']:.0f} |",
              "", "| training step | median seconds |", "|---|---|"]
    lines += [f"| {name.removesuffix('_step_seconds')} | {value:.3f} |" for name, value in step.items()
              if name.endswith("_step_seconds")]
    lines += [f"| the teacher's answer alone | {step['teacher_answer_seconds']:.3f} |", "",
              f"Prefetched step / max(student step, teacher answer): {step['prefetch_over_bound']:.2f}; without "
              f"prefetch: {step['no_prefetch_over_bound']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
