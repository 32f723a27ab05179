"""Building a method's models: the student from its spec, the teacher this run keeps, and their hygiene.

A frozen teacher is in ``eval()``, has ``requires_grad=False``, is cast to ``performance.teacher_dtype`` and hidden
from DDP's broadcast and gradient buckets; a trained teacher (CoDistill) is none of these. A named teacher that the
signal does not need (stored labels) is loaded only to build a ``from_teacher`` student, then dropped. A checkpoint
being loaded builds both from the configs it holds (:func:`build_restored`, :mod:`~lightning_distill.modules.
checkpoint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from lightning_distill import pruning, speedups
from lightning_distill.backbone import (
    as_dtype,
    build_student,
    check_tokenizers,
    check_vocabulary,
    freeze,
    load_config,
    load_model,
    load_tokenizer,
    model_from_config,
)
from lightning_distill.signals import CrossTokenizerTeacher

if TYPE_CHECKING:
    from lightning_distill.modules.base import DistillModule


def make_models(module: DistillModule) -> None:
    """Build (once) the teacher and the student of ``module``, and check that their vocabularies agree where the
    method compares them id by id."""
    if module.student is not None:
        return
    if module._stored is not None:
        return build_restored(module)
    own = pruning.own_tokenizer(module.student_spec)
    if own is not None and module.compares_vocabularies():
        raise ValueError(f"student={module.student_spec!r} has a tokenizer of its own, but {type(module).__name__} "
                         f"with these settings compares it with teacher={module.teacher_name!r} id by id: use "
                         "SoftDistill(loss='uld' or 'gold'), or drop student.from_teacher.tokenizer")
    teacher = None
    prunes_teacher = isinstance(module.student_spec, dict) and "from_teacher" in module.student_spec
    if isinstance(module.teacher_name, dict):  # a fresh random teacher (CoDistill), sized to the tokenizer
        spec = {"config": {"vocab_size": len(module.tokenizer), **module.teacher_name.get("config", {})}}
        teacher = build_student(spec)
    elif module.local_teacher is not None and (module.needs_teacher() or prunes_teacher):
        teacher = load_model(module.local_teacher, role="teacher")  # fp32: from_teacher students copy exact weights
    spec = module.student_spec
    config = spec.get("config") if isinstance(spec, dict) else None
    if isinstance(module.signal, CrossTokenizerTeacher) and isinstance(config, dict) and "vocab_size" not in config:
        spec = {"config": {**config, "vocab_size": len(module.tokenizer)}}  # a fresh student on its own tokenizer
    teacher_tokenizer = load_tokenizer(module.local_teacher, "teacher") if own is not None else module.tokenizer
    student = build_student(spec, teacher, teacher_tokenizer)
    keep(module, student, teacher if module.needs_teacher() else None)
    hold_other_teachers(module)
    if isinstance(module.student_spec, str) and teacher is not None and module.compares_vocabularies():
        check_tokenizers(module.tokenizer, load_tokenizer(module.student_spec, "student"), module.teacher_name,
                         module.student_spec, teacher.config.vocab_size, module.student.config.vocab_size)
    vocab = teacher.config.vocab_size if teacher is not None else None
    manifest = module.signal.manifest
    if manifest is not None:  # the teacher that wrote the store
        vocab = manifest.get("vocab_size")
    check_vocabulary(module.student, module.tokenizer, vocab if module.compares_vocabularies() else None,
                     module.student_spec, module.teacher_name)


def keep(module: DistillModule, student: PreTrainedModel, teacher: PreTrainedModel | None) -> None:
    """Hold the student (embeddings frozen unless ``optimization.train_embeddings``) and the teacher this run keeps:
    trained (CoDistill), or frozen in ``performance.teacher_dtype`` and hidden from DDP; then compile or patch them
    as the module's performance options ask (:func:`lightning_distill.speedups.apply`)."""
    module.student = student
    if not module.hparams.optimization.train_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    if teacher is not None:
        hold_teacher(module, teacher)
    speedups.apply(module.hparams.performance, module.student, module.teacher, module.records_layers())


