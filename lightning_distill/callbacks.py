"""Callbacks and the logger used by the YAML recipes: W&B that never waits for a network, the resolved CLI config
as hyperparameters, sample tables (prompt, teacher, student) and the exported student as an artifact.

W&B online or offline is decided once, when :class:`OfflineFirstWandbLogger` is built (:func:`wandb_mode`):
``WANDB_MODE`` wins when set; otherwise the run goes online only when credentials exist (``WANDB_API_KEY``,
``WANDB_IDENTITY_TOKEN_FILE`` or a ``.netrc`` entry for the W&B host, which ``wandb login`` writes), and offline
otherwise, so that a machine without an account or a network never blocks on a login prompt or a connection.
Offline runs are uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``.

The labelling callback of ``lightning-distill predict`` is :class:`lightning_distill.store.LabelWriter`.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

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


# ----------------------------------------------------------------------------------------------- export
class ExportStudent(L.Callback):
    """At the end of ``fit``, export the student as a Hugging Face folder (``pl_module.export``) and, opt-in, log
    that folder to W&B as a ``model`` artifact named ``<artifact_name>-<run id>``.

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
        path = self.dirpath or str(Path(trainer.log_dir or trainer.default_root_dir) / "student")
        if not trainer.is_global_zero:
            return
        self.exported = pl_module.export(path)
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
