"""Sharded training (FSDP): which parameters each rank holds, and how the two models are called when sharded.

One plan (:func:`plan`) says what is sharded together; two wrappers carry it out:

- Lightning's ``FSDPStrategy`` (``--trainer.strategy fsdp``, FSDP1): :func:`prepare` hands the plan to the
  strategy as its ``auto_wrap_policy`` (a ``CustomPolicy``, one decision per module) and ``ignored_states``;
  Lightning then wraps the LightningModule, whose root unit keeps what no smaller unit took: the student's
  embedding, final norm and head.
- Lightning's ``ModelParallelStrategy`` (FSDP2, ``data_parallel_size=N, tensor_parallel_size=1``): :func:`prepare`
  calls ``fully_shard`` on each unit in ``configure_model``, as that strategy asks.

The plan, per model:

- student: each decoder layer is a unit; the rest (embedding, final norm, output head, tied in SmolLM2) is the
  unit ``"student"``, which FSDP1 keeps gathered through the whole training step (the root unit) and FSDP2 gathers
  for the student's forward and keeps until backward (its root): the loss calls the head after the forward,
  chunk by chunk (:mod:`lightning_distill.losses.distill`), and needs the whole weight there.
- frozen teacher, ``teacher_sharding="shard"``: each decoder layer is a unit in the teacher's own dtype, never
  cast (no mixed-precision policy), with no gradient and no optimizer state; its embedding, final norm and head
  are replicated (whole on every rank, in its dtype), so the loss can call its head at any time. The teacher is
  never in a unit with the student and never in a checkpoint (stripped on save as without FSDP).
- frozen teacher, ``teacher_sharding="replicate"``: the whole teacher is replicated (a small teacher: no
  all-gathers for it at all).
- trained teacher (CoDistill): its layers are units and its rest the unit ``"teacher"``, under the same
  mixed-precision policy as the student; optimized and checkpointed like the student.

A model sharded by FSDP2 is called through its root (``register_fsdp_forward_method``), so its final hidden
states come from :func:`lightning_distill.backbone.final_hidden`; without FSDP that is the decoder call it always was.

The functions here are given the LightningModule only as the ``nn.Module`` that holds the two models (its submodules
``student`` and ``teacher``) and the method's settings as arguments; they know no method.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_distill.backbone import HIDDEN_METHOD, decoder_hidden

_FSDP1_PREFIX = "_fsdp_wrapped_module."


# ------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Unit:
    """Parameters sharded together: one FSDP1 unit (flat parameter) or one FSDP2 ``fully_shard`` group.

    Attributes:
        name: path of its module in the LightningModule (``"student"``: the student minus its layers).
        model: ``"student"`` or ``"teacher"``.
        frozen: no gradient and no optimizer state (a frozen teacher's layers).
        dtype: dtype of all of its parameters (a frozen unit also computes in it).
        params: full names of the parameters it holds (a tied weight once).
    """

    name: str
    model: str
    frozen: bool
    dtype: torch.dtype
    params: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What each rank holds: ``units`` are sharded across ranks, ``replicated`` modules are whole on every rank.

    Attributes:
        units: the sharded units, layers first, the student's rest last.
        replicated: module paths kept whole on every rank (a frozen teacher's rest, or all of it).
        replicated_params: full names of the parameters of ``replicated``.
    """

    units: tuple[Unit, ...]
    replicated: tuple[str, ...]
    replicated_params: tuple[str, ...]

    def unit_of(self, param: str) -> Unit | None:
        """The unit holding parameter ``param`` (a full name), ``None`` when it is replicated."""
        return next((u for u in self.units if param in u.params), None)


def layer_paths(model: nn.Module) -> list[str]:
    """Paths (in ``model``) of its decoder layers: the ``layers`` list of its decoder (Hugging Face decoders), or
    else the modules whose class the model names in ``_no_split_modules``."""
    names = {id(m): n for n, m in model.named_modules()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return [names[id(layer)] for layer in layers]
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [n for n, m in model.named_modules() if type(m).__name__ in classes]
    if not found:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard them: set "
                         "teacher_sharding='replicate' (teacher) or train with DDP")
    return found


def rest_paths(model: nn.Module, layers: list[str]) -> list[str]:
    """Paths of the largest submodules of ``model`` that hold no decoder layer and are not inside one: for a
    Hugging Face decoder its embedding, rotary embedding, final norm and output head."""
    layer_set = set(layers)

    def walk(prefix: str, module: nn.Module) -> list[str]:
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{type(module).__name__} at {prefix or 'the top'} holds parameters of its own beside "
                             "its decoder layers: set teacher_sharding='replicate'")
        found = []
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in layer_set:
                continue
            holds_layer = any(p == path or p.startswith(path + ".") for p in layer_set)
            found += walk(path + ".", child) if holds_layer else [path]
        return found

    return walk("", model)


