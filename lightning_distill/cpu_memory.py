"""Freed CPU memory kept for reuse during training, instead of mapped afresh at every step.

A training step on CPU allocates and frees the same large buffers every step: the logits (N, V) and their
float32 copy, their gradients, the output head's (V, H) gradient and the weights' bf16 copies under autocast.
glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives
it back with ``munmap`` when freed, so the next step touches brand-new pages: one page fault (and zeroing by the
kernel) per 4 KiB, every step. The allocators that PyTorch's CPU tuning guide recommends (jemalloc, tcmalloc,
through ``LD_PRELOAD``) keep freed memory instead; the same is possible inside glibc with two ``mallopt`` calls:
no ``mmap`` for large blocks (``M_MMAP_MAX = 0``: they come from the heap, where freed blocks are reused) and no
trimming of the heap's free top below 1 GiB (``M_TRIM_THRESHOLD``).

:class:`ReuseFreedMemory`, which every method adds to its Trainer
(:meth:`~lightning_distill.modules.base.DistillModule.configure_callbacks`), makes these calls when a Trainer on the
CPU sets up (measured by ``benchmarks/speed.py``, see the README's performance section). They are process-wide and
stay for the rest of the process: the resident memory then stays at its peak between steps rather than returning to
the kernel. ``LIGHTNING_DISTILL_REUSE_MEMORY=0`` in the environment leaves ``malloc`` as it is; without glibc
(macOS, Windows, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule

ENV = "LIGHTNING_DISTILL_REUSE_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)
TRIM_THRESHOLD = 2**30  # bytes of free memory at the heap's top kept rather than returned to the kernel
_STATE: dict[str, bool] = {}  # "applied": the calls were made in this process


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (see the module docstring), once per process.

    Returns:
        Whether it is in effect: False when ``LIGHTNING_DISTILL_REUSE_MEMORY=0``, off Linux, or without glibc.
    """
    if _STATE.get("applied"):
        return True
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _STATE["applied"] = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _STATE["applied"]


class ReuseFreedMemory(L.Callback):
    """Calls :func:`reuse_freed_memory` when a Trainer on the CPU sets up (fit, validate, test or predict)."""

    def setup(self, trainer: L.Trainer, pl_module: DistillModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu" and not _STATE.get("applied") and reuse_freed_memory():
            rank_zero_info(f"[lightning_distill] on CPU, freed memory is kept for reuse (glibc mallopt; {ENV}=0 "
                           "turns this off)")
