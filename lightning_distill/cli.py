"""The ``lightning-distill`` command.

``fit | validate | test | predict`` go through :class:`DistillCLI`, a ``LightningCLI`` in subclass mode over
:class:`~lightning_distill.modules.DistillModule`, so a YAML picks the method with
``model: {class_path: lightning_distill.SoftDistill, init_args: {...}}``. More commands:

- ``lightning-distill export --ckpt PATH --out DIR``: the student of a checkpoint as a Hugging Face folder;
- ``lightning-distill demo``: the main job (see :mod:`lightning_distill.demo`);
- ``lightning-distill prepare --corpus SOURCES --out DIR --tokenizer NAME``: a corpus tokenized once for streaming
  (:func:`lightning_distill.data.prepare_corpus`).
- ``lightning-distill serve --teacher NAME [--port 8000]``: a teacher behind an HTTP server
  (:mod:`lightning_distill.serve.command`).

On CPU the commands keep freed memory for reuse (:class:`~lightning_distill.callbacks.ReuseFreedMemory`: they own
their process). ``fit --ckpt_path PATH|last`` resumes exactly (the model is built from the checkpoint, its W&B run
continues); a bad argument or input is one message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_distill.callbacks import OfflineFirstWandbLogger, ReuseFreedMemory
from lightning_distill.data import DistillDataModule
from lightning_distill.modules import DistillModule, checkpoint

EPILOG = """more commands:
  export              lightning-distill export --ckpt PATH --out DIR: a checkpoint's student as a Hugging Face folder
  demo                lightning-distill demo [--steps N ...]: distil the embedded teacher and print what it achieved
  prepare             lightning-distill prepare --corpus SOURCES --out DIR --tokenizer NAME: tokenize a corpus once
                      into chunks that DistillDataModule(corpus=DIR) streams (needs lightning-distill[scale])
  serve               lightning-distill serve --teacher NAME [--port 8000]: a teacher behind an HTTP server, for
                      SoftDistill(teacher="http://HOST:PORT") (needs lightning-distill[serve])
"""


class DistillCLI(LightningCLI):
    """LightningCLI over every :class:`DistillModule` subclass and :class:`DistillDataModule`."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter})
        super().__init__(DistillModule, DistillDataModule, subclass_mode_model=True, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Nothing: the configuration given (YAML and command line) is the run's. Lightning would merge a checkpoint
        file's saved hyperparameters over it (the modules save typed values, not the CLI's dicts), which also made
        ``--ckpt_path FILE`` ignore overrides that ``--ckpt_path last`` applies."""

    def instantiate_classes(self) -> None:
        """With ``--ckpt_path``, build the model from the checkpoint (its student config and tokenizer: the
        teacher's folder is needed only by a method that asks it live) and continue its W&B run."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        path = config.get("ckpt_path") if config is not None else None
        if path == "last":
            path = last_checkpoint(config)
        stored = None
        if path and path not in ("best", "hpc", "registry") and "://" not in str(path):
            stored = checkpoint.read(path, "--ckpt_path")
        with checkpoint.restoring(stored):
            super().instantiate_classes()
        if not any(isinstance(c, ReuseFreedMemory) for c in self.trainer.callbacks):  # the CLI owns the process
            self.trainer.callbacks.append(ReuseFreedMemory())
        run_id = (stored or {}).get(checkpoint.KEY, {}).get("wandb_run_id")
        for logger in self.trainer.loggers if run_id else []:
            if isinstance(logger, OfflineFirstWandbLogger) and not logger._wandb_init.get("id"):
                logger.continue_run(run_id)


def last_checkpoint(config: Any) -> str | None:
    """What ``--ckpt_path last`` will load: the newest ``last*.ckpt`` in the folders of the config's
    ``ModelCheckpoint`` callbacks (or ``<default_root_dir>/checkpoints``); ``None`` when there is none."""
    trainer = config.get("trainer") or {}
    folders = [Path(trainer.get("default_root_dir") or ".") / "checkpoints"]
    for callback in trainer.get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            folders += [Path(str(dirpath))] if dirpath else []
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def export(argv: list[str]) -> str:
    """``lightning-distill export --ckpt PATH --out DIR``: write the checkpoint's student as a Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="lightning-distill export", description=export.__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `lightning-distill fit`")
    parser.add_argument("--out", required=True, help="folder to write the student and tokenizer to")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.ckpt)
    path = model.export(args.out)
    print(f"exported the student to {path} (load it with AutoModelForCausalLM.from_pretrained)")
    return path


def load_checkpoint(path: str) -> DistillModule:
    """Load a checkpoint of any method: the class is read from the checkpoint; the teacher's folder is not needed
    (:mod:`lightning_distill.modules.checkpoint`). A missing file, or one that is not a lightning_distill checkpoint,
    is a ``ValueError`` that says so."""
    from lightning_distill import modules

    name = checkpoint.method_name(checkpoint.read(path, "--ckpt"))
    if name not in modules.__all__:
        raise ValueError(f"{path} was not written by a lightning_distill module (no method name in it); load it "
                         "with the class that wrote it, e.g. SoftDistill.load_from_checkpoint(path)")
    return getattr(modules, name).load_from_checkpoint(path, map_location="cpu")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-distill`` and ``python -m lightning_distill``. A bad argument or input (a
    ``ValueError``, a file that is missing or in the way, a teacher server gone for good) is shown as one message,
    without the traceback
    (``LIGHTNING_DISTILL_TRACEBACK=1`` shows it); the exit status is then 2."""
    try:
        run(sys.argv[1:] if argv is None else list(argv), argv is None)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ConnectionError) as error:
        if os.environ.get("LIGHTNING_DISTILL_TRACEBACK"):
            raise
        print(f"lightning-distill: error: {user_error(error)}\n(LIGHTNING_DISTILL_TRACEBACK=1 shows where it was "
              "raised)", file=sys.stderr)
        sys.exit(2)


def user_error(error: BaseException) -> BaseException:
    """The error to show: jsonargparse wraps an error raised while building a class in its own summary of every
    type it tried; the error it wraps is the one that says what to change."""
    while str(error).startswith(JSONARGPARSE_WRAPPERS) and isinstance(error.__cause__ or error.__context__,
                                                                        ValueError):
        error = error.__cause__ or error.__context__
    return error


JSONARGPARSE_WRAPPERS = ("Does not validate against any of the", "Problem with given class_path")


def run(words: list[str], from_sys_argv: bool = False) -> None:
    """Dispatch ``words`` (the arguments after ``lightning-distill``) to a command."""
    if words and words[0] == "export":
        export(words[1:])
    elif words and words[0] == "prepare":
        from lightning_distill.data.prepare import main as prepare_main

        prepare_main(words[1:])
    elif words and words[0] == "demo":
        from lightning_distill.demo import main as demo_main

        demo_main(words[1:])
    elif words and words[0] == "serve":
        from lightning_distill.serve.command import main as serve_main

        serve_main(words[1:])
    else:
        DistillCLI(args=None if from_sys_argv else words)  # None: LightningCLI reads sys.argv itself