def plan(root: nn.Module, trains_teacher: bool, teacher_sharding: str) -> Plan:
    """The sharding plan of ``root``'s built models (its submodules ``student`` and, if any, ``teacher``; see the
    module docstring); raises ``ValueError`` naming the setting to change when they cannot be laid out so.

    Args:
        root: the module holding the two models (the LightningModule).
        trains_teacher: the teacher is trained (CoDistill), not frozen.
        teacher_sharding: a frozen teacher's layout, ``"shard"`` or ``"replicate"``.
    """
    student, teacher = getattr(root, "student", None), getattr(root, "teacher", None)
    if student is None:
        raise RuntimeError("call configure_model() before planning the sharding (the Trainer does)")
    unit_paths: list[tuple[str, str, bool]] = [(f"student.{p}", "student", False) for p in layer_paths(student)]
    replicated: list[str] = []
    if teacher is not None:
        frozen = not trains_teacher
        if frozen and teacher_sharding == "replicate":
            replicated = ["teacher"]
        else:
            layers = layer_paths(teacher)
            unit_paths += [(f"teacher.{p}", "teacher", frozen) for p in layers]
            if frozen:
                replicated = [f"teacher.{p}" for p in rest_paths(teacher, layers)]
            else:
                unit_paths.append(("teacher", "teacher", False))
    unit_paths.append(("student", "student", False))
    held: dict[str, list[tuple[str, Tensor]]] = {path: [] for path, _, _ in unit_paths}
    replicated_params = []
    for name, param in root.named_parameters():
        clean = name.replace(_FSDP1_PREFIX, "")
        if any(clean.startswith(p + ".") for p in replicated):
            replicated_params.append(clean)
            continue
        owners = [p for p in held if clean.startswith(p + ".")]
        if not owners:
            raise ValueError(f"parameter {clean!r} belongs to neither the student nor the teacher: FSDP would not "
                             "know where to put it; register it inside one of the models")
        held[max(owners, key=len)].append((clean, param))
    units = []
    for path, model, frozen in unit_paths:
        dtypes = {p.dtype for _, p in held[path]}
        if len(dtypes) > 1:
            raise ValueError(f"{path} mixes parameter dtypes {sorted(map(str, dtypes))}, which one FSDP unit cannot "
                             "hold: keep each model in one dtype (teacher_dtype applies to the whole teacher)")
        dtype = dtypes.pop() if dtypes else torch.get_default_dtype()
        units.append(Unit(path, model, frozen, dtype, tuple(n for n, _ in held[path])))
    return Plan(tuple(units), tuple(replicated), tuple(replicated_params))


