"""The method comparison table: every distillation method at equal budgets and seeds on the embedded default.

SmolLM2-135M-Instruct teacher -> 6-layer depth-pruned student (~49.5M parameters), built-in corpus
(``builtin:python-docs``), out-of-domain text ``builtin:shakespeare``. For each method and budget it records the
student's validation perplexity in domain and out of domain, KL(teacher || student), top-1 agreement with the
teacher, the teacher storage per token the method needs, and wall time, plus validation perplexity against steps.

    python benchmarks/quality.py                  # the table: seeds 0, 1 at the short budget, 0 at multi_epoch
    python benchmarks/quality.py --budgets short --methods ce_only,soft_fkl --seeds 0   # a subset
    python benchmarks/quality.py --resume         # after an interruption: run only what OUT.json lacks
    python benchmarks/quality.py --replot         # redraw OUT.md and OUT.png from OUT.json
    python benchmarks/quality.py --methods ce_only,soft_topk32_stored --max-steps 4 --out /tmp/q   # a smoke run

Stored-label rows (``*_stored``) first label the budget's corpus with the frozen teacher once (one
``trainer.predict`` pass, every store at once, time reported), then train from the store with no teacher in
memory; their validation KL and agreement are still measured against the live teacher's full distribution, like
every other row. Their storage column is the size of the store on disk per token. Generate rows start from an
empty generation cache (their wall time includes generating) and report how repetitive the teacher's
continuations are.

Cross-tokenizer rows (``cross_*``): the same 6-layer student on its own tokenizer (``builtin:python-docs-bpe-4k``,
a 4k byte-level BPE trained here; each new token's embedding starts from the teacher's embeddings of its text), at
equal steps: CE only, ULD, and the GOLD-style loss (docs/cross_tokenizer.md). Per-token perplexities of two
tokenizers do not compare, so every row also reports bits per byte (the summed cross-entropy of the validation
targets over their UTF-8 bytes, EOS counted as one byte), which the second table lists:

    python benchmarks/quality.py --budgets short --methods ce_only,cross_ce_only,cross_uld,cross_gold

The on-policy rows (``onpolicy_*``) run only when named: from this freshly pruned student on-policy training
collapses or barely moves (``results/quality_onpolicy.md``, 2026-11-30), so on-policy is measured from a distilled
start, at equal wall time, by ``benchmarks/on_policy_phases.py``. Every row's student keeps the 6 teacher layers of
highest Block Influence (the default, :mod:`lightning_distill.pruning`) except ``soft_fkl_evenly``'s, which keeps 6
evenly spaced ones. ``soft_fkl_features`` adds feature distillation (each student layer's hidden states matched
to the teacher layer it was copied from, cosine loss, ``features=Features(weight=1.0)``).

Budgets: ``short`` trains on the whole corpus for a fraction of an epoch; ``multi_epoch`` trains several epochs
on a subset of the documents (the ranking of methods can change when the data repeats). Each budget runs its
seeds (``short``: 0 and 1, ``multi_epoch``: 0; ``--seeds`` replaces them); where a row has two or more, the table
gives their mean and a spread column (max - min over the seeds, as a share of the mean). Writes
``benchmarks/results/quality.{json,md,png}``. All runs use bf16 where the CPU/GPU has native bf16 (else fp32).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_distill import CoDistill, DistillDataModule, HardDistill, SoftDistill
from lightning_distill import metrics as val_metrics
from lightning_distill.alignment import TokenPieces
from lightning_distill.backbone import Run, bf16_is_fast
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.losses import Divergence, GeneralizedJSD
from lightning_distill.options import (
    Features,
    Generation,
    OnPolicy,
    Optimization,
    Performance,
    Schedule,
    Validation,
)
from lightning_distill.signals import LiveTeacher
from lightning_distill.store import LabelWriter

RESULTS = Path(__file__).parent / "results"
VOCAB_BYTES_FP32 = 49152 * 4
CROSS_STUDENT = {"from_teacher": {"layers": 6, "tokenizer": "builtin:python-docs-bpe-4k"}}


@dataclass
class Method:
    """One row of the table: a module class, its arguments (option groups as objects of
    :mod:`lightning_distill.options`), and the teacher storage it needs per token."""

    cls: type
    kwargs: dict[str, Any]
    storage: str  # what the method needs from the teacher, per token
    uses_frozen_teacher: bool = True
    store: dict[str, Any] | None = None  # LabelWriter settings: trains from this label store, teacher absent
    in_table: bool = True  # run by ``--methods all``; the rest only when named


ON_POLICY = {"prompt_tokens": 32, "max_new_tokens": 64}  # on-policy rows: the student continues 32-token prompts
# chunk_size=0: the table was measured on the unchunked loss (bit-reproducible here); the default fused chunks give the
# same loss within float tolerance (tests/modules/test_soft.py). A method's own ``performance`` replaces this one.
PERFORMANCE = Performance(teacher_dtype="auto", chunk_size=0)
GROUPS = {"optimization": Optimization, "performance": Performance, "validation": Validation, "on_policy": OnPolicy,
          "features": Features, "generation": Generation, "schedule": Schedule}
"""The option groups a method argument may be (``--set METHOD.GROUP.FIELD=VALUE`` changes one field)."""


def default_methods() -> dict[str, Method]:
    soft = SoftDistill
    return {
        "ce_only": Method(soft, {"ce_weight": 1.0}, "nothing (no teacher)"),
        "soft_fkl": Method(soft, {}, f"live logits ({VOCAB_BYTES_FP32:,} B fp32 if stored)"),
        "soft_pure_fkl": Method(soft, {"ce_weight": 0.0}, "live logits"),
        "soft_jsd": Method(soft, {"loss": GeneralizedJSD(beta=0.5)}, "live logits"),
        "soft_fkl_features": Method(soft, {"features": Features(weight=1.0, loss="cosine")},
                                    "live logits + hidden states of the same forward"),
        "soft_fkl_evenly": Method(soft, {"student": {"from_teacher": {"layers": 6, "select": "evenly"}}},
                                  "live logits"),
        "hard_top1": Method(HardDistill, {"mode": "top1", "ce_weight": 0.5}, "2 B (one uint16 id)"),
        "hard_generate": Method(HardDistill, {"mode": "generate",
                                              "generation": Generation(prompt_tokens=32, max_new_tokens=96)},
                                "2 B per generated token"),
        "hard_generate_sampled": Method(HardDistill, {"mode": "generate", "generation": Generation(
            prompt_tokens=32, max_new_tokens=96, do_sample=True, temperature=0.7, top_p=0.95)},
                                        "2 B per generated token"),
        "co_distill": Method(CoDistill, {"schedule": Schedule(kind="linear", ramp_steps=20), "kd_weight": 0.5,
                                         "teacher_learning_rate": 2e-5}, "live logits of a trained teacher",
                             uses_frozen_teacher=False),
        # On-policy rows from this freshly pruned student collapse (lmbda=1) or barely move (2026-11-30,
        # results/quality_onpolicy.md); on-policy is measured from a distilled start by on_policy_phases.py instead,
        # so these run only when named.
        "onpolicy_rkl_0.5": Method(soft, {"on_policy": OnPolicy(lmbda=0.5, **ON_POLICY)},
                                   "live logits on the student's samples", in_table=False),
        "onpolicy_rkl_1": Method(soft, {"on_policy": OnPolicy(lmbda=1.0, **ON_POLICY)},
                                 "live logits on the student's samples", in_table=False),
        "onpolicy_rkl_1_start20": Method(soft, {"on_policy": OnPolicy(lmbda=1.0, start=20, **ON_POLICY)},
                                         "live logits on the student's samples (after 20 off-policy steps)",
                                         in_table=False),
        "onpolicy_token_0.5": Method(soft, {"on_policy": OnPolicy(lmbda=0.5, loss="sampled_token", **ON_POLICY)},
                                     "4 B (log-prob of each sampled token)", in_table=False),
        "onpolicy_token_1": Method(soft, {"on_policy": OnPolicy(lmbda=1.0, loss="sampled_token", **ON_POLICY)},
                                   "4 B (log-prob of each sampled token)", in_table=False),
        "cross_ce_only": Method(soft, {"student": CROSS_STUDENT, "loss": "uld", "ce_weight": 1.0},
                                "nothing (no teacher); student on its own 4k tokenizer", uses_frozen_teacher=False),
        "cross_uld": Method(soft, {"student": CROSS_STUDENT, "loss": "uld", "temperature": 2.0},  # T: a sweep's best
                            "live logits on the teacher's own tokens (ULD)", uses_frozen_teacher=False),
        "cross_gold": Method(soft, {"student": CROSS_STUDENT, "loss": "gold"},
                             "live logits on the teacher's own tokens (GOLD-style)", uses_frozen_teacher=False),
        "soft_topk32_stored": Method(soft, {}, "top-32 store", store={"kind": "topk", "k": 32}),
        "soft_sampled12_stored": Method(soft, {}, "12-draw sampled store",
                                        store={"kind": "sampled", "num_samples": 12}),
        "hard_top1_stored": Method(HardDistill, {"mode": "top1", "ce_weight": 0.5}, "top-1 store",
                                   store={"kind": "top1"}),
    }


@dataclass
class Budget:
    steps: int
    batch_size: int
    val_every: int
    max_documents: int | None  # None: the whole corpus
    seeds: tuple[int, ...] = (0,)  # each row runs once per seed

    @property
    def label(self) -> str:
        corpus = "the whole corpus" if self.max_documents is None else f"{self.max_documents} of the 79 documents"
        return f"{self.steps} steps x {self.batch_size}x128 tokens on {corpus}"


BUDGETS = {
    "short": Budget(steps=40, batch_size=4, val_every=10, max_documents=None, seeds=(0, 1)),
    "multi_epoch": Budget(steps=60, batch_size=4, val_every=15, max_documents=8, seeds=(0,)),
}


class History(L.Callback):
    """Validation metrics after every validation run, with the step they were taken at and the training time
    (seconds spent in training batches, validation excluded) up to it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._start = 0.0
        self.bytes_per_token: dict[str, float] = {}  # per validation loader prefix, of the module's tokenizer

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._start

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not self.bytes_per_token:
            self.bytes_per_token = validation_bytes_per_token(trainer, pl_module.tokenizer)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ood/"))}
        for prefix, per_token in self.bytes_per_token.items():  # nats per token -> bits per byte
            for name in ("ce", "teacher_ce"):
                if f"{prefix}/{name}" in metrics and (name == "ce" or pl_module.compares_vocabularies()):
                    metrics[f"{prefix}/{name.replace('ce', 'bpb')}"] = metrics[f"{prefix}/{name}"] / math.log(2) \
                        / per_token
        self.rows.append({"step": trainer.global_step, "train_s": self.train_seconds, **metrics})


