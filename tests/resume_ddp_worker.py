"""Run by tests/test_reliability.py as `python resume_ddp_worker.py TEACHER_DIR CORPUS WORKDIR OUT_JSON`: on 2 DDP
CPU ranks (gloo), a SoftDistill run that never stops, one killed after step STOP_AT, and its resume from the
checkpoint written at the kill; reports the batches each rank saw and the largest weight difference. Lightning's
DDP launcher re-runs this script once per extra rank."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ for the helpers
from test_reliability import Record, data, make, max_difference, trainer_for, weights

STOP_AT = 3  # mid-epoch: each rank has 2 batches per epoch (7 and 6 blocks of 13)


def main() -> None:
    teacher, corpus, workdir, out = sys.argv[1:5]
    ddp = {"devices": 2, "strategy": "ddp", "max_steps": 6, "val_check_interval": 2}
    torch.manual_seed(0)
    straight, record = make("soft", teacher), Record()
    trainer_for(Path(workdir) / "straight", record, **ddp).fit(straight, data(corpus))
    expected, order = weights(straight), record.blocks

    torch.manual_seed(0)
    killed = Record(STOP_AT)
    try:
        trainer_for(Path(workdir), killed, **ddp).fit(make("soft", teacher), data(corpus))
    except RuntimeError as error:
        assert "killed" in str(error), error
    torch.manual_seed(123)
    resumed, second = make("soft", teacher), Record()
    trainer = trainer_for(Path(workdir), second, **ddp)
    trainer.fit(resumed, data(corpus), ckpt_path=str(Path(workdir) / "interrupted.ckpt"))

    same = killed.blocks + second.blocks == order  # this rank's batches, in order
    found = trainer.strategy.all_gather(torch.tensor([max_difference(weights(resumed), expected), float(same)]))
    if trainer.global_rank == 0:
        report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "batches": len(order),
                  "max_difference": float(found[:, 0].max()), "same_batches": bool(found[:, 1].all())}
        Path(out).write_text(json.dumps(report))
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
