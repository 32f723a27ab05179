"""One row of the whole-training-step table (``benchmarks/speed_steps.py``), measured in a fresh process: our
step through Lightning, the teacher alone, or TRL's GKDTrainer / SFTTrainer; or the label store the stored-label
rows read. ``benchmarks/speed.py --worker`` calls :func:`work`; how time and memory are taken is told in
``speed_steps.py``."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LEARNING_RATE = 1e-3  # the modules' default


def work(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """The worker's job: ``label`` (write the store) or ``step`` (measure one row)."""
    torch.manual_seed(row["seed"])
    if task == "label":
        return label_store(row)
    return {"ours": ours, "teacher": teacher_forward, "gkd": trl_step, "sft": trl_step}[row["kind"]](row)


class Meter:
    """Times steps (``begin`` / ``end``) and tracks peak memory from the first step on (see ``speed_steps.py``)."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.cuda = row["device"] == "cuda"
        self.warmup = row["warmup"]
        self.times: list[tuple[float, float]] = []
        self.before = 0
        self._start = (0.0, 0.0)

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if not self.times and self._start == (0.0, 0.0):  # the first step: memory is tracked from here
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                self.before = torch.cuda.memory_allocated()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
                self.before = proc_status("VmRSS")
        self._start = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    def result(self) -> dict[str, Any]:
        timed = self.times[self.warmup:]
        if not timed:
            return {"error": f"only {len(self.times)} steps ran, {self.warmup} of them warm-up"}
        if self.cuda:
            memory = {"peak_bytes": torch.cuda.max_memory_allocated() - self.before,
                      "allocated_before": self.before, "peak_total_bytes": torch.cuda.max_memory_allocated()}
        else:
            memory = {"peak_bytes": proc_status("VmHWM") - self.before, "rss_before": self.before,
                      "peak_total_bytes": proc_status("VmHWM")}
        return {"seconds": statistics.median(w for w, _ in timed),
                "cpu_seconds": statistics.median(c for _, c in timed), "times": [w for w, _ in timed],
                "warmup_times": [w for w, _ in self.times[:self.warmup]], **memory}


def proc_status(field: str) -> int:
    """A memory field of ``/proc/self/status`` in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def bf16() -> bool:
    """Whether the rows run in bf16 autocast (where bf16 is native), else in fp32."""
    from lightning_distill.backbone import bf16_is_fast

    return bf16_is_fast()


def data_module(row: dict[str, Any], tokenizer: Any = None) -> Any:
    """The rows' corpus blocks; with ``tokenizer`` set up here (outside a Trainer)."""
    from lightning_distill import DistillDataModule

    data = DistillDataModule(corpus="builtin:python-docs", block_size=row["block_size"], batch_size=row["batch_size"],
                             max_documents=row["max_documents"], seed=row["seed"])
    if tokenizer is not None:
        data.set_tokenizer(tokenizer)
        data.prepare_data()
        data.setup("fit")
    return data


