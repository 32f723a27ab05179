"""Stored teacher signal, measured: bytes per token of every kind, labelling throughput, training step time from a
store, and student quality at equal steps (online soft KD vs top-k stored vs sampled stored vs top-1 stored).

    python benchmarks/labels.py                      # ~12-15 min on 2 quiet CPU cores
    python benchmarks/labels.py --threads 1          # when other jobs share the cores (2 threads then thrash)
    python benchmarks/labels.py --steps 20 --max-documents 8 --throughput-batches 2   # a quick smoke run
    python benchmarks/labels.py --variants ce_only,online_soft,topk128_stored,sampled50_stored,topk32_renorm_stored

Embedded teacher SmolLM2-135M-Instruct (``performance.teacher_dtype="auto"``: bfloat16 where the CPU/GPU has native
bf16), 6-layer depth-pruned student, built-in corpus ``builtin:python-docs`` cut to ``--max-documents`` documents
(the first ones of the seeded shuffle; 30 of 79 by default: 396 train + 71 validation blocks of 128 tokens).

1. Bytes per token: one ``trainer.predict`` pass of the teacher over both splits with six LabelWriter callbacks
   (top-k 8/32/128, sampled 12/50, top-1), each writing a real store; size on disk (shards + manifest) divided by
   the tokens labelled. The full-distribution references are the logits of two blocks saved to disk in fp32 and
   bf16 (``numpy.save``), measured the same way.
2. Labelling throughput: ``trainer.predict`` with a LabelWriter over ``--throughput-batches`` batches, ``--rounds``
   times. Just before each labelling step (forward + reduction + shard writes) the teacher forward alone runs on
   the same batch, so both see the same load; medians of the per-batch ratios. The whole predict call (Trainer
   start-up, data, writes; the extra forwards subtracted) over the forwards alone is reported too.
3. and 4. Step time and quality: the students train in lockstep, one optimizer step of each in turn on the same
   batch order and initial weights, so that load from other processes hits them alike. The step is the module's
   own ``training_step`` (batch fetch from the store included) + backward + AdamW; median seconds per step.
   After ``--steps`` steps each student is evaluated on ``--val-blocks`` validation blocks: perplexity, KL(teacher ||
   student) against the live teacher's full distribution, top-1 agreement.

Timings on a shared machine are noisy: compare the ratios measured within one run. Writes
``benchmarks/results/labels.json`` and ``benchmarks/results/labels.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_distill import DistillDataModule, HardDistill, SoftDistill, losses
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.modules.base import lr_factor
from lightning_distill.options import Optimization, Performance
from lightning_distill.signals import LiveTeacher
from lightning_distill.store import LabelStore, LabelWriter

RESULTS = Path(__file__).parent / "results"
TEACHER = "builtin:smollm2-135m-instruct"
STORES = {  # name -> LabelWriter settings
    "topk8": {"kind": "topk", "k": 8},
    "topk32": {"kind": "topk", "k": 32},
    "topk128": {"kind": "topk", "k": 128},
    "sampled12": {"kind": "sampled", "num_samples": 12},
    "sampled50": {"kind": "sampled", "num_samples": 50},
    "top1": {"kind": "top1"},
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every student (default 60)")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size (blocks of 128 tokens)")
    parser.add_argument("--max-documents", type=int, default=30, help="documents of the corpus used (of 79)")
    parser.add_argument("--label-batch-size", type=int, default=8, help="blocks per labelling batch")
    parser.add_argument("--throughput-batches", type=int, default=6, help="batches timed for labelling throughput")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the throughput measurement")
    parser.add_argument("--val-blocks", type=int, default=32, help="validation blocks for the quality metrics")
    parser.add_argument("--layers", type=int, default=6, help="student layers kept from the teacher's 30")
    parser.add_argument("--out", default=str(RESULTS), help="folder for labels.json and labels.md")
    parser.add_argument("--work", default=None, help="folder for the stores (default: a temporary folder)")
    parser.add_argument("--variants", type=lambda text: text.split(","),
                        default=["ce_only", "online_soft", "topk32_stored", "sampled12_stored", "top1_stored"],
                        help="students trained in lockstep, comma-separated, starting with ce_only,online_soft; "
                             "also: topk8_stored, topk128_stored, sampled50_stored, topk32_renorm_stored")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is much faster when other jobs share the cores")
    return parser.parse_args(argv)


def data_module(args: argparse.Namespace, batch_size: int) -> DistillDataModule:
    return DistillDataModule(corpus="builtin:python-docs", block_size=128, batch_size=batch_size, seed=0,
                             max_documents=args.max_documents)


def quiet_trainer(root: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A Trainer for ``predict``; on CPU it keeps freed memory for reuse (glibc mallopt, once per process), as the
    modules did before the option became opt-in: the lockstep steps after it run with it too."""
    return L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), callbacks=[*callbacks, ReuseFreedMemory()],
                     **kwargs)


