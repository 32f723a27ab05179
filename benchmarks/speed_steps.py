"""The whole-training-step table of ``benchmarks/speed.py``: one optimizer step (forward, backward, AdamW) of the
same student on the same token blocks, ours and TRL's, side by side.

Rows (each measured in a fresh process by ``benchmarks/step_worker.py``; seconds per step and peak memory):

- ours, through a Lightning ``Trainer`` (``bf16-mixed`` where :func:`~lightning_distill.backbone.bf16_is_fast`, else
  ``32-true``), at ``chunk_size`` 0 and :data:`CHUNK`: ``CE only`` (``SoftDistill(ce_weight=1)``), ``online KD``
  (``SoftDistill()``: live teacher, 0.5 forward KL + 0.5 CE), ``stored-label KD`` (``SoftDistill(labels=...)`` from
  a top-32 store written first by :class:`~lightning_distill.store.LabelWriter`, as ``lightning-distill predict``
  does); with ``performance.compile_student`` at :data:`CHUNK` (the first steps compile: one more warm-up step); with
  ``performance.liger_kernels`` on CUDA when ``liger_kernel`` is installed;
- on CPU, ``CE only`` and ``online KD`` at the modules' default chunk size once more with glibc's ``malloc`` left as
  it is (``LIGHTNING_DISTILL_REUSE_MEMORY=0``): every other row, ours, the teacher's and TRL's alike, runs in a process
  that keeps freed memory for reuse (:func:`lightning_distill.callbacks.reuse_freed_memory`, what the CLI and the demo
  do on CPU);
- ``teacher forward``: the frozen teacher alone under ``no_grad``, to its final hidden states (what online KD adds
  to a CE step besides the loss head), and with its logits (B, T, V);
- TRL (``pip install 'lightning-distill[bench]'``): ``GKDTrainer`` (off-policy ``lmbda=0``, forward KL ``beta=0``)
  and ``SFTTrainer`` (and with ``use_liger_kernel`` on CUDA), given the same student and teacher objects (built by
  ``SoftDistill``) and the train blocks of the same corpus pre-tokenized (``input_ids``, ``attention_mask``,
  ``labels``; every block full, so the order does not change the cost), at the same
  learning rate, batch and precision, without gradient checkpointing (TRL's default is on) or clipping.

Time: the median over ``repeats`` steps after ``warmup`` untimed ones, from the start of a
step (batch fetched) to its end (optimizer stepped), by a Lightning or a transformers callback (CUDA synchronized):
wall seconds and the process' CPU seconds. Memory: on CPU the growth of the peak RSS (``VmHWM``, reset just before
the first step) over all steps above the RSS before it: optimizer state, gradients, activations, logits (compiled
rows: the compiler's memory too); on CUDA ``max_memory_allocated`` above the memory allocated before the first step.
The models and libraries before it are ``rss_before`` / ``allocated_before``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHUNK = 256
CPU_STEP = {"batch_size": 4, "block_size": 128, "warmup": 1, "repeats": 3, "max_documents": 4}
CUDA_STEP = {"batch_size": 8, "block_size": 1024, "warmup": 2, "repeats": 5, "max_documents": None}
EMBEDDED = {"teacher": "builtin:smollm2-135m-instruct", "student": {"from_teacher": {"layers": 6}}}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}
#: ``--step-models shaped``: random models of SmolLM2-1.7B's (teacher) and SmolLM2-135M's (student) shapes, the
#: vocabulary of both; ``shaped-tiny`` the same code path at a few MB (a CPU dry run of ``benchmarks/gpu_proof.py``).
SHAPES = {
    "shaped": {"vocab_size": 49152,
               "teacher": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                           "num_attention_heads": 32, "num_key_value_heads": 32},
               "student": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                           "num_attention_heads": 9, "num_key_value_heads": 3}},
    "shaped-tiny": {"vocab_size": 1024,
                    "teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 4},
                    "student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2}},
}
INSTALL = "not measured: trl is not installed (pip install 'lightning-distill[bench]')"


# ------------------------------------------------------------------------------------------------------- the plan
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``speed.py``'s options for this table, and for running one table alone."""
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--head-only", action="store_true", help="only the loss-head table")
    only.add_argument("--steps-only", action="store_true", help="only the whole-training-step table")
    parser.add_argument("--step-models", choices=["embedded", "tiny", *SHAPES], default="embedded",
                        help="whole steps: the embedded teacher and its 6-layer student, tiny random ones (smoke), "
                             "or random SmolLM2-1.7B / 135M-shaped ones (shaped; shaped-tiny: its smoke run)")
    parser.add_argument("--step-shape", default=None,
                        help="whole steps: BxT, e.g. 2x32 (default 4x128 on CPU, 8x1024 on CUDA)")
    parser.add_argument("--step-repeats", type=int, default=None, help="whole steps: timed steps per row")
    parser.add_argument("--step-chunks", type=lambda s: [int(c) for c in s.split(",")], default=[0, CHUNK],
                        help=f"whole steps: the chunk sizes of our rows (default 0,{CHUNK})")
    parser.add_argument("--step-rows", type=lambda s: [n.strip() for n in s.split(";")], default=None,
                        help="whole steps: only the rows of these names (separated by ';'), in this order "
                             "(default: every row)")