def validation_bytes_per_token(trainer: L.Trainer, tokenizer: Any) -> dict[str, float]:
    """UTF-8 bytes per target token (EOS and other special tokens: 1 byte) of the validation batches the trainer
    evaluates (``limit_val_batches`` of each loader), under ``tokenizer``: ``{"val": ..., "val_ood": ...}``."""
    sizes = [len(p) if p is not None else 1 for p in TokenPieces(tokenizer, "tokenizer").pieces]
    loaders = trainer.val_dataloaders if isinstance(trainer.val_dataloaders, list) else [trainer.val_dataloaders]
    limits = trainer.num_val_batches
    found = {}
    for prefix, loader, limit in zip(("val", "val_ood"), loaders, limits, strict=False):
        nbytes = tokens = 0
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            targets = batch["labels"][:, 1:].reshape(-1)
            targets = targets[targets >= 0].tolist()
            nbytes, tokens = nbytes + sum(sizes[t] if t < len(sizes) else 1 for t in targets), tokens + len(targets)
        found[prefix] = nbytes / max(tokens, 1)
    return found


class TeacherCache:
    """The frozen teacher's validation logits, computed once and shared by every method (identical inputs and a
    frozen, deterministic teacher give identical logits). Keeps validation from dominating the benchmark, and gives
    the students trained from stored labels (no teacher in memory) the same live-teacher metrics as the others."""

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.teacher: SoftDistill | None = None  # loaded on a miss by a module without a live teacher

    def wrap(self, module: SoftDistill | HardDistill) -> None:
        """Make the module's signal answer the validation metrics from the cached live teacher's logits."""

        def cached(run: Run, batch: dict[str, torch.Tensor], student: torch.Tensor, labels: torch.Tensor,
                   dataloader_idx: int) -> dict[str, torch.Tensor]:
            key = hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()
            if key not in self.store:
                ids = batch["input_ids"]
                logits = (LiveTeacher.logits(run, {"input_ids": ids}) if run.teacher is not None
                          else self.live(batch, student.device))
                self.store[key] = logits.to(torch.bfloat16)
            return val_metrics.against_logits(student, self.store[key].to(student.device)[:, :-1], labels)

        module.signal.validation_metrics = cached

    def live(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.teacher is None:
            self.teacher = SoftDistill(performance=Performance(teacher_dtype="auto"))
            self.teacher.configure_model()
        self.teacher.to(device)
        return LiveTeacher.logits(self.teacher.run, {"input_ids": batch["input_ids"].to(device)})


def label(methods: dict[str, Method], budget: Budget, seed: int, workdir: Path) -> dict[str, Any]:
    """Every store the budget's ``*_stored`` methods need, from one teacher pass over both splits of its corpus:
    ``{"seconds": ..., "stores": {method name: {"path": ..., "bytes_per_token": ...}}}``."""
    needed = {name: method for name, method in methods.items() if method.store is not None}
    if not needed:
        return {"seconds": 0.0, "stores": {}}
    root = workdir / f"labels-{budget.max_documents or 'all'}-seed{seed}"
    writers = {name: LabelWriter(str(root / name), **method.store, overwrite=True) for name, method in needed.items()}
    teacher = SoftDistill(performance=Performance(teacher_dtype="auto"))
    data = DistillDataModule(corpus="builtin:python-docs", block_size=128, batch_size=8,
                             max_documents=budget.max_documents, seed=seed)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*writers.values(), ReuseFreedMemory()], default_root_dir=str(root))
    start = time.perf_counter()
    trainer.predict(teacher, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    tokens = (len(data.train_blocks) + len(data.val_blocks)) * 128
    stores = {}
    for name in needed:
        nbytes = sum(f.stat().st_size for f in (root / name).iterdir())
        stores[name] = {"path": str(root / name), "bytes_per_token": nbytes / tokens}
    print(f"[quality] labelled {tokens:,} tokens into {len(stores)} stores in {seconds:.0f} s", flush=True)
    return {"seconds": seconds, "tokens": tokens, "stores": stores}


def run(name: str, method: Method, budget: Budget, cache: TeacherCache, seed: int, workdir: Path,
        store: dict[str, Any] | None = None, eval_new_tokens: int = 0) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    fast = bf16_is_fast()
    kwargs: dict[str, Any] = {"performance": PERFORMANCE, **method.kwargs}
    if store:
        kwargs["labels"] = store["path"]
    generations = workdir / f"generations-{budget.max_documents or 'all'}-{name}"
    generates = kwargs.get("mode") == "generate"
    if generates:  # a fresh cache: the wall time includes generating
        shutil.rmtree(generations, ignore_errors=True)
        kwargs["generation"] = replace(kwargs.get("generation", Generation()), cache_dir=str(generations))
    if eval_new_tokens:
        kwargs["validation"] = replace(kwargs.get("validation", Validation()), new_tokens=eval_new_tokens)
    model = method.cls(**kwargs)
    data = DistillDataModule(corpus="builtin:python-docs", ood_corpus="builtin:shakespeare", block_size=128,
                             batch_size=budget.batch_size, max_documents=budget.max_documents, seed=seed)
    if method.uses_frozen_teacher:
        cache.wrap(model)
    history = History()
    trainer = L.Trainer(max_steps=budget.steps, val_check_interval=budget.val_every, check_val_every_n_epoch=None,
                        limit_val_batches=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[history, ReuseFreedMemory()],  # CPU: freed memory kept for reuse, as the demo
                        precision="bf16-mixed" if fast else "32-true", default_root_dir=str(workdir / name))
    trainer.validate(model, data, verbose=False)
    history.rows[-1]["step"] = 0
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    final = history.rows[-1]
    print(f"[quality] {name}: in-domain ppl {final['val/ppl']:.1f}, ood ppl {final['val_ood/ppl']:.1f}, "
          f"bits/byte {final['val/bpb']:.3f} / {final['val_ood/bpb']:.3f}, kl {final.get('val/kl', math.nan):.3f}, "
          f"agreement {final.get('val/agreement', math.nan):.3f}, {wall:.0f} s", flush=True)
    storage = method.storage if store is None else f"{method.storage}: {store['bytes_per_token']:,.0f} B on disk"
    row = {"method": name, "seed": seed, "storage": storage, "wall_s": wall, "final": final,
           "history": history.rows, "train_blocks": len(data.train_blocks)}
    if generates:
        row["generations"] = generation_stats(generations, model.tokenizer.eos_token_id)
    return row


def generation_stats(folder: Path, eos_id: int | None) -> dict[str, float]:
    """How repetitive the teacher's continuations are: their count and the share of distinct 4-grams within each
    continuation up to its EOS padding (mean; 1 = no 4-gram repeats, low = the teacher loops)."""
    shares = []
    for file in folder.rglob("*.pt"):
        ids = torch.load(file, weights_only=True).tolist()
        while len(ids) > 4 and ids[-1] == eos_id:
            ids.pop()
        grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
        shares.append(len(set(grams)) / max(len(grams), 1))
    return {"continuations": len(shares), "distinct_4grams": sum(shares) / max(len(shares), 1)}


def seed_labels(labelling: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A budget's labelling per seed (``{"0": {...}}``); results written before seeds were recorded hold one."""
    return {"0": labelling} if "stores" in labelling else labelling


def by_method(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows grouped per method (its seeds), methods in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return list(groups.values())


def mean(runs: list[dict[str, Any]], key: str, at: str = "final") -> float:
    """The mean over a method's seeds of ``key`` in each run's final metrics (``at="start"``: before training)."""
    values = [run["final"][key] if at == "final" else run["history"][0][key] for run in runs]
    return sum(values) / len(values)


def spread(runs: list[dict[str, Any]], key: str) -> str:
    """max - min of ``key`` over a method's seeds, as a share of their mean ("-": one seed)."""
    values = [run["final"][key] for run in runs]
    if len(values) < 2:
        return "-"
    return f"{(max(values) - min(values)) / (sum(values) / len(values)):.0%}"


def markdown(results: dict[str, list[dict[str, Any]]], labelling: dict[str, dict[str, Any]], machine: str,
             command: str, date: str | None = None) -> str:
    lines = [f"Machine: {machine}. Command: `{command}`. Date: {date or time.strftime('%Y-%m-%d')}.", ""]
    for budget_name, rows in results.items():
        budget = BUDGETS[budget_name]
        epochs = budget.steps * budget.batch_size / rows[0]["train_blocks"]
        blocks = rows[0]["train_blocks"]
        seeds = sorted({row.get("seed", 0) for row in rows})
        several = len(seeds) > 1
        done = [d for d in seed_labels(labelling.get(budget_name, {})).values() if d.get("stores")]
        note = (f" Stored-label rows: the teacher labelled {done[0]['tokens']:,} tokens (both splits) into their "
                f"stores in one pass of {sum(d['seconds'] for d in done) / len(done):.0f} s per seed, not in their "
                "wall time." if done else "")
        cells = (f" Each cell: the mean of seeds {', '.join(map(str, seeds))}; spread: max - min over the seeds, as a "
                 "share of the mean." if several else f" Seed {seeds[0]}.")
        lines += [f"**{budget_name}**: {budget.label}: {epochs:.1f} epochs of {blocks} train blocks.{cells}{note}", "",
                  "| method | ppl in domain | ppl Shakespeare | " + ("spread docs / Shakespeare | " if several else "")
                  + "KL(teacher‖student) | top-1 agreement | teacher storage / token | train wall time |",
                  "|---|---:|---:|" + ("---:|" if several else "") + "---:|---:|---|---:|"]
        same = [runs for runs in by_method(rows) if "val/kl" in runs[0]["final"]]  # the teacher's tokenizer
        teacher = same[0][0]["final"] if same else {}
        pad = "| " if several else ""
        if same:
            first = same[0]  # the teacher on each seed's held-out documents, as the students' means
            lines.append(f"| *teacher* | {mean(first, 'val/teacher_ppl'):.1f} | "
                         f"{mean(first, 'val_ood/teacher_ppl'):.1f} | {pad}0 | 1 | | |")
            lines.append(f"| *student as pruned* | {mean(first, 'val/ppl', 'start'):.3g} | "
                         f"{mean(first, 'val_ood/ppl', 'start'):.3g} | {pad}{mean(first, 'val/kl', 'start'):.2f} | "
                         f"{mean(first, 'val/agreement', 'start'):.3f} | | |")
        for runs in same:
            spreads = f"{spread(runs, 'val/ppl')} / {spread(runs, 'val_ood/ppl')} | " if several else ""
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            lines.append(f"| {runs[0]['method']} | {mean(runs, 'val/ppl'):.1f} | {mean(runs, 'val_ood/ppl'):.1f} | "
                         f"{spreads}{mean(runs, 'val/kl'):.3f} | {mean(runs, 'val/agreement'):.3f} | "
                         f"{runs[0]['storage']} | {wall:.0f} s |")
        lines.append("")
        lines += bits_per_byte_view(rows, teacher)
        lines += on_policy_view(rows)
        for runs in by_method(rows):
            for row in runs:
                if "generations" in row:
                    g = row["generations"]
                    lines.append(f"- {row['method']} (seed {row.get('seed', 0)}): {g['continuations']} teacher "
                                 f"continuations, {g['distinct_4grams']:.0%} distinct 4-grams within a continuation "
                                 "on average.")
        lines.append("")
    return "\n".join(lines)


def bits_per_byte_view(rows: list[dict[str, Any]], teacher: dict[str, float]) -> list[str]:
    """Every row in bits per byte (comparable across tokenizers), in domain and on Shakespeare, at equal steps
    (means over the seeds)."""
    if not all("val/bpb" in row["final"] for row in rows):
        return []
    lines = ["Bits per byte of the held-out text (comparable across tokenizers; `cross_*` students read with their "
             "own 4k BPE), at equal steps:", "", "| method | student tokenizer | bits/byte Python docs | "
             "bits/byte Shakespeare | as pruned (docs / Shakespeare) | train wall time |",
             "|---|---|---:|---:|---:|---:|"]
    if "val/teacher_bpb" in teacher:
        lines.append(f"| *teacher* | SmolLM2 (49k) | {teacher['val/teacher_bpb']:.3f} | "
                     f"{teacher['val_ood/teacher_bpb']:.3f} | | |")
    for runs in by_method(rows):
        name = runs[0]["method"]
        own = "4k BPE (own)" if name.startswith("cross_") else "SmolLM2 (49k)"
        wall = sum(r["wall_s"] for r in runs) / len(runs)
        lines.append(f"| {name} | {own} | {mean(runs, 'val/bpb'):.3f} | {mean(runs, 'val_ood/bpb'):.3f} | "
                     f"{mean(runs, 'val/bpb', 'start'):.2f} / {mean(runs, 'val_ood/bpb', 'start'):.2f} | "
                     f"{wall:.0f} s |")
    return [*lines, ""]


def on_policy_view(rows: list[dict[str, Any]]) -> list[str]:
    """The on-policy columns, at equal steps and at equal training time (that of the first row: each other row at
    its validation whose training time is nearest to the first row's total)."""
    if not any("val/teacher_logprob" in row["final"] for row in rows):
        return []
    budget = rows[0]["history"][-1]["train_s"]
    lines = ["On the student's own greedy continuations of held-out prompts, scored by the teacher (higher "
             "log-prob and lower reverse KL: text the teacher would have written), at equal steps and at equal "
             f"training time ({rows[0]['method']}'s {budget:.0f} s of training batches):", "",
             "| method | teacher log-prob / token | KL(student‖teacher) on own text | ppl in domain | train time | "
             f"at {budget:.0f} s: step | log-prob | ppl in domain |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    several = len({row.get("seed", 0) for row in rows}) > 1
    for row in rows:
        f = row["final"]
        if "val/teacher_logprob" not in f:
            continue
        near = min(row["history"][1:], key=lambda h: abs(h["train_s"] - budget))
        name = f"{row['method']} (seed {row.get('seed', 0)})" if several else row["method"]
        lines.append(f"| {name} | {f['val/teacher_logprob']:.3f} | {f['val/on_policy_rkl']:.3f} | "
                     f"{f['val/ppl']:.1f} | {row['history'][-1]['train_s']:.0f} s | {near['step']} | "
                     f"{near['val/teacher_logprob']:.3f} | {near['val/ppl']:.1f} |")
    return [*lines, ""]


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for row_axes, (budget_name, rows) in zip(axes, results.items(), strict=True):
        first_seed = min(row.get("seed", 0) for row in rows)
        rows = [row for row in rows if row.get("seed", 0) == first_seed]  # one seed's curves
        row_axes[0].set_title(f"seed {first_seed}")
        for ax, key, title in ((row_axes[0], "val/ppl", "in domain (Python docs)"),
                               (row_axes[1], "val_ood/ppl", "out of domain (Shakespeare)")):
            for i, row in enumerate(rows):  # from the first validation after step 0 (the pruned student: ~5e6)
                history = [h for h in row["history"] if h["step"] > 0]
                color = colors[(2 * i) % 20 + (2 * i) // 20]  # the dark shades first, then the light ones
                ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o", markersize=3,
                        color=color, ls="--" if row["method"].endswith("_stored") else "-", label=row["method"])
            teacher = next((r["final"] for r in rows if key.replace("/ppl", "/teacher_ppl") in r["final"]), None)
            if teacher is not None:
                ax.axhline(teacher[key.replace("/ppl", "/teacher_ppl")], color="k", ls=":", label="teacher")
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("validation perplexity")
            ax.set_title(f"{budget_name}: {title}")
        row_axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(out: Path, results: dict[str, list[dict[str, Any]]], labelling: dict[str, dict[str, Any]],
          methods: dict[str, Method], machine: str, command: str) -> None:
    """``out``.json (everything, with histories), .md (the table) and .png (perplexity against steps)."""
    names = [row["method"] for rows in results.values() for row in rows]
    payload = {"machine": machine, "command": command, "date": time.strftime("%Y-%m-%d"),
               "budgets": {k: BUDGETS[k].label for k in results}, "labelling": labelling,
               "methods": {n: {"class": methods[n].cls.__name__, **plain(methods[n].kwargs),
                               "store": methods[n].store} for n in names},
               "results": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(results, labelling, machine, command))
    plot(results, out.with_suffix(".png"))


def merge(parts: list[Path], out: Path) -> None:
    """``out``.json from the payloads of runs made in parts: every row (per budget, in the table's order), every
    seed's labelling, every method; the commands and machines joined."""
    payloads = [json.loads(part.with_suffix(".json").read_text()) for part in parts]
    merged: dict[str, Any] = {"machine": " | ".join(dict.fromkeys(p["machine"] for p in payloads)),
                              "command": "`, `".join(p["command"] for p in payloads),
                              "date": max(p["date"] for p in payloads), "budgets": {}, "labelling": {}, "methods": {},
                              "results": {}}
    for payload in payloads:
        merged["budgets"].update(payload["budgets"])
        merged["methods"].update(payload["methods"])
        for budget, rows in payload["results"].items():
            merged["results"].setdefault(budget, []).extend(rows)
            labelled = merged["labelling"].setdefault(budget, {})
            for seed, done in seed_labels(payload["labelling"].get(budget, {})).items():
                if done.get("stores") or seed not in labelled:  # a part without stores keeps another's
                    labelled[seed] = done
    order = {name: i for i, name in enumerate(default_methods())}  # rows in the table's order, seeds in turn
    for rows in merged["results"].values():
        rows.sort(key=lambda row: (order.get(row["method"], len(order)), row.get("seed", 0)))
    out.with_suffix(".json").write_text(json.dumps(merged, indent=2))


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it, in the shape of a YAML config: an option group as all its fields, a divergence
    as ``class_path`` and ``init_args``."""
    if isinstance(value, Divergence):
        return {"class_path": f"lightning_distill.losses.{type(value).__name__}", "init_args": value.params()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def set_argument(methods: dict[str, Method], item: str) -> None:
    """``--set METHOD.ARG=VALUE`` (an argument) or ``METHOD.GROUP.FIELD=VALUE`` (one field of an option group,
    e.g. ``soft_fkl.optimization.learning_rate=2e-3``); VALUE is JSON."""
    target, value = item.split("=", 1)
    names = [name for name in methods if target.startswith(name + ".")]
    if not names:
        raise SystemExit(f"--set {item}: expected METHOD.ARG=VALUE with METHOD among {list(methods)}")
    name = max(names, key=len)  # method names may hold dots (onpolicy_rkl_0.5)
    kwargs, path, value = methods[name].kwargs, target[len(name) + 1:].split("."), json.loads(value)
    if len(path) == 1:  # a whole option group may be given as a JSON object of its fields
        kwargs[path[0]] = GROUPS[path[0]](**value) if path[0] in GROUPS and isinstance(value, dict) else value
        return
    group, field = path
    if group not in GROUPS:
        raise SystemExit(f"--set {item}: {group} is not an option group; groups: {list(GROUPS)}")
    current = kwargs.get(group) or (PERFORMANCE if group == "performance" else GROUPS[group]())
    kwargs[group] = replace(current, **{field: value})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="all",
                        help="comma-separated names, or 'all' (the table's rows: every method but the on-policy ones)")
    parser.add_argument("--budgets", default="short,multi_epoch")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds run at every budget (default: each budget's own: short 0,1; "
                             "multi_epoch 0)")
    parser.add_argument("--seed", type=int, default=None, help="one seed at every budget (= --seeds N)")
    parser.add_argument("--out", default=str(RESULTS / "quality"), help="output path without extension")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.ARG=VALUE",
                        help="override a method argument, e.g. soft_fkl.temperature=2, or a field of an option group, "
                             "e.g. soft_fkl.optimization.learning_rate=2e-3 (JSON values)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs (and label stores) already in OUT.json, run only the missing ones")
    parser.add_argument("--replot", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json")
    parser.add_argument("--merge", nargs="+", metavar="PART", default=None,
                        help="only join the rows of runs made in parts (PART.json each, e.g. seeds or methods run "
                             "side by side) into OUT.json, .md and .png")
    parser.add_argument("--eval-new-tokens", type=int, default=0,
                        help="> 0: also score the student's own greedy continuations of held-out prompts (this many "
                             "tokens) with the teacher: the on-policy columns")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="cap every budget's steps (and validate at the end): for a quick smoke run only")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.seeds = str(args.seed)
    methods = default_methods()
    if args.max_steps is not None:
        for budget in BUDGETS.values():
            budget.steps = min(budget.steps, args.max_steps)
            budget.val_every = min(budget.val_every, budget.steps)
    for item in args.set:
        set_argument(methods, item)
    names = [n for n, m in methods.items() if m.in_table] if args.methods == "all" else args.methods.split(",")
    unknown = [name for name in names if name not in methods]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose among {list(methods)}")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
               f"precision {'bf16-mixed' if bf16_is_fast() else 'fp32'}")
    command = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    cache = TeacherCache()
    results: dict[str, list[dict[str, Any]]] = {}
    labelling: dict[str, dict[str, Any]] = {}
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "ld_quality"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() \
        else {}
    if args.merge:
        merge([Path(part) for part in args.merge], out)
    if args.replot or args.merge:
        payload = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(payload["results"], payload["labelling"], payload["machine"],
                                                   payload["command"].strip(), payload["date"]))
        plot(payload["results"], out.with_suffix(".png"))
        return
    for budget_name in args.budgets.split(","):
        budget = BUDGETS[budget_name]
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(budget.seeds)
        results[budget_name], labelling[budget_name] = [], {}
        kept = {(row["method"], row.get("seed", 0)): row for row in previous.get("results", {}).get(budget_name, [])}
        for seed in seeds:  # the split, the stores and the data order follow the seed
            earlier = seed_labels(previous.get("labelling", {}).get(budget_name, {})).get(str(seed), {})
            stored = earlier.get("stores", {})
            needed = {n: methods[n] for n in names if (n, seed) not in kept}
            if all(n in stored and (Path(stored[n]["path"]) / "manifest.json").exists()
                   for n, m in needed.items() if m.store is not None):
                labelling[budget_name][str(seed)] = earlier if stored else {"seconds": 0.0, "stores": {}}
            else:
                labelling[budget_name][str(seed)] = label(needed, budget, seed, workdir)
            for name in names:  # results are written after every run: an interrupted benchmark keeps what it did
                if (name, seed) in kept:
                    print(f"[quality] {budget_name} {name} seed {seed}: kept from {out.with_suffix('.json')} "
                          "(--resume)", flush=True)
                    results[budget_name].append(kept[(name, seed)])
                    continue
                store = labelling[budget_name][str(seed)]["stores"].get(name)
                results[budget_name].append(run(name, methods[name], budget, cache, seed, workdir, store,
                                                args.eval_new_tokens))
                write(out, results, labelling, methods, machine, command)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