def trainer(row: dict[str, Any], folder: str, **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(accelerator=row["device"], devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=folder,
                     precision="bf16-mixed" if bf16() else "32-true", **kwargs)


def label_store(row: dict[str, Any]) -> dict[str, Any]:
    """A top-32 store of the train split, as ``lightning-distill predict`` writes it (``benchmarks/quality.py``)."""
    from lightning_distill import Performance, SoftDistill
    from lightning_distill.store import LabelWriter

    model = SoftDistill(teacher=row["teacher"], student=row["student"], performance=Performance(teacher_dtype="auto"))
    writer = LabelWriter(row["store"], kind="topk", k=32, splits=["train"], overwrite=True)
    start = time.perf_counter()
    trainer(row, str(Path(row["store"]).parent), callbacks=[writer]).predict(model, datamodule=data_module(row),
                                                                            return_predictions=False)
    return {"seconds": time.perf_counter() - start}


def ours(row: dict[str, Any]) -> dict[str, Any]:
    """Our step through Lightning's ``Trainer.fit``, timed by a callback; validation off. ``row["module"]``: more
    SoftDistill arguments, an option group as a dict of its fields (``performance`` adds to the row's)."""
    import lightning as L

    from lightning_distill import Optimization, Performance, SoftDistill

    meter, profile = Meter(row), Profile(row)

    class Clock(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            profile.begin(len(meter.times))
            meter.begin()

        def on_train_batch_end(self, *args: Any) -> None:
            meter.end()
            profile.end(len(meter.times))

    module = dict(row["module"])
    performance = Performance(teacher_dtype="auto", chunk_size=row["chunk_size"], **module.pop("performance", {}))
    model = SoftDistill(teacher=row["teacher"], student=row["student"], performance=performance,
                        optimization=Optimization(learning_rate=LEARNING_RATE), **module)
    with tempfile.TemporaryDirectory() as folder:
        trainer(row, folder, max_steps=row["warmup"] + row["repeats"], limit_val_batches=0, num_sanity_val_steps=0,
                callbacks=[Clock()]).fit(model, data_module(row))
    flops = student_flops(model.student, row["batch_size"], row["block_size"])
    return {**meter.result(), "precision": "bf16-mixed" if bf16() else "fp32", **flops, **profile.result()}


def student_flops(student: torch.nn.Module, batch: int, block: int) -> dict[str, Any]:
    """The student's model FLOPs of one training step (forward and backward, the loss head included, the
    optimizer not): ``6 * P * tokens`` for the decoder layers' and output head's weights (the input embedding is a
    lookup) plus ``6 * L * T * H_attn * tokens`` for causal attention (scores and values, half the T x T square),
    as in PaLM's model-FLOPs utilisation."""
    config = student.config
    layers = sum(p.numel() for n, p in student.named_parameters() if ".layers." in f".{n}")
    head = config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_attention_heads * head_dim
    tokens = batch * block
    per_token = 6 * (layers + head) + 6 * config.num_hidden_layers * block * attention
    return {"student_flops_per_step": per_token * tokens, "student_layer_parameters": layers,
            "tokens_per_step": tokens}


class Profile:
    """With ``row["profile"]``, ``torch.profiler`` over the first two timed steps: the top kernels (CUDA) or
    operators (CPU) by their own time, as a text table in ``result()["profile"]``."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.on, self.first, self.cuda = bool(row.get("profile")), row["warmup"], row["device"] == "cuda"
        self.profiler: Any = None
        self.running = False

    def begin(self, done: int) -> None:
        if self.on and done == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.running = True

    def end(self, done: int) -> None:
        if self.running and done == self.first + 2:
            self.stop()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.running = False

    def result(self) -> dict[str, Any]:
        if self.profiler is None:
            return {}
        if self.running:  # fewer than two timed steps
            self.stop()
        return {"profile": top_kernels(self.profiler, self.cuda)}


def top_kernels(profiler: Any, cuda: bool, rows: int = 15) -> str:
    """The profiler's table of the ``rows`` operators and kernels that took the most of their own device time
    (CUDA) or CPU time."""
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


@torch.no_grad()
def teacher_forward(row: dict[str, Any]) -> dict[str, Any]:
    """The frozen teacher alone on the rows' batches: to its final hidden states, or with its logits."""
    from lightning_distill import Performance, SoftDistill
    from lightning_distill.signals import LiveTeacher

    model = SoftDistill(teacher=row["teacher"], student=row["student"], performance=Performance(teacher_dtype="auto"))
    model.make_models()
    model.teacher.to(row["device"])
    blocks = data_module(row, model.tokenizer).train_blocks.to(row["device"])  # (N, T)
    meter, live = Meter(row), LiveTeacher()
    autocast = torch.autocast(row["device"], dtype=torch.bfloat16, enabled=bf16())
    for step in range(row["warmup"] + row["repeats"]):
        ids = blocks[torch.arange(step * row["batch_size"], (step + 1) * row["batch_size"]) % len(blocks)]  # (B, T)
        meter.begin()
        with autocast:
            out = (model.teacher(input_ids=ids).logits if row["logits"]
                   else live.distribution(model.run, {"input_ids": ids}).hidden)
        del out
        meter.end()
    return {**meter.result(), "precision": "bf16-mixed" if bf16() else "fp32"}


def trl_step(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's GKDTrainer or SFTTrainer on our student and teacher and the same blocks, timed by a callback."""
    from datasets import Dataset
    from transformers import TrainerCallback, default_data_collator

    from lightning_distill import Performance, SoftDistill

    meter = Meter(row)

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            meter.begin()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            meter.end()

    model = SoftDistill(teacher=row["teacher"], student=row["student"], performance=Performance(teacher_dtype="auto"))
    model.make_models()
    steps = row["warmup"] + row["repeats"]
    blocks = data_module(row, model.tokenizer).train_blocks[:steps * row["batch_size"]].tolist()
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                                 "labels": blocks})
    with tempfile.TemporaryDirectory() as folder:
        settings = {"output_dir": folder, "per_device_train_batch_size": row["batch_size"], "max_steps": steps,
                    "learning_rate": LEARNING_RATE, "lr_scheduler_type": "cosine", "warmup_steps": 10,
                    "weight_decay": 0.0, "max_grad_norm": 0.0, "bf16": bf16(), "gradient_checkpointing": False,
                    "logging_steps": 10**6, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
                    "dataloader_num_workers": 0, "seed": row["seed"], "use_cpu": row["device"] == "cpu",
                    "remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True}}
        common = {"args": None, "train_dataset": dataset, "processing_class": model.tokenizer,
                  "data_collator": default_data_collator, "callbacks": [Clock()]}
        if row["kind"] == "gkd":
            try:  # TRL >= 1.x keeps GKD under trl.experimental
                from trl.experimental.gkd import GKDConfig, GKDTrainer
            except ImportError:
                from trl import GKDConfig, GKDTrainer

            common["args"] = GKDConfig(**settings, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False)
            job = GKDTrainer(model=model.student, teacher_model=model.teacher, **common)
        else:
            from trl import SFTConfig, SFTTrainer

            common["args"] = SFTConfig(**settings, use_liger_kernel=row["use_liger_kernel"])
            job = SFTTrainer(model=model.student, **common)
        job.train()
    import trl

    return {**meter.result(), "precision": "bf16-mixed" if bf16() else "fp32", "trl": trl.__version__}
