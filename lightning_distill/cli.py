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
- ``lightning-distill write --documents N --out FILE.jsonl [--teacher NAME]``: a corpus the teacher writes itself,
  requests and answers (:mod:`lightning_distill.data.writing`).

On CPU the commands keep freed memory for reuse (:class:`~lightning_distill.callbacks.ReuseFreedMemory`: they own
their process). ``fit --ckpt_path PATH|last`` resumes exactly (the model is built from the checkpoint, its W&B run
continues); what the YAML and the command line say wins over what the checkpoint saved, and a checkpoint of another
method or student shape is refused before any work. ``last`` is the ``last*.ckpt`` of the latest step. A ``fit``
without ``--ckpt_path`` in a folder that holds an earlier run's checkpoints is refused (it would overwrite them).

Exit status: 0 done; 1 interrupted by Ctrl+C or failed; 2 a bad argument or input (one message on stderr, without a
traceback; a non-finite loss too); 143 (128 + SIGTERM, what schedulers expect of a pre-empted job) stopped by
SIGTERM, after saving like Ctrl+C.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_distill import checks
from lightning_distill.callbacks import OfflineFirstWandbLogger, ReuseFreedMemory
from lightning_distill.data import DistillDataModule
from lightning_distill.modules import DistillModule, checkpoint

EPILOG = """more commands:
  export              lightning-distill export --ckpt PATH --out DIR: a checkpoint's student as a Hugging Face folder
  demo                lightning-distill demo [--steps N ...]: distil the embedded teacher and print what it achieved
  prepare             lightning-distill prepare --corpus SOURCES --out DIR --tokenizer NAME: tokenize a corpus once
                      into chunks that DistillDataModule(corpus=DIR) streams (needs lightning-distill[scale])
  write               lightning-distill write --documents N --out FILE.jsonl [--teacher NAME]: a corpus of text the
                      teacher writes itself (requests and answers), to mix into training
  serve               lightning-distill serve --teacher NAME [--port 8000]: a teacher behind an HTTP server, for
                      SoftDistill(teacher="http://HOST:PORT") (needs lightning-distill[serve])
"""


