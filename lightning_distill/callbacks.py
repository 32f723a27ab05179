"""The callbacks and the logger of a run.

Every method adds two to its Trainer itself (:meth:`~lightning_distill.modules.DistillModule.configure_callbacks`):
:class:`Throughput` (tokens per second, and on-policy sampling speed) and :class:`IdleTeacherOffload` (a teacher no
training step asks leaves the accelerator). :class:`ReuseFreedMemory` changes the process's memory allocator on CPU
(measured faster), so it is opt-in: the ``lightning-distill`` CLI and the demo, which own their process, apply it;
add it to your own Trainer to have it.

The YAML recipes add the rest: W&B that never waits for a network, the resolved CLI config as hyperparameters,
sample tables (prompt, teacher, student), graceful interrupts and the exported student as an artifact.

W&B online or offline is decided once, when :class:`OfflineFirstWandbLogger` is built (:func:`wandb_mode`):
``WANDB_MODE`` wins when set; otherwise the run goes online only when credentials exist (``WANDB_API_KEY``,
``WANDB_IDENTITY_TOKEN_FILE`` or a ``.netrc`` entry for the W&B host, which ``wandb login`` writes), and offline
otherwise, so that a machine without an account or a network never blocks on a login prompt or a connection.
Offline runs are uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``. A run resumed from a checkpoint
continues the same W&B run (:meth:`OfflineFirstWandbLogger.continue_run`; the CLI does it for ``--ckpt_path``).

Interrupts: :class:`GracefulInterrupt` makes Ctrl+C finish the step under way and stop as an interrupt, so that
``ModelCheckpoint(save_on_exception=True)`` writes a consistent checkpoint (and ``last.ckpt``) and
:class:`ExportStudent` a partial student (a ``PARTIAL`` file beside it says so).

The labelling callback of ``lightning-distill predict`` is :class:`lightning_distill.store.LabelWriter`.
"""

from __future__ import annotations

import ctypes
import json
import netrc
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_distill import checks, sharding

#: prompts of :class:`SampleTable` when none are given: the built-in corpus (Python docs) and out of domain
DEFAULT_PROMPTS = (
    "The for statement in Python",
    "A dictionary is",
    "def fibonacci(n):",
    "To be, or not to be,",
)
WANDB_HOST = "https://api.wandb.ai"


