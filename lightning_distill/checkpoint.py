"""What a checkpoint holds beyond the weights, so that it is self-contained: the student's config (and a trained
teacher's), the tokenizer's files, the method's name, the teacher signal's state, the random state and the W&B run.

:class:`~lightning_distill.modules.DistillModule` writes it in ``on_save_checkpoint`` under :data:`KEY`. Loading a
checkpoint (``SoftDistill.load_from_checkpoint``, ``lightning-distill export``, ``lightning-distill fit
--ckpt_path``) happens inside :func:`restoring`, which lets the module build its student from the stored config and
its tokenizer from the stored files: the teacher's folder is needed only to go on training a method that asks a
live teacher (then a missing one is an error that says where it looked and how to point at a new place).
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill.backbone import load_model

KEY = "lightning_distill"
FORMAT = 1
_RESTORING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("restoring", default=None)


# ------------------------------------------------------------------------------------------------ writing
def payload(module: Any) -> dict[str, Any]:
    """The self-contained part of a checkpoint of ``module`` (a configured DistillModule)."""
    return {
        "format": FORMAT,
        "class": type(module).__name__,
        "student_config": module.student.config.to_dict(),
        "teacher_config": module.teacher.config.to_dict() if module.trains_teacher else None,
        "tokenizer": tokenizer_files(module.tokenizer),
        "signal": module.signal.state_dict(),
        "rng": random_state(),
        "wandb_run_id": wandb_run_id(module),
    }


def write(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: a frozen teacher is reloaded from its name, so its weights are dropped; the method's
    name and :func:`payload` (model configs, tokenizer, signal state, random state, W&B run) are added."""
    checkpoint["lightning_distill_class"] = type(module).__name__
    checkpoint[KEY] = payload(module)
    if not module.trains_teacher:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]


def load(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: put the freshly reloaded frozen teacher's weights back in so that strict loading
    succeeds; restore the signal's state and (resuming a fit) the random state."""
    if not module.trains_teacher and module.teacher is not None and "state_dict" in checkpoint:  # FSDP took it
        state = checkpoint["state_dict"]
        for key, value in module.teacher.state_dict(prefix="teacher.").items():
            state.setdefault(key, value)
    stored = checkpoint.get(KEY, {})
    module.signal.load_state_dict(stored.get("signal", {}))
    if "rng" in stored and module._trainer is not None:
        set_random_state(stored["rng"])


def wandb_run_id(module: Any) -> str | None:
    """The id of the W&B run the module's trainer logs to, if any (a resumed fit continues that run)."""
    if module._trainer is None:
        return None
    from lightning.pytorch.loggers import WandbLogger

    return next((logger.version for logger in module.trainer.loggers if isinstance(logger, WandbLogger)), None)


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``tokenizer``, by name."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def random_state() -> dict[str, Any]:
    """The process's random generators (torch CPU and CUDA, Python, NumPy)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()  # plain types: weights_only loads them
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Restore :func:`random_state` (CUDA only where as many devices are visible)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------ reading
def read(path: str | Path, argument: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint written by a lightning_distill module, memory-mapped; a clear ``ValueError`` naming
    ``argument`` for a missing file, a folder, a file that is not a checkpoint, or a checkpoint of something else."""
    where = Path(str(path)).expanduser()
    if not where.exists():
        raise ValueError(f"{argument}={str(path)!r} does not exist: give the path of a .ckpt file written by "
                         "`lightning-distill fit` (e.g. runs/soft/checkpoints/last.ckpt)")
    if where.is_dir():
        raise ValueError(f"{argument}={str(path)!r} is a folder: give the path of a .ckpt file inside it")
    try:
        checkpoint = torch.load(where, map_location="cpu", weights_only=False, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise ValueError(f"{argument}={str(path)!r} is not a PyTorch checkpoint (torch.load: "
                         f"{str(error).splitlines()[0][:200]}): give a .ckpt file written by `lightning-distill "
                         "fit`") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{argument}={str(path)!r} is not a Lightning checkpoint (no state_dict in it)")
    if KEY not in checkpoint and "lightning_distill_class" not in checkpoint:
        raise ValueError(f"{str(path)!r} was not written by a lightning_distill module (no method name in it); "
                         "load it with the class that wrote it, e.g. SoftDistill.load_from_checkpoint(path)")
    return checkpoint


def method_name(checkpoint: dict[str, Any]) -> str | None:
    """The class that wrote ``checkpoint`` (``SoftDistill``, ...)."""
    return checkpoint.get(KEY, {}).get("class") or checkpoint.get("lightning_distill_class")


@contextlib.contextmanager
def restoring(checkpoint: dict[str, Any] | None) -> Iterator[None]:
    """Modules built inside take their tokenizer and model configs from ``checkpoint``'s payload (a checkpoint
    without one, e.g. of an older version, changes nothing)."""
    token = _RESTORING.set(checkpoint.get(KEY) if checkpoint else None)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restored() -> dict[str, Any] | None:
    """The payload of the checkpoint being loaded (inside :func:`restoring`), else ``None``."""
    return _RESTORING.get()


def tokenizer_from(stored: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer a payload holds, with a pad token as :func:`lightning_distill.backbone.load_tokenizer` sets."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in stored["tokenizer"].items():
            (Path(folder) / name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_models(module: Any) -> None:
    """``configure_model`` of a module built inside :func:`restoring`: the student (and a trained teacher) from
    the stored configs, their weights to come from the checkpoint's state dict; a frozen teacher by its name, and
    only for a method that asks it live. A missing teacher is an error when a trainer is attached (training,
    validating, labelling), else it is remembered (loading and exporting the student do not need it)."""
    stored = module._stored
    teacher = None
    if module.trains_teacher and stored.get("teacher_config"):
        teacher = model_from(stored["teacher_config"])
    elif module.needs_teacher():
        try:
            teacher = load_model(module.teacher_name, role="teacher")
        except ValueError as error:
            module.teacher_missing = missing_teacher(module, error)
            if module._trainer is not None:
                raise ValueError(module.teacher_missing) from None
    module.keep_models(model_from(stored["student_config"]), teacher)


def missing_teacher(module: Any, error: Exception) -> str:
    """The error of a method that asks a live teacher whose folder is gone: where it looked, how to point anew."""
    name = type(module).__name__
    return (f"{error}. {name} asks its teacher live, so going on with this checkpoint needs it: point at the "
            f"teacher's new place with --model.init_args.teacher NEW_PATH, or {name}.load_from_checkpoint(path, "
            "teacher=NEW_PATH); exporting the student does not need it (lightning-distill export --ckpt PATH "
            "--out DIR)")


def model_from(config: dict[str, Any]) -> PreTrainedModel:
    """A float32 model of a stored config, its weights to be loaded from the checkpoint's state dict."""
    fields = dict(config)
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).train()
