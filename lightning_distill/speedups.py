"""Faster models: ``torch.compile`` of the student's (and a frozen teacher's) decoder, and Liger Kernel's Triton
kernels for Llama (RMSNorm, RoPE, SwiGLU) patched into them.

Both are arguments of every method (:class:`~lightning_distill.modules.base.DistillModule`: ``compile_student``,
``compile_teacher``, ``liger_kernels``, all off by default), checked when the module is built and applied once, when
its models are (:func:`lightning_distill.modules.building.keep` calls :meth:`Speedups.apply`).

- Compiling: the decoder (``model.get_decoder()``, embeddings, layers and final norm) is compiled in place with
  :meth:`torch.nn.Module.compile`: its parameter names, so checkpoints and exports, are unchanged, and both the
  training path (final hidden states, :func:`lightning_distill.sharding.final_hidden`) and inference go through it.
  The output heads are not compiled here: the loss applies them chunk by chunk (:mod:`lightning_distill.chunked`
  has its own compiled chunk function). The first steps pay the compilation; generation (on-policy batches,
  ``eval_new_tokens``) varies the sequence length and recompiles. Not with the feature term: it records the layers
  with hooks added during a step, which a compiled graph may not call (``torch._dynamo.config
  .skip_nnmodule_hook_guards``); not combined with FSDP (untested).
- Liger Kernel (https://github.com/linkedin/Liger-Kernel): ``apply_liger_kernel_to_llama`` on each Llama model
  instance, with its fused linear cross-entropy off (our loss never asks the model for logits); like Liger, it also
  patches transformers' Llama classes for the rest of the process. Triton kernels: CUDA only; install with
  ``pip install 'lightning-distill[bench]'``. Applied before compiling.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule

INSTALL = "pip install 'lightning-distill[bench]' (or pip install liger-kernel)"


@dataclass(frozen=True)
class Speedups:
    """What to apply to a module's models; the checks run when it is made.

    Attributes:
        compile_student: ``torch.compile`` the student's decoder.
        compile_teacher: ``torch.compile`` the frozen teacher's decoder (not CoDistill's trained teacher).
        liger_kernels: patch Liger Kernel's Llama kernels into the student and the teacher (CUDA only).
        trains_teacher: the method trains its teacher (CoDistill).
    """

    compile_student: bool = False
    compile_teacher: bool = False
    liger_kernels: bool = False
    trains_teacher: bool = False

    def __post_init__(self) -> None:
        for name in ("compile_student", "compile_teacher", "liger_kernels"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}: e.g. {name}=False")
        if self.compile_teacher and self.trains_teacher:
            raise ValueError("compile_teacher=True compiles a frozen teacher, but this method trains its teacher: "
                             "set compile_teacher=False (compile_student=True still compiles the student)")
        if self.liger_kernels and not torch.cuda.is_available():
            raise ValueError("liger_kernels=True needs a CUDA device (Liger Kernel's kernels are Triton), and none "
                             "is available: set liger_kernels=False")
        if self.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
            raise ImportError(f"liger_kernels=True needs the liger-kernel package: {INSTALL}; or set "
                              "liger_kernels=False")

    def apply(self, module: DistillModule) -> None:
        """Patch and compile ``module``'s student and teacher as asked, once (idempotent)."""
        if self.compile_teacher and module.teacher is None:
            where = f"labels={module.hparams.get('labels')!r}" if module.hparams.get("labels") else "teacher=None"
            raise ValueError(f"compile_teacher=True, but this run keeps no teacher in memory ({where}): set "
                             "compile_teacher=False")
        if (self.compile_student or self.compile_teacher) and getattr(module, "features", None) is not None:
            raise ValueError("compile_student / compile_teacher compile the decoders whose layers the feature term "
                             "records with hooks, which a compiled graph may not call: set feature_weight=0, or "
                             "compile_student=False and compile_teacher=False")
        models = [("student", module.student, self.compile_student), ("teacher", module.teacher, self.compile_teacher)]
        for role, model, compiled in models:
            if model is None:
                continue
            if self.liger_kernels:
                liger_llama(model, role)
            if compiled:
                compile_decoder(model)


def liger_llama(model: nn.Module, role: str) -> None:
    """Liger Kernel's RMSNorm, RoPE and SwiGLU in the Llama ``model`` (its ``role``: ``"student"`` or ``"teacher"``
    names it in errors), once."""
    if getattr(model, "_liger_kernels", False):
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llama":
        raise ValueError(f"liger_kernels=True patches Llama models, but the {role} is {model_type!r}: set "
                         "liger_kernels=False")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as error:  # installed but not importable (e.g. no triton)
        raise ImportError(f"liger_kernels=True: liger_kernel does not import ({error}): {INSTALL}") from error
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    model._liger_kernels = True


def compile_decoder(model: nn.Module, **options: Any) -> nn.Module:
    """Compile ``model``'s decoder in place (:meth:`torch.nn.Module.compile`, ``options`` passed to
    ``torch.compile``), once; returns the decoder."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if getattr(decoder, "_compiled_call_impl", None) is None:
        decoder.compile(**options)
    return decoder


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s decoder has been compiled by :func:`compile_decoder`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "_compiled_call_impl", None) is not None