# ------------------------------------------------------------------------------------------------- W&B logger
def has_wandb_credentials() -> bool:
    """Whether ``wandb`` would find credentials: ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` set, or a
    ``.netrc`` (``$NETRC``, else ``~/.netrc`` / ``~/_netrc``) entry with a password for the host of
    ``WANDB_BASE_URL`` (default ``api.wandb.ai``). Reads files only; never touches the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_HOST).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return False
        return bool(entry and entry[2])
    return False


def wandb_mode(offline: bool | None = None) -> str | None:
    """The ``mode`` to pass to ``wandb.init``.

    Args:
        offline: ``True`` -> ``"offline"``; ``False`` -> ``"online"``; ``None`` -> decided here: ``None`` (let
            ``wandb`` read ``WANDB_MODE``) when ``WANDB_MODE`` is set, else ``"online"`` when
            :func:`has_wandb_credentials`, else ``"offline"``.
    """
    if offline is not None:
        checks.require(isinstance(offline, bool), "offline", offline, "True, False or None (decide from the "
                       "environment)")
        return "offline" if offline else "online"
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if has_wandb_credentials() else "offline"


class OfflineFirstWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that goes offline unless W&B credentials exist (see :func:`wandb_mode`).

    Args:
        project: W&B project.
        save_dir: folder that receives ``wandb/`` (``offline-run-*`` or ``run-*`` folders); created if missing.
        offline: ``None`` (default): offline unless ``WANDB_MODE`` says otherwise or credentials exist; ``True``
            or ``False`` force the mode.
        log_model: log ``ModelCheckpoint`` checkpoints as artifacts (``True``: at the end, ``"all"``: as they are
            written). Ignored, with a warning, offline: Lightning uploads checkpoints only online.
        **kwargs: the other arguments of ``WandbLogger`` and ``wandb.init`` (``name``, ``entity``, ``tags``, ...).
    """

    def __init__(
        self,
        project: str = "lightning-distill",
        save_dir: str = ".",
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        **kwargs: Any,
    ) -> None:
        checks.require(bool(project), "project", project, "a non-empty W&B project name",
                       "e.g. project='lightning-distill'")
        mode = kwargs.pop("mode", None) or wandb_mode(offline)
        if mode in ("offline", "dryrun", "disabled") and log_model:
            rank_zero_warn(f"OfflineFirstWandbLogger: W&B is {mode}, so log_model={log_model!r} is ignored "
                           "(checkpoints are uploaded only online; set WANDB_API_KEY or run `wandb login`)")
            log_model = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp when the folder is missing
        super().__init__(project=project, save_dir=save_dir, offline=False, log_model=log_model,
                         **({"mode": mode} if mode else {}), **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns about the key even when it is None
            self._wandb_init.pop("anonymous", None)
        self.mode = mode or os.environ.get("WANDB_MODE", "online")
        if self.mode in ("offline", "dryrun"):
            why = ("offline=True" if offline else "WANDB_MODE" if os.environ.get("WANDB_MODE") else
                   "no W&B credentials: set WANDB_API_KEY or run `wandb login` to log online")
            rank_zero_info(f"W&B is offline ({why}); the run is written under {Path(save_dir) / 'wandb'}: upload "
                           f"it later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`")

    def continue_run(self, run_id: str) -> None:
        """Log into the W&B run ``run_id`` (``resume="allow"``) instead of a new one: a resumed fit's history
        continues the interrupted run's. Call it before the run starts (before ``fit``)."""
        if self._experiment is not None:
            raise ValueError("continue_run must be called before the W&B run starts (before trainer.fit)")
        checks.require(isinstance(run_id, str) and bool(run_id), "run_id", run_id, "a W&B run id")
        self._wandb_init.update(id=run_id, resume="allow")
        self._id = run_id
        rank_zero_info(f"W&B: continuing run {run_id}")


def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The trainer's first W&B logger, or ``None``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


# ---------------------------------------------------------------------------------------------- config
class LogConfig(L.Callback):
    """Log the resolved ``lightning-distill`` (LightningCLI) config to every logger as the hyperparameter ``config``.

    Lightning logs the module's and the data module's ``save_hyperparameters()`` on its own; this adds the rest
    of the run's config (trainer, seed, callbacks, logger), as the CLI resolved it. Does nothing outside the CLI.
    """

    def __init__(self) -> None:
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._done or not trainer.loggers:
            return
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
        if saver is None:
            rank_zero_info("LogConfig: not run by the CLI (no config to log); hyperparameters are logged as usual")
            return
        import yaml

        config = yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": config})
        self._done = True


# ---------------------------------------------------------------------------------------------- samples
class SampleTable(L.Callback):
    """Every N validations, a W&B table ``samples`` of (step, prompt, teacher continuation, student continuation).

    Continuations are greedy, from ``pl_module.generate``. A frozen teacher's are generated once and reused;
    a trained teacher's (CoDistill) are regenerated. Every rank generates (sharded models need all of them) and
    rank zero logs. Without a W&B logger the callback does nothing.

    Args:
        every_n_validations: log after every N-th validation run (sanity checks not counted); >= 1.
        prompts: the prompts; default :data:`DEFAULT_PROMPTS`.
        max_new_tokens: tokens generated per continuation; >= 1.
        key: name of the table in W&B.
    """

    def __init__(self, every_n_validations: int = 1, prompts: list[str] | None = None, max_new_tokens: int = 32,
                 key: str = "samples") -> None:
        checks.integer("every_n_validations", every_n_validations, ">= 1", lambda v: v >= 1, "1")
        checks.require(prompts is None or (bool(prompts) and all(isinstance(p, str) and p for p in prompts)),
                       "prompts", prompts, "None (the built-in prompts) or a non-empty list of non-empty strings")
        checks.integer("max_new_tokens", max_new_tokens, ">= 1", lambda v: v >= 1, "32")
        checks.require(bool(key), "key", key, "a non-empty W&B key", "e.g. key='samples'")
        self.every_n_validations = every_n_validations
        self.prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        self.max_new_tokens = max_new_tokens
        self.key = key
        self.validations = 0
        self._teacher_cache: list[str] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if wandb_logger(trainer) is None:
            rank_zero_info("SampleTable: no W&B logger attached; no sample tables are generated")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        logger = wandb_logger(trainer)
        if logger is None or self.validations % self.every_n_validations:
            return
        rows = self.rows(pl_module)
        if trainer.is_global_zero:  # no step: W&B's step_sync puts it at the x of this validation's metrics
            logger.log_table(self.key, columns=["step", "prompt", "teacher", "student"],
                             data=[[trainer.global_step, *row] for row in rows])

    def rows(self, pl_module: L.LightningModule) -> list[list[str | None]]:
        """``[prompt, teacher continuation (None without a live teacher), student continuation]`` per prompt."""
        student = pl_module.generate(self.prompts, model="student", max_new_tokens=self.max_new_tokens)
        teacher: list[str | None] = [None] * len(self.prompts)
        if getattr(pl_module, "teacher", None) is not None:
            if self._teacher_cache is None or getattr(pl_module, "trains_teacher", False):
                self._teacher_cache = pl_module.generate(self.prompts, model="teacher",
                                                         max_new_tokens=self.max_new_tokens)
            teacher = list(self._teacher_cache)
        return [[p, t, s] for p, t, s in zip(self.prompts, teacher, student, strict=True)]


# ------------------------------------------------------------------------------------------- interrupts
class GracefulInterrupt(L.Callback):
    """Ctrl+C (SIGINT) during ``fit`` finishes the optimizer step under way, then stops the run as an interrupt:
    Lightning calls every callback's ``on_exception`` (``ModelCheckpoint(save_on_exception=True)`` writes a
    checkpoint and ``last.ckpt`` there, :class:`ExportStudent` a partial student) and exits with status 1. The
    checkpoint is taken between steps, so a run resumed from it goes on exactly. A second Ctrl+C stops at once.
    Under DDP the ranks agree on the step to stop after."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self.requested, self._previous = False, signal.signal(signal.SIGINT, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl+C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl+C: stopping after this step, with a checkpoint (Ctrl+C again stops at once)", flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:  # inside a gradient-accumulation window: no step finished
            return
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._restore()
            raise KeyboardInterrupt(f"interrupted after step {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None


# ----------------------------------------------------------------------------------------------- export
#: the file beside an exported student that says it is not the end of training (an interrupt or error stopped it)
PARTIAL = "PARTIAL"


class ExportStudent(L.Callback):
    """At the end of ``fit``, export the student as a Hugging Face folder (``pl_module.export``) and, opt-in, log
    that folder to W&B as a ``model`` artifact named ``<artifact_name>-<run id>``. When an interrupt or an error
    stops the fit, the student is exported as it was, with a ``PARTIAL`` file (JSON: step, reason) beside it; a
    later complete export removes that file.

    Args:
        dirpath: where to write the folder; default ``<trainer.log_dir>/student`` (the run's folder).
        log_artifact: also log the folder as a W&B artifact (written offline too; ``wandb sync`` uploads it).
        artifact_name: artifact name prefix (letters, digits, ``-``, ``_``, ``.``).
    """

    def __init__(self, dirpath: str | None = None, log_artifact: bool = False, artifact_name: str = "student") -> None:
        checks.require(bool(artifact_name) and all(c.isalnum() or c in "-_." for c in artifact_name),
                       "artifact_name", artifact_name, "letters, digits, '-', '_' or '.'")
        self.dirpath = dirpath
        self.log_artifact = log_artifact
        self.artifact_name = artifact_name
        self.exported: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        if not trainer.is_global_zero:
            if sharding.is_sharded(pl_module):  # FSDP: gathering the student takes every rank (rank 0 writes)
                pl_module.export(path)
            return
        self.exported = pl_module.export(path)
        (Path(path) / PARTIAL).unlink(missing_ok=True)
        rank_zero_info(f"ExportStudent: student written to {path} (AutoModelForCausalLM.from_pretrained loads it)")
        logger = wandb_logger(trainer)
        if not self.log_artifact:
            return
        if logger is None:
            rank_zero_warn("ExportStudent(log_artifact=True) needs a W&B logger; the student was only exported")
            return
        import wandb

        run = logger.experiment
        artifact = wandb.Artifact(f"{self.artifact_name}-{run.id}", type="model",
                                  metadata={"method": type(pl_module).__name__, "step": trainer.global_step})
        artifact.add_dir(path)
        run.log_artifact(artifact, aliases=["latest"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Export the student of an interrupted or failed fit, marked ``PARTIAL`` (never hiding the exception)."""
        if trainer.state.fn != "fit" or not trainer.is_global_zero or getattr(pl_module, "student", None) is None:
            return
        path = self._path(trainer)
        reason = f"{type(exception).__name__}: {exception}".strip()
        try:
            self.exported = pl_module.export(path)
            (Path(path) / PARTIAL).write_text(json.dumps({"step": trainer.global_step, "reason": reason}) + "\n")
        except Exception as error:  # the exception that stopped the run is the one to see
            rank_zero_warn(f"ExportStudent: the run stopped ({reason}) and the partial student could not be "
                           f"exported: {error}")
            return
        rank_zero_info(f"ExportStudent: the run stopped at step {trainer.global_step} ({reason}); the student as it "
                       f"was is in {path}, marked by {Path(path) / PARTIAL}")

    def _path(self, trainer: L.Trainer) -> str:
        return self.dirpath or str(Path(trainer.log_dir or trainer.default_root_dir) / "student")


# --------------------------------------------------------------------------------------------- throughput
class Throughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (all ranks) every step, timing each training batch (data loading excluded);
    on an on-policy step also the student's sampling speed ``train/generated_tokens_per_sec`` and
    ``train/generation_share`` of the step's time, from the method's ``step_stats``."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens, size = batch["input_ids"].numel() * trainer.world_size, batch["input_ids"].shape[0]
        pl_module.log("train/tokens_per_sec", tokens / elapsed, batch_size=size)
        stats = getattr(pl_module, "step_stats", {})
        seconds = stats.pop("generation_seconds", 0.0)
        if seconds:  # an on-policy step: the student's sampling speed and its share of the step
            generated = stats.pop("generated_tokens", 0)
            pl_module.log("train/generated_tokens_per_sec", generated / max(seconds, 1e-9), batch_size=size)
            pl_module.log("train/generation_share", seconds / elapsed, batch_size=size)


# ------------------------------------------------------------------------------------ idle teacher placement
IDLE_DEVICE = torch.device("cpu")


def teacher_idle_in_training(module: L.LightningModule) -> bool:
    """Whether ``module`` holds a frozen, unsharded teacher that its training steps never ask: the method says so
    through ``teacher_unused_in_training()`` (``SoftDistill`` at ``ce_weight == 1``, off-policy, without a feature
    term); any other module keeps its teacher where it is."""
    teacher = getattr(module, "teacher", None)
    if teacher is None or getattr(module, "trains_teacher", True) or sharding.is_sharded(module):
        return False
    unused = getattr(module, "teacher_unused_in_training", None)
    return bool(unused and unused())


class IdleTeacherOffload(L.Callback):
    """An idle teacher (:func:`teacher_idle_in_training`; with several teachers, all of them) off the accelerator
    while the student trains: moved to the CPU when training starts, onto the module's device for each validation,
    back to the CPU when training resumes, and onto the device again when the fit ends (as it was). The accelerator
    then holds the student, its gradients and optimizer state only."""

    def __init__(self) -> None:
        self.active = False  # decided when training starts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = teacher_idle_in_training(pl_module)
        self._move(pl_module, IDLE_DEVICE)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._move(pl_module, pl_module.device)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._move(pl_module, IDLE_DEVICE)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._move(pl_module, pl_module.device)
        self.active = False

    def _move(self, module: L.LightningModule, device: torch.device) -> None:
        if not self.active:
            return
        others = getattr(module, "other_teachers", None)  # several teachers: the others are idle too
        for teacher in (module.teacher, *(others.values() if others is not None else ())):
            if teacher is not None:
                teacher.to(device)


# ------------------------------------------------------------------------------------------ CPU memory reuse
REUSE_MEMORY_ENV = "LIGHTNING_DISTILL_REUSE_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)
TRIM_THRESHOLD = 2**30  # bytes of free memory at the heap's top kept rather than returned to the kernel
_MALLOC: dict[str, bool] = {}  # "applied": the calls were made in this process


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse, once per process.

    A training step on CPU allocates and frees the same large buffers every step (the logits and their float32
    copy, their gradients, the head's gradient, autocast's bf16 weight copies). glibc serves every request above its
    mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it when freed, so the next step faults in
    brand-new pages, one per 4 KiB. Two ``mallopt`` calls keep freed memory instead, as the allocators PyTorch's CPU
    tuning guide recommends (jemalloc, tcmalloc) do: no ``mmap`` for large blocks (``M_MMAP_MAX = 0``) and no
    trimming of the heap's free top below 1 GiB (``M_TRIM_THRESHOLD``); measured 0.72-0.79x the step time by
    ``benchmarks/speed.py``. Process-wide and for the rest of the process: the resident memory then stays at its peak
    between steps.

    Returns:
        Whether it is in effect: False when ``LIGHTNING_DISTILL_REUSE_MEMORY=0``, off Linux, or without glibc.
    """
    if _MALLOC.get("applied"):
        return True
    if os.environ.get(REUSE_MEMORY_ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _MALLOC["applied"] = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _MALLOC["applied"]


class ReuseFreedMemory(L.Callback):
    """Calls :func:`reuse_freed_memory` when a Trainer on the CPU sets up (fit, validate, test or predict).
    Opt-in: it changes the whole process's allocator (the CLI and the demo apply it)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu" and not _MALLOC.get("applied") and reuse_freed_memory():
            rank_zero_info(f"[lightning_distill] on CPU, freed memory is kept for reuse (glibc mallopt; "
                           f"{REUSE_MEMORY_ENV}=0 turns this off)")