# ------------------------------------------------------------------------------------------------ wrapping
def prepare(root: nn.Module, strategy: Strategy | None, trains_teacher: bool, teacher_sharding: str,
            unsupported: str | None = None) -> None:
    """Lay ``root``'s built models out for the Trainer's strategy: FSDP1 (``FSDPStrategy``) or FSDP2
    (``ModelParallelStrategy``); nothing for any other strategy. Called by ``configure_model``; idempotent.

    Args:
        root: the module holding the two models (the LightningModule).
        strategy: the Trainer's strategy (``None`` outside a Trainer).
        trains_teacher: the teacher is trained (CoDistill), not frozen.
        teacher_sharding: a frozen teacher's layout, ``"shard"`` or ``"replicate"``.
        unsupported: why the method's settings cannot be sharded on this many ranks (raised as a ``ValueError``
            when the strategy shards), ``None`` when they can.
    """
    if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return
    if not getattr(root, "_forgives_frozen_teacher", False) and not trains_teacher:
        root.register_load_state_dict_post_hook(_forgive_frozen_teacher)
        root._forgives_frozen_teacher = True
    if isinstance(strategy, FSDPStrategy):
        _prepare_fsdp1(root, strategy, trains_teacher, teacher_sharding, unsupported)
    else:
        _apply_fsdp2(root, strategy, trains_teacher, teacher_sharding, unsupported)


def _forgive_frozen_teacher(root: nn.Module, incompatible: Any) -> None:
    """A load_state_dict post-hook: a checkpoint holds no frozen teacher (it is reloaded from its name), so its
    keys are expected to be missing. FSDP loads the weights before ``on_load_checkpoint`` could add them back."""
    kept = [k for k in incompatible.missing_keys if not k.replace(_FSDP1_PREFIX, "").startswith("teacher.")]
    incompatible.missing_keys[:] = kept


def _prepare_fsdp1(root: nn.Module, strategy: FSDPStrategy, trains_teacher: bool, teacher_sharding: str,
                   unsupported: str | None) -> None:
    """Give the strategy the plan as its wrap policy and ignored modules; Lightning wraps in its ``setup``."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import CustomPolicy

    if any(isinstance(m, FullyShardedDataParallel) for m in root.modules()):
        return  # wrapped by an earlier run
    if unsupported:
        raise ValueError(unsupported)
    layout = plan(root, trains_teacher, teacher_sharding)
    frozen = [u for u in layout.units if u.frozen and u.dtype != torch.float32]
    if frozen and strategy.precision_plugin.precision == "32-true":
        rank_zero_warn(f"FSDPStrategy with precision='32-true' casts every weight to float32, the frozen teacher's "
                       f"{frozen[0].dtype} ones too: set precision='bf16-mixed' to keep the teacher in its dtype")
    precision = strategy.mixed_precision_config  # units cast their inputs: generation runs outside the root's forward
    trained = {"mixed_precision": precision and dataclasses.replace(precision, cast_forward_inputs=True)}
    decisions: dict[nn.Module, dict[str, Any]] = {}
    for unit in layout.units:
        if unit.name != "student":  # the student's rest stays in the root unit, which Lightning makes
            decisions[root.get_submodule(unit.name)] = {"mixed_precision": None} if unit.frozen else trained
    if strategy.kwargs.get("auto_wrap_policy") is not None and not getattr(strategy.kwargs["auto_wrap_policy"],
                                                                             "lightning_distill", False):
        rank_zero_warn("FSDPStrategy(auto_wrap_policy=...) is replaced by the distillation plan "
                       "(lightning_distill.sharding): the teacher must not share a unit with the student")
    policy = CustomPolicy(lambda m: decisions.get(m, False))
    policy.lightning_distill = True
    strategy.kwargs["auto_wrap_policy"] = policy
    strategy.kwargs.pop("ignored_modules", None)
    replicated = [root.get_submodule(path) for path in layout.replicated]
    if replicated:
        strategy.kwargs["ignored_states"] = replicated
        for part in replicated:  # FSDP moves only what it shards
            part.to(strategy.root_device)
    else:
        strategy.kwargs.pop("ignored_states", None)


def _apply_fsdp2(root: nn.Module, strategy: ModelParallelStrategy, trains_teacher: bool, teacher_sharding: str,
                 unsupported: str | None) -> None:
    """``fully_shard`` each unit over the data-parallel mesh; models are roots called through
    :func:`~lightning_distill.backbone.final_hidden` or their forward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    student, teacher = root.student, getattr(root, "teacher", None)
    if isinstance(student, FSDPModule):
        return
    if unsupported:
        raise ValueError(unsupported)
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"tensor_parallel_size={mesh['tensor_parallel'].size()}: the distillation modules shard "
                         "by FSDP only: set ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)")
    mesh = mesh["data_parallel"]
    layout = plan(root, trains_teacher, teacher_sharding)
    for unit in layout.units:
        if unit.name not in ("student", "teacher"):
            fully_shard(root.get_submodule(unit.name), mesh=mesh)  # no cast: a frozen teacher keeps its dtype
    roots = [student]
    if teacher is not None and "teacher" not in layout.replicated:
        kept = {p for path in layout.replicated for p in root.get_submodule(path).parameters()}
        fully_shard(teacher, mesh=mesh, ignored_params=kept or None)
        roots.append(teacher)
    fully_shard(student, mesh=mesh)
    for model in roots:
        setattr(model, HIDDEN_METHOD, types.MethodType(decoder_hidden, model))
        register_fsdp_forward_method(model, HIDDEN_METHOD)