class DistillCLI(LightningCLI):
    """LightningCLI over every :class:`DistillModule` subclass and :class:`DistillDataModule`."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # exit_on_error=False: a bad argument is one message (parse_arguments), not a usage dump; allow_abbrev=False:
        # a mistyped option (--trainer.max_step) is an error, not a silent prefix match
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter,
                                            "exit_on_error": False, "allow_abbrev": False})
        super().__init__(DistillModule, DistillDataModule, subclass_mode_model=True, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's parsing, with a parse error as one ``ValueError`` naming the option, the value and what it
        takes (:func:`parse_error`); values given by dotted keys inside a dict argument (``--model.init_args.
        student.from_teacher.layers 3``) are read as YAML, as they would be in a file."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            raise ValueError(parse_error(str(error), option_names(parser))) from None
        read_dotted_values(self.config, args if args is not None else sys.argv[1:])

    def _parse_ckpt_path(self) -> None:
        """Nothing: the configuration given (YAML and command line) is the run's. Lightning would merge a checkpoint
        file's saved hyperparameters over it (the modules save typed values, not the CLI's dicts), which also made
        ``--ckpt_path FILE`` ignore overrides that ``--ckpt_path last`` applies."""

    def instantiate_classes(self) -> None:
        """With ``--ckpt_path``, build the model from the checkpoint (its student config and tokenizer: the
        teacher's folder is needed only by a method that asks it live) and continue its W&B run."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        path = config.get("ckpt_path") if config is not None else None
        check_trainer(config.get("trainer") or {}, self.subcommand)
        if self.subcommand == "predict":
            check_predict(config.get("trainer") or {})
        if path == "last":
            path = last_checkpoint(config)
            if path is not None:
                config["ckpt_path"] = path  # the latest step's, which Lightning (the newest file) might not pick
        elif path is None and self.subcommand == "fit":
            refuse_used_folder(config)
        stored = None
        if path and path not in ("best", "hpc", "registry") and "://" not in str(path):
            stored = checkpoint.read(path, "--ckpt_path")
            problem = checkpoint.mismatch(stored, (config.get("model") or {}).get("class_path"),
                                          ((config.get("model") or {}).get("init_args") or {}).get("student"))
            if problem:
                raise ValueError(f"--ckpt_path={path!r}: {problem}")
        with checkpoint.restoring(stored):
            super().instantiate_classes()
        if not any(isinstance(c, ReuseFreedMemory) for c in self.trainer.callbacks):  # the CLI owns the process
            self.trainer.callbacks.append(ReuseFreedMemory())
        run_id = (stored or {}).get(checkpoint.KEY, {}).get("wandb_run_id")
        for logger in self.trainer.loggers if run_id else []:
            if isinstance(logger, OfflineFirstWandbLogger) and not logger._wandb_init.get("id"):
                logger.continue_run(run_id)


def checkpoint_folders(config: Any) -> list[Path]:
    """The folders the config's ``ModelCheckpoint`` callbacks write to (and ``<default_root_dir>/checkpoints``)."""
    trainer = config.get("trainer") or {}
    folders = [Path(trainer.get("default_root_dir") or ".") / "checkpoints"]
    for callback in trainer.get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            folders += [Path(str(dirpath))] if dirpath else []
    return folders


def last_checkpoint(config: Any) -> str | None:
    """What ``--ckpt_path last`` loads: of the ``last*.ckpt`` in :func:`checkpoint_folders`, the one of the latest
    step (``last-v1.ckpt`` of a rerun that started over must not win over the step-60 ``last.ckpt`` because it is
    newer), the newest of those on a tie; ``None`` when there is none."""
    found = [p for folder in checkpoint_folders(config) if folder.is_dir() for p in folder.glob("last*.ckpt")]
    return str(max(found, key=lambda p: (checkpoint.step(p), p.stat().st_mtime))) if found else None


def refuse_used_folder(config: Any) -> None:
    """A ``fit`` without ``--ckpt_path`` whose ``ModelCheckpoint`` folder already holds checkpoints, or whose
    ``ExportStudent`` folder a student, would overwrite an earlier run's results: refused, with the two ways on."""
    folders = checkpoint_folders(config)[1:]  # the config's own ModelCheckpoint folders
    used = sorted(str(p) for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt"))
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if str(callback.get("class_path", "")).endswith("ExportStudent") and dirpath and Path(dirpath).is_dir():
            used += [str(Path(dirpath))] if any(Path(dirpath).iterdir()) else []
    if used:
        last = last_checkpoint(config)
        at = f" (the latest: {last}, step {checkpoint.step(last)})" if last else ""
        raise ValueError(f"this fit would overwrite an earlier run's results: {', '.join(used[:3])}"
                         f"{' ...' if len(used) > 3 else ''}{at}. Go on with that run with --ckpt_path last, or start "
                         "anew elsewhere (another --trainer.default_root_dir and checkpoint dirpath), or delete them")


def check_trainer(trainer: Any, subcommand: str | None) -> None:
    """Trainer settings that Lightning accepts silently or answers with a traceback, refused in one message."""
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and subcommand == "fit":
        checks.integer("--trainer.max_steps", steps, ">= 1, or -1 for no limit (then max_epochs ends the run)",
                       lambda v: v >= 1 or v == -1, "100")
    devices = trainer.get("devices")
    if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        checks.integer("--trainer.devices", int(devices), ">= 1, or -1 for every device", lambda v: v >= 1 or v == -1,
                       "1")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None:
        checks.integer("--trainer.accumulate_grad_batches", accumulate, ">= 1", lambda v: v >= 1, "1")


def check_predict(trainer: Any) -> None:
    """``predict`` keeps nothing by itself (predictions of a whole corpus would not fit in memory): without a
    ``LabelWriter`` it would run and write nothing."""
    names = [str(c.get("class_path", "")) if hasattr(c, "get") else type(c).__name__
             for c in trainer.get("callbacks") or []]
    if not any(name.endswith("LabelWriter") for name in names):
        raise ValueError("predict labels a corpus into a label store through a LabelWriter callback, and this config "
                         "has none (it would run and write nothing): use configs/label_soft.yaml, or add "
                         "--trainer.callbacks+=lightning_distill.store.LabelWriter --trainer.callbacks.path STORE")


def option_names(parser: Any) -> list[str]:
    """Every option string of ``parser`` and its subcommands' parsers (for suggestions)."""
    names = list(getattr(parser, "_option_string_actions", {}))
    action = getattr(parser, "_subcommands_action", None)
    for sub in (getattr(action, "_name_parser_map", {}) or {}).values():
        names += list(getattr(sub, "_option_string_actions", {}))
    return names


def parse_error(text: str, options: list[str]) -> str:
    """jsonargparse's nested report of a value no type accepted, as one line: the option as the user writes it,
    the value, and what it takes; an unknown option with the closest known one."""
    unknown = re.match(r"unrecognized arguments: (.*)", text.strip())
    if unknown:
        words = [w for w in unknown.group(1).split() if w.startswith("--")]
        hints = [f"{w} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(w.split("=")[0], options, 1))
                 else w for w in words]
        return f"unknown option(s): {', '.join(hints) or unknown.group(1)}: options are matched exactly"
    path: list[tuple[int, str]] = []
    leaf_path, expected, given = "", [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        key = re.match(r'\s*(?:- )?Parser key "([^"]+)":', line)
        if key:
            path = [(i, k) for i, k in path if i < indent] + [(indent, key.group(1))]
            continue
        found = re.match(r"\s*(?:- )?Expected a (.*)", line)
        if found and "NoneType" not in found.group(1) and not found.group(1).startswith("path but"):
            keys = ".".join(k for _, k in path)  # the deepest key that refused the value
            leaf_path = keys if len(keys) >= len(leaf_path) else leaf_path
            expected.append(describe_expected(found.group(1)))
        value = re.match(r"\s*Given value: (.*)", line)
        if value and given is None:
            given = value.group(1)
        got = re.search(r"Got value: (.*)", line)
        if got:
            given = got.group(1)
    if not leaf_path:
        return text.strip().splitlines()[0]
    keys = leaf_path.split(".")
    if keys[0] == "model" and len(keys) > 1 and keys[1] != "init_args":
        keys.insert(1, "init_args")
    wanted = " or ".join(dict.fromkeys(e for e in expected if e))
    return f"--{'.'.join(keys)} must be {wanted}, got {given!r}"


def describe_expected(text: str) -> str:
    """One of jsonargparse's ``Expected a ...`` phrases in words."""
    choices = re.match(r"typing.Literal\[(.*)\]", text)
    if choices:
        return f"one of {choices.group(1)}"
    if text.startswith("dot import path string"):
        return "a class path (e.g. lightning_distill.losses.GeneralizedJSD)"
    kind = re.match(r"<class '(\w+)'>", text)
    names = {"float": "a finite number", "int": "an integer", "bool": "true or false", "str": "a string"}
    if kind:
        return names.get(kind.group(1), kind.group(1))
    return text.split(". Got value")[0]


def read_dotted_values(config: Any, args: list[str]) -> None:
    """A value set by a dotted key inside a dict-typed argument (``--model.init_args.student.from_teacher.layers
    3``) reaches the dict as the string ``'3'``; read it as YAML, as a config file's value is."""
    words = [str(a) for a in args or []]
    for i, word in enumerate(words[:-1]):
        match = re.match(r"--model\.init_args\.(student|teacher)\.(.+)", word)
        if not match:
            continue
        subcommand = config.get("subcommand")
        for node in [config, config.get(subcommand) if subcommand else None]:
            init = ((node.get("model") if hasattr(node, "get") else None) or {}).get("init_args") or {}
            target, keys = init.get(match.group(1)), match.group(2).split(".")
            for key in keys[:-1]:
                target = target.get(key) if isinstance(target, dict) else None
            if isinstance(target, dict) and isinstance(target.get(keys[-1]), str):
                target[keys[-1]] = yaml.safe_load(words[i + 1])


def export(argv: list[str]) -> str:
    """``lightning-distill export --ckpt PATH --out DIR``: write the checkpoint's student as a Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="lightning-distill export", description=export.__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `lightning-distill fit`")
    parser.add_argument("--out", required=True, help="folder to write the student and tokenizer to (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ValueError(f"--out={args.out!r} already holds files ({held}, ...): export into a new or empty folder, "
                         "or pass --overwrite to replace what is there")
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
    except SIGTERMException:  # Lightning stopped after the step under way; the callbacks saved as on Ctrl+C
        print("lightning-distill: stopped by SIGTERM (pre-empted) after saving what the config saves on an "
              f"interrupt; exit status {SIGTERM_EXIT} (go on with --ckpt_path last)", file=sys.stderr)
        sys.exit(SIGTERM_EXIT)
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
#: the exit status of a run stopped by SIGTERM: 128 + 15, as a shell reports a process the signal ended
SIGTERM_EXIT = 143


def run(words: list[str], from_sys_argv: bool = False) -> None:
    """Dispatch ``words`` (the arguments after ``lightning-distill``) to a command."""
    if words and words[0] == "export":
        export(words[1:])
    elif words and words[0] == "prepare":
        from lightning_distill.data.prepare import main as prepare_main

        prepare_main(words[1:])
    elif words and words[0] == "write":
        from lightning_distill.data.writing import main as write_main

        write_main(words[1:])
    elif words and words[0] == "demo":
        from lightning_distill.demo import main as demo_main

        demo_main(words[1:])
    elif words and words[0] == "serve":
        from lightning_distill.serve.command import main as serve_main

        serve_main(words[1:])
    else:
        DistillCLI(args=None if from_sys_argv else words)  # None: LightningCLI reads sys.argv itself