def step_rows(args: argparse.Namespace, device: str, in_subprocess: Any,
              on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Label a store, then measure every row in its own process (``in_subprocess(task, row)``); rows and notes.
    ``on_row`` is given the rows measured so far after each one (a caller that may be stopped keeps them)."""
    base = {"device": device, "threads": args.threads, "seed": 0, **(CUDA_STEP if device == "cuda" else CPU_STEP),
            **models(args.step_models)}
    if args.step_shape:
        batch, block = (int(n) for n in args.step_shape.lower().split("x"))
        base.update(batch_size=batch, block_size=block)
    if args.step_repeats:
        base["repeats"] = args.step_repeats
    if args.step_models.startswith("shaped"):
        base["max_documents"] = 20  # 60-odd blocks of 1024 tokens of the shaped models' tokenizer: enough steps
    if args.step_models == "shaped-tiny":
        base["max_documents"] = 2  # the dry run's short blocks: a few hundred, labelled in seconds
    store = str(Path(tempfile.mkdtemp(prefix="speed_store_")) / "topk32")
    print(f"training step: labelling {store} (top-32, train split)", flush=True)
    labelled = in_subprocess("label", {**base, "store": store})
    notes = [f"Whole step: {base['batch_size']} x {base['block_size']} tokens per step, models "
             f"{base['label']}; the stored-label rows read a top-32 store written by LabelWriter in "
             f"{labelled.get('seconds', float('nan')):.0f} s (not in the table)."]
    results = []
    for row in select(plan(base, store, device, args.step_chunks), args.step_rows):
        if "skip" not in row:
            print(f"training step: {row['name']} (chunk {row.get('chunk_size', '')})", flush=True)
            row = {**row, **in_subprocess("step", row)}
        print({k: row.get(k) for k in ("name", "chunk_size", "seconds", "peak_bytes", "error", "skip")}, flush=True)
        results.append(row)
        if on_row is not None:
            on_row(results)
    shutil.rmtree(Path(store).parent, ignore_errors=True)
    if args.step_models != "embedded":
        shutil.rmtree(base["teacher"], ignore_errors=True)
    return results, notes + trl_notes()


def select(rows: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    """The rows named in ``names``, in that order (every row of a name: each chunk size); all when ``None``."""
    if names is None:
        return rows
    unknown = sorted(set(names) - {r["name"] for r in rows})
    if unknown:
        raise ValueError(f"--step-rows names {unknown}, which are not rows here; the rows: "
                         f"{sorted({r['name'] for r in rows})}")
    return [r for name in names for r in rows if r["name"] == name]


def models(which: str) -> dict[str, Any]:
    """The teacher and student of the rows: the embedded pair; a tiny random Llama teacher (the embedded
    tokenizer, written to a temporary folder) and its 2-layer pruned student, for smoke runs; or random models of
    :data:`SHAPES` (a small BPE tokenizer, no package needed: the shapes, not the weights or the text, set the
    cost)."""
    if which == "embedded":
        return {**EMBEDDED, "label": "SmolLM2-135M-Instruct teacher, its 6-layer pruned student"}
    if which in SHAPES:
        return shaped(SHAPES[which], which)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_distill.backbone import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED["teacher"])
    folder = tempfile.mkdtemp(prefix="speed_tiny_teacher_")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"teacher": folder, "student": {"from_teacher": {"layers": 2}},
            "label": f"tiny random Llama teacher ({TINY['num_hidden_layers']} layers, hidden {TINY['hidden_size']}, "
                     f"vocab {len(tokenizer)}), its 2-layer pruned student"}


def shaped(shapes: dict[str, Any], which: str) -> dict[str, Any]:
    """A random Llama teacher of ``shapes["teacher"]`` written to a temporary folder (bf16) with the tests' small
    BPE tokenizer (``tests/conftest.py``), and a random student config of ``shapes["student"]``; both of
    ``shapes["vocab_size"]`` (larger than the tokenizer's: the output heads have the shape's cost)."""
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model_dir

    folder = Path(tempfile.mkdtemp(prefix="speed_shaped_teacher_"))
    make_tiny_model_dir(folder)  # the tokenizer (its tiny model is overwritten below)
    common = {"vocab_size": shapes["vocab_size"], "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # a 1.7B-parameter model initialises in seconds on a GPU
        teacher = LlamaForCausalLM(LlamaConfig(**common, **shapes["teacher"])).to(torch.bfloat16)
    teacher.save_pretrained(folder)
    del teacher
    if device == "cuda":
        torch.cuda.empty_cache()  # the rows run in processes of their own
    t, s = shapes["teacher"], shapes["student"]
    return {"teacher": str(folder), "student": {"config": {**common, **s}},
            "label": f"random {which} models: teacher {t['num_hidden_layers']} layers, hidden {t['hidden_size']} "
                     f"(SmolLM2-1.7B's shape at `shaped`), student {s['num_hidden_layers']} layers, hidden "
                     f"{s['hidden_size']} (SmolLM2-135M's), vocabulary {shapes['vocab_size']}"}


def plan(base: dict[str, Any], store: str, device: str, chunks: list[int] | None = None) -> list[dict[str, Any]]:
    """The rows: ours at both chunk sizes (or at ``chunks``), compiled and Liger variants, the teacher alone, TRL's
    trainers. A row's ``module`` holds SoftDistill arguments as JSON (an option group as a dict of its fields, e.g.
    ``performance``); ``step_worker.ours`` adds ``performance.teacher_dtype="auto"``, ``performance.chunk_size`` and
    the learning rate."""
    ours = {"CE only": {"ce_weight": 1.0}, "online KD": {}, "stored-label KD": {"labels": store}}
    rows = [{**base, "kind": "ours", "name": name, "module": module, "chunk_size": chunk}
            for chunk in (chunks or (0, CHUNK)) for name, module in ours.items()]
    rows += [{**base, "kind": "ours", "name": f"{name}, compiled student", "chunk_size": CHUNK,
              "module": {**ours[name], "performance": {"compile_student": True}}, "warmup": base["warmup"] + 1}
             for name in ("CE only", "online KD")]
    if device == "cpu":  # every other row keeps freed memory for reuse (lightning_distill.callbacks)
        rows += [{**base, "kind": "ours", "name": f"{name}, malloc as is", "module": ours[name], "malloc_as_is": True,
                  "chunk_size": default_chunk(name, device)} for name in ("CE only", "online KD")]
    liger = device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    for name in ("CE only", "online KD"):
        row = {**base, "kind": "ours", "name": f"{name}, Liger kernels", "chunk_size": CHUNK,
               "module": {**ours[name], "performance": {"liger_kernels": True}}}
        if not liger:
            row["skip"] = ("not measured: CUDA only (Liger Kernel's kernels are Triton)" if device != "cuda" else
                           "not measured: liger-kernel is not installed (pip install 'lightning-distill[bench]')")
        rows.append(row)
    rows += [{**base, "kind": "teacher", "name": f"teacher forward ({what})", "logits": what == "logits"}
             for what in ("hidden states", "logits")]
    trl = importlib.util.find_spec("trl") is not None
    for name, kind, liger_option in (("TRL GKDTrainer", "gkd", False), ("TRL SFTTrainer", "sft", False),
                                     ("TRL SFTTrainer + Liger", "sft", True)):
        row = {**base, "kind": kind, "name": name, "use_liger_kernel": liger_option}
        if not trl:
            row["skip"] = INSTALL
        elif liger_option and device != "cuda":
            row["skip"] = "not measured: CUDA only (Liger Kernel's kernels are Triton)"
        elif liger_option and not liger:
            row["skip"] = "not measured: liger-kernel is not installed (pip install 'lightning-distill[bench]')"
        rows.append(row)
    return rows


def trl_notes() -> list[str]:
    if importlib.util.find_spec("trl") is None:
        return [f"TRL rows: {INSTALL}."]
    return ["TRL rows: GKDTrainer's loss is the forward KL alone on full logits (ours online KD: 0.5 KL + 0.5 CE, "
            "from hidden states); SFTTrainer (TRL >= 1.x) computes its CE with a fused LM head and logs entropy and "
            "token accuracy every step; both compute the gradient norm every step (transformers' Trainer)."]


# ---------------------------------------------------------------------------------------------------- the report
def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios behind issue #10's targets, per chunk size: time (wall and CPU) and, where both sides are one
    step, peak memory."""
    by = {(r["name"], r.get("chunk_size")): r for r in rows if "seconds" in r}
    out = []

    def add(what: str, chunk: int | str | None, top: str, bottom: list[str], target: str = "",
            chunks: tuple[Any, ...] | None = None, top_chunk: int | None = None) -> None:
        a = by.get((top, chunk if top_chunk is None else top_chunk))
        b = [by.get((name, c)) for name, c in zip(bottom, chunks or [chunk] * len(bottom), strict=True)]
        if a is None or None in b:
            return
        entry = {"ratio": what, "chunk_size": chunk, "target": target,
                 "time": a["seconds"] / sum(r["seconds"] for r in b),
                 "cpu_time": a["cpu_seconds"] / sum(r["cpu_seconds"] for r in b)}
        if len(b) == 1:
            entry["memory"] = a["peak_bytes"] / max(b[0]["peak_bytes"], 1)
        out.append(entry)

    for chunk in (0, CHUNK):
        add("stored-label KD / CE only", chunk, "stored-label KD", ["CE only"], "time <= 1.05 (CPU)")
        for what in ("hidden states", "logits"):
            add(f"online KD / (CE only + teacher forward to {what})", chunk, "online KD",
                ["CE only", f"teacher forward ({what})"], "time <= 1.1 (CPU)" if what == "hidden states" else "",
                (chunk, None))
        add("online KD / TRL GKDTrainer", chunk, "online KD", ["TRL GKDTrainer"], chunks=(None,))
        add("CE only / TRL SFTTrainer", chunk, "CE only", ["TRL SFTTrainer"], chunks=(None,))
    if rows:  # the modules' default (performance.chunk_size=None): each row at the chunk size it picks here
        pick = {name: default_chunk(name, rows[0]["device"]) for name in ("CE only", "online KD", "stored-label KD")}
        add("stored-label KD / CE only", "default", "stored-label KD", ["CE only"], "time <= 1.05 (CPU)",
            (pick["CE only"],), pick["stored-label KD"])
        add("online KD / (CE only + teacher forward to hidden states)", "default", "online KD",
            ["CE only", "teacher forward (hidden states)"], "time <= 1.1 (CPU)", (pick["CE only"], None),
            pick["online KD"])
        add("online KD / TRL GKDTrainer", "default", "online KD", ["TRL GKDTrainer"], chunks=(None,),
            top_chunk=pick["online KD"])
    for name in ("CE only", "online KD"):
        for variant in ("compiled student", "Liger kernels"):
            add(f"{name}, {variant} / {name}", CHUNK, f"{name}, {variant}", [name])
        if rows:
            chunk = default_chunk(name, rows[0]["device"])
            add(f"{name} / {name}, malloc as is", chunk, name, [f"{name}, malloc as is"])
    return out