# -------------------------------------------------------------------------------------------- sharded state
def _fsdp1_root(strategy: Strategy | None) -> nn.Module | None:
    """The FSDP1 wrapper Lightning put around the LightningModule, if any."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = strategy.model if isinstance(strategy, FSDPStrategy) else None
    return root if isinstance(root, FullyShardedDataParallel) else None


def is_sharded(module: nn.Module) -> bool:
    """Whether any of ``module``'s weights are split across ranks: FSDP (1 or 2) units, or DeepSpeed ZeRO-3's
    partitioned parameters. Then every rank must take every forward together (generation included)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in module.parameters())


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextmanager
def gathered(strategy: Strategy | None) -> Iterator[None]:
    """Outside a training or validation step, gather what FSDP1's root unit holds (the student's embedding, norm
    and head) so the models can be called (generation); FSDP2 and unsharded models need nothing. Collective."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    root = _fsdp1_root(strategy)
    idle = root is not None and root.training_state == TrainingState.IDLE  # inside a step it is gathered already
    context = FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False) if idle else (
        nullcontext())
    with context:
        yield


def student_state_dict(root: nn.Module, strategy: Strategy | None) -> dict[str, Tensor] | None:
    """The student's (``root.student``) full weights on CPU, gathered on rank 0 (empty elsewhere); ``None`` when
    nothing is sharded. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    if not is_sharded(root):
        return None
    wrapper = _fsdp1_root(strategy)
    if wrapper is None:  # FSDP2
        return get_model_state_dict(root.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    config = FullStateDictConfig(offload_to_cpu=wrapper.compute_device.type != "cpu", rank0_only=True)
    with gathered(strategy), FullyShardedDataParallel.state_dict_type(wrapper, StateDictType.FULL_STATE_DICT, config):
        state = root.student.state_dict()  # the root unit's part points into gathered memory: copy it here
        state = {k.replace(_FSDP1_PREFIX, ""): v.detach().cpu().clone() for k, v in state.items()}
    return state if is_rank_zero() else {}


def save_pretrained(model: nn.Module, path: str, state: dict[str, Tensor] | None = None) -> None:
    """``model.save_pretrained(path)`` with the weights ``state`` (from :func:`student_state_dict`; ``None``: the
    model's own), naming the model's own class in the config, not the class FSDP2 derives from it."""
    from torch.distributed.fsdp import FSDPModule

    model.save_pretrained(path, state_dict=state)
    if isinstance(model, FSDPModule):
        base = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        model.config.architectures = [base.__name__]
        model.config.save_pretrained(path)