def hold_teacher(module: DistillModule, teacher: PreTrainedModel) -> None:
    """Hold ``teacher``: trained (CoDistill), or frozen in ``performance.teacher_dtype`` and hidden from DDP."""
    dtype = as_dtype(module.hparams.performance.teacher_dtype)
    module.teacher = teacher.train() if module.trains_teacher else freeze(teacher.to(dtype))
    if not module.trains_teacher:  # DDP must neither broadcast nor all-reduce a frozen teacher
        module._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in teacher.named_parameters()]
        module._ddp_params_and_buffers_to_ignore += [f"teacher.{n}" for n, _ in teacher.named_buffers()]


def hold_other_teachers(module: DistillModule) -> None:
    """Several teachers: load each other named teacher whose signal asks its model, frozen as the main one, into
    ``module.other_teachers`` (their tokenizers were checked against the main one's when the module was made)."""
    several = module.several_teachers
    if several is None:
        return
    signals = getattr(module.signal, "scorer", module.signal).signals  # on-policy wraps the teachers' signal
    dtype = as_dtype(module.hparams.performance.teacher_dtype)
    for name, spec in several.models.items():
        if name == several.main or not signals[name].needs_teacher or name in module.other_teachers:
            continue
        teacher = freeze(load_model(spec, role=f"teacher.models.{name}").to(dtype))
        check_vocabulary(module.student, module.tokenizer, teacher.config.vocab_size, module.student_spec, spec)
        module.other_teachers[name] = teacher
        ignored = [f"other_teachers.{name}.{n}" for n, _ in teacher.named_parameters()]
        ignored += [f"other_teachers.{name}.{n}" for n, _ in teacher.named_buffers()]
        module._ddp_params_and_buffers_to_ignore = getattr(module, "_ddp_params_and_buffers_to_ignore", []) + ignored


def max_positions(module: DistillModule) -> int | None:
    """The longest sequence ``module``'s models take, read from the named models' configs (or a checkpoint's), so
    that it is known before the weights are loaded; ``None`` when no config says."""
    if module._stored is not None:  # a checkpoint being loaded: its configs (a frozen teacher is not in it)
        stored = [module._stored.get(key) or {} for key in ("student_config", "teacher_config")]
        limits = [config.get("max_position_embeddings") for config in stored]
        return min([x for x in limits if x], default=None)
    limits = []
    for role, spec in (("teacher", module.local_teacher), ("student", module.student_spec)):
        if isinstance(spec, str):
            limits.append(getattr(load_config(spec, role), "max_position_embeddings", None))
        elif isinstance(spec, dict) and "config" in spec:
            limits.append(spec["config"].get("max_position_embeddings"))
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def build_restored(module: DistillModule) -> None:
    """``configure_model`` of a module built inside :func:`~lightning_distill.modules.checkpoint.restoring`: the
    student (and a trained teacher) from the stored configs, their weights to come from the checkpoint's state dict;
    a frozen teacher by its name, and only for a method that asks it live. A missing teacher is an error when a
    trainer is attached (training, validating, labelling), else it is remembered (loading and exporting the student
    do not need it)."""
    stored = module._stored
    teacher = None
    if module.trains_teacher and stored.get("teacher_config"):
        teacher = model_from_config(stored["teacher_config"])
    elif module.needs_teacher():
        try:
            teacher = load_model(module.teacher_name, role="teacher")
        except ValueError as error:
            module.teacher_missing = missing_teacher(module, error)
            if module._trainer is not None:
                raise ValueError(module.teacher_missing) from None
    keep(module, model_from_config(stored["student_config"]), teacher)
    if module.needs_teacher():
        hold_other_teachers(module)


def missing_teacher(module: DistillModule, error: Exception) -> str:
    """The error of a method that asks a live teacher whose folder is gone: where it looked, how to point anew."""
    name = type(module).__name__
    return (f"{error}. {name} asks its teacher live, so going on with this checkpoint needs it: point at the "
            f"teacher's new place with --model.init_args.teacher NEW_PATH, or {name}.load_from_checkpoint(path, "
            "teacher=NEW_PATH); exporting the student does not need it (lightning-distill export --ckpt PATH "
            "--out DIR)")
