"""Faster models: ``torch.compile`` of the student's (and a frozen teacher's) decoder, and Liger Kernel's Triton
kernels for Llama (RMSNorm, RoPE, SwiGLU) patched into them.

Both are options of every method (:class:`~lightning_distill.options.Performance`: ``compile_student``,
``compile_teacher``, ``liger_kernels``, all off by default), checked when the module is built (:func:`check`) and
applied once, when its models are (:func:`apply`).

- Compiling: the decoder (``model.get_decoder()``, embeddings, layers and final norm) is compiled in place with
  :meth:`torch.nn.Module.compile`: its parameter names, so checkpoints and exports, are unchanged, and both the
  training path (final hidden states, :func:`lightning_distill.backbone.final_hidden`) and inference go through it.
  The output heads are not compiled here: the loss applies them chunk by chunk (:mod:`lightning_distill.losses.distill`
  has its own compiled chunk function). The first steps pay the compilation; generation (on-policy batches,
  ``validation.new_tokens``) varies the sequence length and recompiles. Not with the feature term: it records the layers
  with hooks added during a step, which a compiled graph may not call (``torch._dynamo.config
  .skip_nnmodule_hook_guards``); not combined with FSDP (untested).
- Liger Kernel (https://github.com/linkedin/Liger-Kernel): ``apply_liger_kernel_to_llama`` on each Llama model
  instance, with its fused linear cross-entropy off (our loss never asks the model for logits); like Liger, it also
  patches transformers' Llama classes for the rest of the process. Triton kernels: CUDA only; install with
  ``pip install 'lightning-distill[bench]'``. Applied before compiling.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from lightning_distill.options import Performance

INSTALL = "pip install 'lightning-distill[bench]' (or pip install liger-kernel)"


def check(options: Performance, trains_teacher: bool) -> None:
    """Raise for settings that cannot apply here, before any model is loaded: a compiled teacher that is trained,
    Liger Kernel without CUDA or without its package."""
    if options.compile_teacher and trains_teacher:
        raise ValueError("performance.compile_teacher=True compiles a frozen teacher, but this method trains its "
                         "teacher: set compile_teacher=False (compile_student=True still compiles the student)")
    if options.liger_kernels and not torch.cuda.is_available():
        raise ValueError("performance.liger_kernels=True needs a CUDA device (Liger Kernel's kernels are Triton), and "
                         "none is available: set liger_kernels=False")
    if options.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(f"performance.liger_kernels=True needs the liger-kernel package: {INSTALL}; or set "
                          "liger_kernels=False")


def apply(options: Performance, student: nn.Module, teacher: nn.Module | None, records_layers: bool) -> None:
    """Patch and compile ``student`` and ``teacher`` as ``options`` ask, once (idempotent).

    Args:
        options: the method's performance options.
        student: the student model.
        teacher: the teacher model the run keeps, or ``None``.
        records_layers: the method records layers with hooks (the feature term), which a compiled graph may not call.
    """
    if options.compile_teacher and teacher is None:
        raise ValueError("performance.compile_teacher=True, but this run keeps no teacher in memory (stored labels, "
                         "or teacher=None): set compile_teacher=False")
    if (options.compile_student or options.compile_teacher) and records_layers:
        raise ValueError("performance.compile_student / compile_teacher compile the decoders whose layers the feature "
                         "term records with hooks, which a compiled graph may not call: set features=None, or "
                         "compile_student=False and compile_teacher=False")
    for role, model, compiled in (("student", student, options.compile_student),
                                  ("teacher", teacher, options.compile_teacher)):
        if model is None:
            continue
        if options.liger_kernels:
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