# ------------------------------------------------------------------------------------------ 1. bytes per token
def write_stores(args: argparse.Namespace, teacher: SoftDistill, work: Path) -> dict[str, Any]:
    """Every kind of store from one teacher pass; their measured size per token."""
    writers = {name: LabelWriter(str(work / name), **settings, shard_blocks=256)
               for name, settings in STORES.items()}
    data = data_module(args, args.label_batch_size)
    start = time.perf_counter()
    quiet_trainer(work, callbacks=list(writers.values())).predict(teacher, datamodule=data)
    seconds = time.perf_counter() - start
    blocks = len(data.train_blocks) + len(data.val_blocks)
    tokens = blocks * 128
    sizes = {}
    for name in STORES:
        store = LabelStore(work / name)  # complete, checksums verified
        nbytes = sum(f.stat().st_size for f in (work / name).iterdir())
        sizes[name] = {"bytes": nbytes, "bytes_per_token": nbytes / tokens,
                       "record_bytes_per_token": store.manifest["bytes_per_block"] / 128}
    logits = teacher_logits(teacher, data.val_blocks[:2].to(teacher.device)).float().cpu()  # (2, 128, V)
    for name, array in (("full_fp32", logits.numpy()),
                        ("full_bf16", logits.to(torch.bfloat16).view(torch.int16).numpy())):
        file = work / f"{name}.npy"
        np.save(file, array)
        sizes[name] = {"bytes": file.stat().st_size, "bytes_per_token": file.stat().st_size / (2 * 128),
                       "record_bytes_per_token": array.itemsize * array.shape[-1]}
    return {"tokens": tokens, "train_blocks": len(data.train_blocks), "validation_blocks": len(data.val_blocks),
            "one_pass_seconds": seconds, "sizes": sizes}


