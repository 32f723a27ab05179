"""What a checkpoint holds beyond the weights, so that it is self-contained: the student's config (and a trained
teacher's), the tokenizer's files, the method's name, the teacher signal's state, the random state, the token
window's scale and the W&B run.

:class:`~lightning_distill.modules.DistillModule` writes it in ``on_save_checkpoint`` under :data:`KEY`. Loading a
checkpoint (``SoftDistill.load_from_checkpoint``, ``lightning-distill export``, ``lightning-distill fit
--ckpt_path``) happens inside :func:`restoring`, which lets the module build its student from the stored config and
its tokenizer from the stored files: the teacher's folder is needed only to go on training a method that asks a
live teacher (then a missing one is an error that says where it looked and how to point at a new place).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lightning_distill.backbone import load_tokenizer

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
        "token_scale": module.tokens.scale,  # TokenWindow's: a resumed run scales as the uninterrupted one
    }


def write(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: a frozen teacher is reloaded from its name, so its weights are dropped; the method's
    name and :func:`payload` (model configs, tokenizer, signal state, random state, W&B run) are added; the option
    groups among the hyperparameters are kept as plain dicts (:func:`option_groups` rebuilds them): a strategy that
    maps over the whole checkpoint on loading (FSDP) cannot rebuild a frozen dataclass."""
    checkpoint["lightning_distill_class"] = type(module).__name__
    checkpoint[KEY] = payload(module)
    hparams = checkpoint.get("hyper_parameters") or {}  # a copy of the module's hparams
    groups = {name: type(value).__name__ for name, value in hparams.items() if dataclasses.is_dataclass(value)}
    for name in groups:
        hparams[name] = dataclasses.asdict(hparams[name])
    checkpoint[KEY]["option_groups"] = groups
    if not module.trains_teacher:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("teacher.", "other_teachers."))]:
            del state[key]


def load(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: put the freshly reloaded frozen teacher's weights back in so that strict loading
    succeeds; restore the signal's state and (resuming a fit) the random state. A checkpoint of another method or
    of a student of another depth or width is refused, naming what differs (strict loading would fail later, or
    worse, not at all)."""
    method, config = method_name(checkpoint), checkpoint.get(KEY, {}).get("student_config") or {}
    if method and method != type(module).__name__:
        raise ValueError(f"this checkpoint was written by {method}, not {type(module).__name__}: load it with "
                         f"{method}.load_from_checkpoint, or resume with the method that wrote it")
    student = getattr(module, "student", None)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        have = getattr(getattr(student, "config", None), key, None)
        if have is not None and key in config and config[key] != have:
            raise ValueError(f"this checkpoint's student has {key}={config[key]}, the model being restored "
                             f"{key}={have}: give the student the checkpoint was trained with")
    if not module.trains_teacher and module.teacher is not None and "state_dict" in checkpoint:  # FSDP took it
        state = checkpoint["state_dict"]
        for key, value in module.teacher.state_dict(prefix="teacher.").items():
            state.setdefault(key, value)
        for key, value in module.other_teachers.state_dict(prefix="other_teachers.").items():
            state.setdefault(key, value)
    stored = checkpoint.get(KEY, {})
    module.signal.load_state_dict(stored.get("signal", {}))
    if "rng" in stored and module._trainer is not None:
        set_random_state(stored["rng"])
    if stored.get("token_scale") is not None and module._trainer is not None:
        module.tokens.scale = float(stored["token_scale"])


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


def step(path: str | Path) -> int:
    """The ``global_step`` a checkpoint file was written at (-1 when it cannot be read): memory-mapped, so only the
    small part of the file that holds it is read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))
    except Exception:  # a file being written, truncated or of another kind never wins "last"
        return -1


def mismatch(checkpoint: dict[str, Any], class_path: str | None, student: Any) -> str | None:
    """Why a run configured with method ``class_path`` and ``student`` (the ``student`` argument as given) cannot go
    on from ``checkpoint`` (another method, or a student of another shape), naming the setting; ``None`` when it
    can. Any other setting given now overrides the checkpoint's."""
    stored = checkpoint.get(KEY, {})
    method, wanted = method_name(checkpoint), str(class_path or "").rsplit(".", 1)[-1]
    if method and wanted and method != wanted:
        return (f"it was written by {method}, and this run's model.class_path is {class_path!r}: a run goes on "
                f"with the method that started it (model.class_path: lightning_distill.{method}); to train "
                f"{wanted} from its student, export it (lightning-distill export) and name the folder as student")
    config = stored.get("student_config") or {}
    if not config:
        return None
    spec = student if student is not None else {"from_teacher": {"layers": 6}}
    expected: dict[str, Any] = {}
    if isinstance(spec, dict) and isinstance(spec.get("from_teacher"), dict):
        layers = spec["from_teacher"].get("layers", 6)
        expected["num_hidden_layers"] = len(layers) if isinstance(layers, (list, tuple)) else layers
    elif isinstance(spec, dict) and isinstance(spec.get("config"), dict):
        expected = {k: v for k, v in spec["config"].items() if k in config}
    for key, value in expected.items():
        if config.get(key) != value:
            return (f"its student has {key}={config.get(key)!r}, this run's student={spec!r} gives {value!r}: a run "
                    "goes on with the student it started with (give the same student, or start a new run without "
                    "--ckpt_path)")
    return None


def option_groups(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The option groups (:mod:`lightning_distill.options`) among ``checkpoint``'s hyperparameters, rebuilt from the
    dicts :func:`write` kept, by argument name."""
    from lightning_distill import options

    hparams = checkpoint.get("hyper_parameters") or {}
    groups = checkpoint.get(KEY, {}).get("option_groups", {})
    return {name: getattr(options, kind)(**hparams[name]) for name, kind in groups.items()
            if isinstance(hparams.get(name), dict)}


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
    """The tokenizer a payload holds, loaded as every tokenizer is (:func:`lightning_distill.backbone.load_tokenizer`:
    with a pad token)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in stored["tokenizer"].items():
            (Path(folder) / name).write_bytes(data)
        return load_tokenizer(folder, "checkpoint tokenizer")
