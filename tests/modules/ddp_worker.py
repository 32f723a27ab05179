"""Run by tests/modules/test_ddp.py as `python ddp_worker.py TEACHER_DIR OUT_JSON [SOFTDISTILL_KWARGS_JSON]`: a
2-process DDP fit of SoftDistill on CPU (gloo). Lightning's DDP launcher re-runs this script once per extra rank.
The kwargs may replace the student or the teacher; an option group is given as a JSON object of its fields
(``{"features": {"weight": 1.0}}`` is ``features=Features(weight=1.0)``, ``{"teacher": {"models": ...}}`` several
teachers). A feature projection (``features``, a narrower student) is
reported and compared across ranks with the student."""

import json
import sys

import lightning as L
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest helpers
from conftest import TINY_STUDENT, tiny_data

from lightning_distill import Features, OnPolicy, Optimization, Performance, SoftDistill, Teachers, Validation

GROUPS = {"on_policy": OnPolicy, "features": Features, "optimization": Optimization, "performance": Performance,
          "validation": Validation, "teacher": Teachers}


class Inspect(L.Callback):
    def on_train_start(self, trainer, pl_module):
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper
        reduced = {id(p) for p in ddp._module_parameters}
        self.report = {
            "wrapped": type(ddp).__name__,
            "teacher_in_buckets": any(id(p) in reduced for p in pl_module.teacher.parameters()),
            "teacher_ignored": all(f"teacher.{n}" in ddp.parameters_to_ignore
                                   for n, _ in pl_module.teacher.named_parameters()),
            "student_in_buckets": all(id(p) in reduced for p in pl_module.student.parameters()),
            "other_teachers": sorted(pl_module.other_teachers),
            "other_teachers_in_buckets": any(id(p) in reduced for p in pl_module.other_teachers.parameters()),
            "other_teachers_ignored": all(f"other_teachers.{n}" in ddp.parameters_to_ignore
                                          for n, _ in pl_module.other_teachers.named_parameters()),
            "projection_in_buckets": all(id(p) in reduced for p in trained_extra(pl_module)) and
            bool(trained_extra(pl_module)),
        }


def trained_extra(model):
    """The feature projection's parameters, if the model has one."""
    features = getattr(model, "features", None)
    return list(features.parameters()) if features is not None else []


def main() -> None:
    teacher_dir, out = sys.argv[1], sys.argv[2]
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    kwargs = {k: GROUPS[k](**v) if k in GROUPS and isinstance(v, dict) else v for k, v in kwargs.items()}
    torch.manual_seed(0)
    model = SoftDistill(**{"teacher": teacher_dir, "student": TINY_STUDENT, "ce_weight": 0.5, **kwargs})
    inspect = Inspect()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[inspect])
    trainer.fit(model, tiny_data())
    weights = [p.detach().clone() for p in [*model.student.parameters(), *trained_extra(model)]]
    gathered = trainer.strategy.all_gather(torch.stack([w.sum() for w in weights]))
    if trainer.global_rank == 0:
        report = {**inspect.report, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "ranks_agree": bool(torch.allclose(gathered[0], gathered[1])),
                  "loss": float(trainer.callback_metrics["train/loss"]),
                  "feature_loss": float(trainer.callback_metrics.get("train/feature_loss", float("nan")))}
        with open(out, "w") as f:
            json.dump(report, f)
    # Tear gloo down before the interpreter exits: left to exit, its threads can abort the process (seen once:
    # "terminate called without an active exception", exit -6, after a complete run).
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