def teacher_logits(model: L.LightningModule, input_ids: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's logits (B, T, V) under no grad, in its dtype."""
    return LiveTeacher.logits(model.run, {"input_ids": input_ids})


# ------------------------------------------------------------------------------------------ 2. throughput
class StepTimer(L.Callback):
    """Per predict batch: the teacher forward alone on that batch, run just before the step, then the step itself
    (forward + the writers' reduction and shard writes, the callbacks placed before this one)."""

    def __init__(self) -> None:
        self.forward: list[float] = []
        self.labelled: list[float] = []

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        start = time.perf_counter()
        teacher_logits(pl_module, batch["input_ids"])
        self._start = time.perf_counter()
        self.forward.append(self._start - start)

    def on_predict_batch_end(self, *args: Any) -> None:
        self.labelled.append(time.perf_counter() - self._start)


def throughput(args: argparse.Namespace, teacher: SoftDistill, work: Path) -> dict[str, Any]:
    """Labelling against the teacher forward alone, on the same batches, interleaved batch by batch."""
    kinds = ("topk32", "sampled12", "top1")
    tokens = args.label_batch_size * 128
    out: dict[str, Any] = {"batches": args.throughput_batches, "rounds": args.rounds, "tokens_per_batch": tokens}
    timers: dict[str, list[StepTimer]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name in kinds:
            timer = StepTimer()
            shutil.rmtree(work / f"throughput-{name}", ignore_errors=True)  # the same blocks every round
            writer = LabelWriter(str(work / f"throughput-{name}"), **STORES[name], splits=["train"],
                                 shard_blocks=args.label_batch_size)
            trainer = quiet_trainer(work, callbacks=[writer, timer], limit_predict_batches=args.throughput_batches)
            start = time.perf_counter()
            trainer.predict(teacher, datamodule=data_module(args, args.label_batch_size))
            wall[name].append(time.perf_counter() - start - sum(timer.forward))  # the predict call alone
            timers[name].append(timer)
    forward = [t for name in kinds for timer in timers[name] for t in timer.forward]
    out["forward_s"] = statistics.median(forward)
    out["forward_tokens_per_s"] = tokens / out["forward_s"]
    for name in kinds:
        steps = [t for timer in timers[name] for t in timer.labelled]
        ratios = [b / a for timer in timers[name] for a, b in zip(timer.forward, timer.labelled, strict=True)]
        calls = [w / sum(timer.forward) for w, timer in zip(wall[name], timers[name], strict=True)]
        out[name] = {"step_s": statistics.median(steps), "tokens_per_s": tokens / statistics.median(steps),
                     "ratio": statistics.median(ratios), "wall_ratio": statistics.median(calls)}
    return out


# ---------------------------------------------------------------------------------- 3. and 4. step time, quality
def variants(args: argparse.Namespace, work: Path) -> dict[str, L.LightningModule]:
    """The students: same initial weights (the pruned teacher), same recipe, different teacher signal."""
    student = {"from_teacher": {"layers": args.layers}}
    common = {"teacher": TEACHER, "student": student, "performance": Performance(teacher_dtype="auto"),
              "optimization": Optimization(learning_rate=1e-3, warmup_steps=5)}
    made = {
        "ce_only": lambda: SoftDistill(**common, ce_weight=1.0),
        "online_soft": lambda: SoftDistill(**common, ce_weight=0.5),
        "top1_stored": lambda: HardDistill(**common, ce_weight=0.5, mode="top1", labels=str(work / "top1")),
        "topk32_renorm_stored": lambda: SoftDistill(**common, ce_weight=0.5, labels=str(work / "topk32"),
                                                    tail="renorm"),
    }
    for store in ("topk8", "topk32", "topk128", "sampled12", "sampled50"):
        made[f"{store}_stored"] = lambda store=store: SoftDistill(**common, ce_weight=0.5, labels=str(work / store))
    unknown = set(args.variants) - set(made)
    if unknown or args.variants[:2] != ["ce_only", "online_soft"]:
        raise ValueError(f"--variants must start with ce_only,online_soft and name students among {sorted(made)}")
    return {name: made[name]() for name in args.variants}


def train_lockstep(args: argparse.Namespace, models: dict[str, L.LightningModule]) -> dict[str, Any]:
    loaders, optimizers, schedulers, times = {}, {}, {}, {}
    for name, model in models.items():
        model.configure_model()
        model.setup("fit")  # opens the store (if any) and checks it fits the method
        data = data_module(args, args.batch_size)
        data.set_tokenizer(model.tokenizer)
        data.setup("fit")
        loaders[name] = iter(data.train_dataloader())
        config = model.configure_optimizers()
        optimizers[name] = config["optimizer"]
        options = model.hparams.optimization
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[name], lambda step, o=options: lr_factor(step, args.steps, o.warmup_steps, o.min_lr_ratio))
        times[name] = []
    first = next(iter(models.values()))
    for other in list(models.values())[1:]:  # identical initial students
        assert all(torch.equal(a, b) for a, b in zip(first.student.state_dict().values(),
                                                     other.student.state_dict().values(), strict=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # the step is called without a Trainer
        for step in range(args.steps):
            order = None
            for name, model in models.items():
                start = time.perf_counter()
                batch = move_data_to_device(next(loaders[name]), model.device)
                order = batch["block_idx"] if order is None else order
                assert torch.equal(order, batch["block_idx"]), "every student sees the same blocks"
                loss = model.training_step(batch, step)
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                schedulers[name].step()
                times[name].append(time.perf_counter() - start)
            if step % 10 == 0:
                print(f"  step {step}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    warm = slice(2, None)
    return {name: statistics.median(t[warm]) for name, t in times.items()}


@torch.no_grad()
def evaluate(args: argparse.Namespace, teacher: SoftDistill, students: dict[str, torch.nn.Module]) -> dict:
    data = data_module(args, 8)
    data.set_tokenizer(teacher.tokenizer)
    data.setup()
    blocks = data.val_blocks[: args.val_blocks]
    sums = {name: {"ce": 0.0, "kl": 0.0, "agreement": 0.0} for name in students}
    count = 0
    for ids in blocks.split(8):
        ids = ids.to(teacher.device)
        target = teacher_logits(teacher, ids)[:, :-1].float()  # (B, T-1, V)
        labels = ids[:, 1:]
        n = labels.numel()
        for name, student in students.items():
            was_training = student.training
            student.eval()
            logits = student(input_ids=ids).logits[:, :-1].float()
            student.train(was_training)
            sums[name]["ce"] += float(losses.cross_entropy(logits, labels)) * n
            sums[name]["kl"] += float(losses.ForwardKL()(logits, target, labels)) * n
            sums[name]["agreement"] += float((logits.argmax(-1) == target.argmax(-1)).float().mean()) * n
        count += n
    out = {}
    for name, s in sums.items():
        ce = s["ce"] / count
        out[name] = {"val_ppl": float(np.exp(ce)), "val_ce": ce, "val_kl": s["kl"] / count,
                     "val_agreement": s["agreement"] / count}
    return {"tokens": count, "metrics": out}


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict[str, Any]) -> str:
    m, b, t = report["machine"], report["bytes"], report["throughput"]
    lines = [f"Measured by `{report['command']}` on {m['cpus']} CPU cores ({m['processor'] or m['machine']}), "
             f"{m['threads']} torch thread(s), torch {m['torch']}, teacher dtype {m['teacher_dtype']}, {m['device']}; "
             "shared machine: compare ratios within this run.", "",
             f"**Bytes per token** (real stores of {b['tokens']:,} tokens of the built-in corpus: "
             f"{b['train_blocks']} train + {b['validation_blocks']} validation blocks of 128; shards + manifest on "
             "disk):", "", "| stored | bytes / token on disk | record bytes / token |", "|---|---:|---:|"]
    names = {"topk8": "top-k, k = 8", "topk32": "top-k, k = 32", "topk128": "top-k, k = 128",
             "sampled12": "sampled, 12 draws", "sampled50": "sampled, 50 draws", "top1": "top-1 (hard labels)",
             "full_fp32": "full distribution, fp32", "full_bf16": "full distribution, bf16"}
    for key, label in names.items():
        s = b["sizes"][key]
        lines.append(f"| {label} | {s['bytes_per_token']:,.1f} | {s['record_bytes_per_token']:,.0f} |")
    lines += ["", f"**Labelling throughput** (batches of {t['tokens_per_batch']} tokens, {t['batches']} batches x "
              f"{t['rounds']} rounds; each batch's teacher forward alone is timed just before its labelling step; "
              "medians):", "",
              "| | tokens / s | step / forward alone | whole predict call / forwards alone |",
              "|---|---:|---:|---:|",
              f"| teacher forward alone | {t['forward_tokens_per_s']:,.0f} | 1.00 | |"]
    for key in ("topk32", "sampled12", "top1"):
        lines.append(f"| labelling {names[key]} | {t[key]['tokens_per_s']:,.0f} | {t[key]['ratio']:.2f} | "
                     f"{t[key]['wall_ratio']:.2f} |")
    q, steps = report["quality"], report["step_seconds"]
    ce, online = q["metrics"]["ce_only"], q["metrics"]["online_soft"]
    lines += ["", f"**Training from a store: step time and quality at equal steps** ({report['steps']} steps x "
              f"{report['batch_size']}x128 tokens, lockstep, same initial {report['layers']}-layer student; "
              f"evaluated on {q['tokens']:,} validation tokens against the live teacher):", "",
              "| student | s / step | step / CE step | val ppl | KL(teacher ‖ student) | top-1 agreement | "
              "KL gain kept |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in steps:
        r = q["metrics"][name]
        gain = ce["val_kl"] - online["val_kl"]
        kept = "" if name == "ce_only" else f"{(ce['val_kl'] - r['val_kl']) / gain:.0%}" if gain > 0 else "n/a"
        lines.append(f"| {name} | {steps[name]:.2f} | {steps[name] / steps['ce_only']:.2f} | {r['val_ppl']:.2f} | "
                     f"{r['val_kl']:.3f} | {r['val_agreement']:.3f} | {kept} |")
    before = q["before"]
    lines += ["", f"Before training (the pruned student): val ppl {before['val_ppl']:.2f}, KL "
              f"{before['val_kl']:.3f}, agreement {before['val_agreement']:.3f}. \"KL gain kept\": the share of "
              "online soft KD's reduction of KL over CE-only that the student keeps."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/labels.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="labels-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = SoftDistill(teacher=TEACHER, student={"from_teacher": {"layers": 1}},
                          performance=Performance(teacher_dtype="auto"))
    teacher.configure_model()
    if torch.cuda.is_available():
        teacher.cuda()
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
               "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
               "teacher_dtype": str(next(teacher.teacher.parameters()).dtype).removeprefix("torch.")}
    print(f"{command}\n{machine}\nstores in {work}", flush=True)
    clock = time.perf_counter()
    print("1. one labelling pass writing every kind of store ...", flush=True)
    sizes = write_stores(args, teacher, work)
    print(json.dumps({k: round(v["bytes_per_token"], 1) for k, v in sizes["sizes"].items()}), flush=True)
    print("2. labelling throughput ...", flush=True)
    speed = throughput(args, teacher, work)
    print(json.dumps({k: v for k, v in speed.items() if isinstance(v, dict)}), flush=True)
    print("3./4. lockstep training ...", flush=True)
    models = variants(args, work)
    for model in models.values():
        model.configure_model()
        model.to(teacher.device)
    before = evaluate(args, teacher, {"before": models["ce_only"].student})  # every student starts from it
    gc.collect()
    steps = train_lockstep(args, models)
    quality = evaluate(args, teacher, {name: model.student for name, model in models.items()})
    quality["before"] = before["metrics"]["before"]
    report = {"command": command, "machine": machine, "steps": args.steps, "batch_size": args.batch_size,
              "layers": args.layers, "max_documents": args.max_documents, "bytes": sizes, "throughput": speed,
              "step_seconds": steps, "quality": quality, "seconds": time.perf_counter() - clock}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps(report, indent=1))
    (out / "labels.md").write_text(markdown(report))
    print(markdown(report))
    print(f"total {report['seconds']:.0f} s; wrote {out / 'labels.json'} and {out / 'labels.md'}")
    return report


if __name__ == "__main__":
    main()