def default_chunk(name: str, device: str) -> int:
    """The chunk size a row's module picks with ``performance.chunk_size=None`` (``DistillModule.loss_chunk_size``):
    chunks for a live teacher's hidden states (online KD) and on CUDA, one pass otherwise."""
    return CHUNK if name == "online KD" or device == "cuda" else 0


def markdown(report: dict[str, Any]) -> list[str]:
    """The whole-step table and its ratios, as markdown lines."""
    rows = report["training_step"]
    if not rows:
        return []
    lines = ["**Whole training step** (forward, backward, AdamW step; see the docstring of "
             "`benchmarks/speed_steps.py`), median of the timed steps; peak memory from the first step on, above the "
             "memory held before it (models, libraries), which is the last column:", "",
             "| row | chunk | precision | ms/step | CPU ms/step | peak MB | held before, MB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        chunk = r.get("chunk_size", "")
        if "seconds" not in r:
            lines.append(f"| {r['name']} | {chunk} | | {r.get('skip') or 'failed: ' + str(r.get('error'))} | | | |")
            continue
        held = r.get("rss_before", r.get("allocated_before", 0))
        lines.append(f"| {r['name']} | {chunk} | {r['precision']} | {r['seconds'] * 1e3:,.0f} | "
                     f"{r['cpu_seconds'] * 1e3:,.0f} | {r['peak_bytes'] / 2**20:,.0f} | {held / 2**20:,.0f} |")
    lines += ["", "**Whole-step ratios** (time: wall, and CPU time of the process; memory: peak above held):", "",
              "| ratio | chunk | time | CPU time | memory | issue #10 target |", "|---|---:|---:|---:|---:|---|"]
    for r in report["training_step_ratios"]:
        memory = f"{r['memory']:.2f}" if "memory" in r else ""
        lines.append(f"| {r['ratio']} | {r['chunk_size']} | {r['time']:.2f} | {r['cpu_time']:.2f} | {memory} | "
                     f"{r['target']} |")
    return [*lines, "", *[f"- {note}" for note in report["training_step_notes"]]]
