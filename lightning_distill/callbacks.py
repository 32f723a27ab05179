"""Callbacks and the logger used by the YAML recipes: W&B that never waits for a network, the resolved CLI config
as hyperparameters, sample tables (prompt, teacher, student) and the exported student as an artifact.

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

import json
import netrc
import os
import signal
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_distill import sharding

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
        if not isinstance(offline, bool):
            raise ValueError(f"offline must be True, False or None (decide from the environment), got {offline!r}")
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
        if not project:
            raise ValueError("project must be a non-empty W&B project name, e.g. project='lightning-distill'")
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
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a W&B run id, got {run_id!r}")
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
        if isinstance(every_n_validations, bool) or not isinstance(every_n_validations, int) or (
                every_n_validations < 1):
            raise ValueError(f"every_n_validations must be an integer >= 1, got {every_n_validations!r}")
        if prompts is not None and (not prompts or not all(isinstance(p, str) and p for p in prompts)):
            raise ValueError(f"prompts must be None (the built-in prompts) or a non-empty list of non-empty "
                             f"strings, got {prompts!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not key:
            raise ValueError("key must be a non-empty W&B key, e.g. key='samples'")
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
        if not artifact_name or not all(c.isalnum() or c in "-_." for c in artifact_name):
            raise ValueError(f"artifact_name must be letters, digits, '-', '_' or '.', got {artifact_name!r}")
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
