"""Run by tests/modules/test_fsdp.py as `python fsdp_worker.py SPEC_JSON`: a fit of 3 steps of one method under
FSDP1 (Lightning's FSDPStrategy), FSDP2 (ModelParallelStrategy), DDP or one device (the references), on CPU (gloo)
or CUDA, then a checkpoint, an export of the student, a generation and a report of what each rank held. Lightning's
launcher re-runs this script once per extra rank.

SPEC keys: ``teacher`` (folder), ``out`` (report JSON), ``dir`` (run folder), ``method`` (soft | hard | co),
``strategy`` (fsdp | fsdp2 | ddp | single), ``accelerator`` (cpu | cuda, default cpu), ``devices``, ``precision``
(default bf16-mixed), ``kwargs`` (the method's arguments; an option group as a JSON object of its fields, e.g.
``{"performance": {"chunk_size": 16}}``), ``max_steps`` (default 3), ``resume`` (a checkpoint).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)
from torch.distributed.tensor import DTensor

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest helpers
from conftest import TINY_STUDENT, tiny_data

from lightning_distill import (
    CoDistill,
    Features,
    Generation,
    HardDistill,
    OnPolicy,
    Optimization,
    Performance,
    Schedule,
    SoftDistill,
    Validation,
    sharding,
)

METHODS = {"soft": SoftDistill, "hard": HardDistill, "co": CoDistill}
GROUPS = {"optimization": Optimization, "performance": Performance, "validation": Validation, "on_policy": OnPolicy,
          "features": Features, "generation": Generation, "schedule": Schedule}
FSDP1_PREFIX = "_fsdp_wrapped_module."


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, which refuses a CPU accelerator by name only (FSDP1 itself runs on gloo), wrapping
    as Lightning does but with the CPU as FSDP's device (Lightning passes a device index, None on CPU)."""

    def _setup_model(self, model):
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


def _full_state_dict_on_cpu(module, world_size, rank0_only=True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: offloading a CPU tensor to the CPU frees the
    gathered storage it still points to in FSDP1 (a segfault on gloo); on GPUs Lightning's own context is used."""
    return FullyShardedDataParallel.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                                    FullStateDictConfig(rank0_only=rank0_only),
                                                    FullOptimStateDictConfig(rank0_only=rank0_only))


class Record(L.Callback):
    """Per-step losses, and after set-up what each rank holds."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.layout: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.layout = held(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def held(trainer, module) -> dict:
    """FSDP1's units (dtype, parameter names, trainable) read from their flat parameters, and for every parameter
    its dtype, whether it is an FSDP2 shard (DTensor) and whether the optimizer holds it."""
    units = []
    if isinstance(trainer.strategy.model, FullyShardedDataParallel):
        for unit in FullyShardedDataParallel.fsdp_modules(trainer.strategy.model):
            flat = unit._handle.flat_param if unit._handle is not None else None
            if flat is not None:
                prefix = next(n for n, m in trainer.strategy.model.named_modules() if m is unit)
                prefix = prefix.replace(FSDP1_PREFIX, "")
                names = [f"{prefix}.{n}".lstrip(".").replace(FSDP1_PREFIX, "") for n in flat._fqns]
                units.append({"dtype": str(flat.dtype), "params": names, "requires_grad": flat.requires_grad})
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    params = {name.replace(FSDP1_PREFIX, ""): {"dtype": str(p.dtype), "dtensor": isinstance(p, DTensor),
                                                "optimized": id(p) in optimized}
              for name, p in module.named_parameters()}
    return {"units": units, "params": params}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (of a DTensor, its local shard)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def strategy_of(spec: dict):
    on_cpu = spec.get("accelerator", "cpu") == "cpu"
    if spec["strategy"] == "fsdp" and on_cpu:
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_on_cpu
        return CPUFSDPStrategy()
    if spec["strategy"] == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=spec["devices"], tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    return {"fsdp": "fsdp", "ddp": "ddp", "single": "auto"}[spec["strategy"]]


def peak_memory() -> list[int]:
    """Every rank's peak CUDA memory (bytes) since the start; empty on CPU."""
    if not torch.cuda.is_available():
        return []
    peak = torch.cuda.max_memory_allocated()
    if not torch.distributed.is_initialized():
        return [peak]
    every = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, peak)
    return every


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = Path(spec["dir"])
    torch.manual_seed(0)
    kwargs = {k: GROUPS[k](**v) if k in GROUPS and isinstance(v, dict) else v
              for k, v in spec.get("kwargs", {}).items()}
    model = METHODS[spec["method"]](teacher=spec["teacher"], student=TINY_STUDENT, **kwargs)
    record = Record()
    trainer = L.Trainer(accelerator=spec.get("accelerator", "cpu"), devices=spec["devices"],
                        strategy=strategy_of(spec), max_steps=spec.get("max_steps", 3),
                        precision=spec.get("precision", "bf16-mixed"), limit_val_batches=1, val_check_interval=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(run),
                        callbacks=[record])
    trainer.fit(model, tiny_data(), ckpt_path=spec.get("resume"))
    ckpt = run / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = trainer.optimizers[0].state
    teacher = {id(p) for p in model.teacher.parameters()} if model.teacher is not None else set()
    exported = model.export(str(run / "student"))  # every rank: under FSDP the student is gathered
    text = model.generate(["def f(x):"], max_new_tokens=4)
    memory = peak_memory()
    if trainer.global_rank == 0:
        checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
        report = {
            "world_size": trainer.world_size, "global_step": trainer.global_step, "losses": record.losses,
            "layout": record.layout, "sharded": sharding.is_sharded(model),
            "checkpoint_keys": sorted(checkpoint["state_dict"]),
            "teacher_in_optimizer_state": bool({id(p) for p in state} & teacher),
            "optimizer_state_numel": sum(local(s["exp_avg"]).numel() for s in state.values() if "exp_avg" in s),
            "exported": exported, "generated": text, "checkpoint": str(ckpt), "peak_memory": memory,
        }
        Path(spec["out"]).write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # tear gloo down before exit (see ddp_worker.py)
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
