"""CPU memory reuse (lightning_distill.cpu_memory): checked in fresh processes, since its effect is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from lightning_distill import cpu_memory
applied = cpu_memory.reuse_freed_memory() if sys.argv[1] == "on" else False
faults = []
for _ in range(8):  # the same 256 MiB buffer, allocated, touched and freed eight times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": cpu_memory.reuse_freed_memory() if applied else None,
                  "faults": faults}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 2**28 // 4096  # 256 MiB in 4 KiB pages
    off, on = probe("off"), probe("on")
    assert min(off["faults"][2:]) > pages // 2  # glibc maps a fresh block for every large tensor: pages fault again
    assert on["applied"] and on["again"]  # idempotent
    # the heap grows over the first few rounds (how many depends on what else the process allocated); then the
    # freed block is reused: no round of the last four faults its pages in again
    assert max(on["faults"][4:]) < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_environment_turns_it_off():
    assert probe("on", LIGHTNING_DISTILL_REUSE_MEMORY="0")["applied"] is False


def test_a_cpu_trainer_applies_it_once(tiny_teacher_dir, tmp_path, monkeypatch):
    from conftest import TINY_STUDENT, tiny_data, tiny_trainer

    from lightning_distill import SoftDistill, cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "_STATE", {})
    monkeypatch.setattr(cpu_memory, "reuse_freed_memory", lambda: calls.append(1) or False)  # not applied here
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tiny_data())
    assert sum(isinstance(c, cpu_memory.ReuseFreedMemory) for c in trainer.callbacks) == 1
    assert calls == [1]
