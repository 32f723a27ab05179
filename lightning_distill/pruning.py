"""Depth pruning: which teacher layers a ``{"from_teacher": ...}`` student keeps, and the copy that keeps them.

A student spec's ``from_teacher`` options choose the layers:

- ``{"layers": N}`` (``select="importance"``, the default): the N layers that change their input most on a few
  calibration blocks of the built-in corpus, by the Block Influence of ShortGPT (Men et al. 2024, "ShortGPT:
  Layers in Large Language Models are More Redundant Than You Expect"): ``BI_i = 1 - mean_t cos(x_i,t, x_i+1,t)``
  over the tokens t of the calibration text, x_i the input of layer i and x_i+1 its output. Minitron (Muralidharan
  et al. 2024) ranks depth by measured importance too, and so does the method table of ``benchmarks/quality.py``
  (evenly spaced layers against these, at equal steps);
- ``{"layers": N, "select": "evenly"}``: N evenly spaced layers, first and last included, as DistilBERT (Sanh et
  al. 2019) keeps every other layer (no calibration pass);
- ``{"layers": [i, j, ...]}``: these teacher layers, in increasing order.

The kept teacher indices are recorded in the student's config as ``distill_teacher_layers`` (so they are in the
exported ``config.json``); feature distillation (:mod:`lightning_distill.features`) matches each student layer to
the teacher layer it was copied from by default (:func:`counterparts`). No Lightning here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill.checks import choice, require

SELECT = ("evenly", "importance")
DEFAULT_SELECT = "importance"  #: measured best (``benchmarks/quality.py``, ``benchmarks/demo_recipe.py``)
TEACHER_LAYERS = "distill_teacher_layers"  #: the student config field holding the kept teacher layer indices
CALIBRATION_CORPUS = "builtin:python-docs"
CALIBRATION_BLOCKS = 8  # blocks of calibration text, each starting at a document spread over the corpus
CALIBRATION_BLOCK_SIZE = 128  # tokens per block
CALIBRATION_BATCH_SIZE = 4  # blocks per teacher forward: 2 batches of 4 x 128 tokens


def evenly_spaced(total: int, keep: int) -> list[int]:
    """Indices of ``keep`` evenly spaced items out of ``total``, first and last included.

    >>> evenly_spaced(30, 6)
    [0, 6, 12, 17, 23, 29]
    """
    require(1 <= keep <= total, "student.from_teacher.layers", keep, f"between 1 and the teacher's {total} layers")
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def from_teacher(teacher: PreTrainedModel, options: dict[str, Any] | None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The student of ``{"from_teacher": options}``: the layers :func:`select_layers` picks, copied by
    :func:`prune_layers`; with ``"tokenizer": NAME``, on that tokenizer instead of the teacher's
    (:func:`lightning_distill.transplant.transplant`; ``tokenizer`` is then the teacher's, which reads each new
    token's text)."""
    options = dict(options or {})
    layers = options.pop("layers", None)
    select = options.pop("select", None)
    own = options.pop("tokenizer", None)
    if options:
        raise ValueError(f"student.from_teacher accepts only 'layers', 'select' and 'tokenizer', got extra keys "
                         f"{sorted(options)}")
    student = prune_layers(teacher, select_layers(teacher, layers, select, tokenizer))
    if own is None:
        return student
    require(isinstance(own, str) and bool(own), "student.from_teacher.tokenizer", own,
            "a model name or folder whose tokenizer the student uses (e.g. 'builtin:python-docs-bpe-4k')")
    if tokenizer is None:
        raise ValueError("student.from_teacher.tokenizer starts each new token from the teacher's embeddings of its "
                         "text: pass the teacher's tokenizer (build_student(spec, teacher, tokenizer))")
    from lightning_distill.transplant import transplant  # here: transplant reads tokenizers through backbone

    return transplant(student, tokenizer, own)


def own_tokenizer(spec: Any) -> str | None:
    """The tokenizer a ``{"from_teacher": {..., "tokenizer": NAME}}`` student spec names, else ``None``."""
    options = spec.get("from_teacher") if isinstance(spec, dict) else None
    return options.get("tokenizer") if isinstance(options, dict) else None


def select_layers(teacher: PreTrainedModel, layers: int | list[int] | None, select: str | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """The teacher layer indices a student keeps, in increasing order.

    Args:
        teacher: the teacher model.
        layers: how many layers to keep (1 to the teacher's depth), or the indices themselves.
        select: with a number of layers: ``"importance"`` (highest Block Influence on the calibration text,
            :func:`block_influence`; ``None``, the default) or ``"evenly"`` (evenly spaced, first and last
            included).
        tokenizer: the teacher's tokenizer: ``"importance"`` tokenizes the calibration text with it.

    Raises:
        ValueError: naming ``student.from_teacher.layers`` or ``.select``, with the value and what to write.
    """
    total = teacher.config.num_hidden_layers
    if isinstance(layers, (list, tuple)):
        if select is not None:
            raise ValueError(f"student.from_teacher.select={select!r} chooses among a number of layers, but layers "
                             f"is the list {list(layers)}: drop select, or give layers as a number")
        name, given = "student.from_teacher.layers", list(layers)
        indices = bool(layers) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total
                                       for i in layers)
        require(indices, name, given, f"a list of teacher layer indices in [0, {total - 1}]")
        require(len(set(layers)) == len(layers), name, given, "a list of distinct teacher layers", "give each once")
        require(given == sorted(layers), name, given, "in increasing order (layers keep their depth order)",
                f"write {sorted(layers)}")
        return given
    require(isinstance(layers, int) and not isinstance(layers, bool), "student.from_teacher.layers", layers,
            "an integer or a list of teacher layer indices")
    select = DEFAULT_SELECT if select is None else select
    choice("student.from_teacher.select", select, SELECT)
    kept = evenly_spaced(total, layers)  # checks the range
    if select == "evenly":
        return kept
    if tokenizer is None:
        raise ValueError("student.from_teacher.select='importance' (the default) measures the teacher on "
                         "calibration text: pass the teacher's tokenizer (build_student(spec, teacher, tokenizer)), "
                         "or select='evenly'")
    influence = block_influence(teacher, calibration_blocks(tokenizer, teacher))
    ranked = sorted(range(total), key=lambda i: (-influence[i], i))  # most influential first, ties by depth
    return sorted(ranked[:layers])


def calibration_blocks(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None,
                       blocks: int = CALIBRATION_BLOCKS, block_size: int = CALIBRATION_BLOCK_SIZE) -> Tensor:
    """A fixed sample of the built-in corpus: ``blocks`` rows of ``block_size`` token ids (B, T), block j starting
    at the j-th of ``blocks`` documents evenly spaced over the corpus and running on into the next ones
    (EOS-separated) when that one is short. Deterministic; capped at ``model``'s longest sequence."""
    from lightning_distill.data.sources import documents  # here: the data package imports backbone

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    block_size = min(block_size, limit) if limit else block_size
    texts = documents(CALIBRATION_CORPUS)
    rows = []
    for start in evenly_spaced(len(texts), min(blocks, len(texts))):
        ids: list[int] = []
        for i in range(start, start + len(texts)):
            ids += tokenizer(texts[i % len(texts)][: 16 * block_size], add_special_tokens=False)["input_ids"]
            ids.append(tokenizer.eos_token_id)
            if len(ids) >= block_size:
                break
        rows.append(ids[:block_size])
    return torch.tensor(rows, dtype=torch.long)  # (blocks, block_size)


@torch.no_grad()
def block_influence(model: PreTrainedModel, input_ids: Tensor,
                    batch_size: int = CALIBRATION_BATCH_SIZE) -> list[float]:
    """ShortGPT's Block Influence of each decoder layer: ``1 - mean cos(input, output)`` over every token of
    ``input_ids`` (B, T); 0 for a layer that leaves its input's direction as it is. Runs only the decoder (no output
    head), in eval mode, ``batch_size`` rows at a time."""
    layers = decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, Tensor] = {}

    def before(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        return hook

    def after(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            total[i] += torch.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1).sum().double().cpu()
        return hook

    handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i), with_kwargs=True) for i, layer in enumerate(layers)]
    training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in input_ids.split(batch_size):
            model.get_decoder()(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return (1.0 - total / input_ids.numel()).tolist()


def prune_layers(teacher: PreTrainedModel, layers: int | list[int] | None) -> PreTrainedModel:
    """A float32 copy of ``teacher`` keeping some of its decoder layers (depth pruning): ``layers`` evenly spaced
    ones (a number) or the ones listed; the kept indices are recorded as ``config.distill_teacher_layers``."""
    kept = select_layers(teacher, layers, "evenly" if isinstance(layers, int) else None)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds follow their layers
        config.layer_types = [config.layer_types[i] for i in kept]
    config._name_or_path = ""
    setattr(config, TEACHER_LAYERS, list(kept))
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source = teacher.state_dict()
    prefix = _layers_prefix(teacher)
    state = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            state[key] = source[f"{prefix}{kept[int(index)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict({k: v.detach().to(torch.float32).clone() for k, v in state.items()})
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.train()


def counterparts(student_config: Any, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer stands for: the ones it was copied from (``distill_teacher_layers``,
    when recorded and within a teacher of ``teacher_layers`` layers), else evenly spaced ones.

    Raises:
        ValueError: a student deeper than the teacher without a recorded map (name ``features.layers``).
    """
    depth = student_config.num_hidden_layers
    recorded = getattr(student_config, TEACHER_LAYERS, None)
    if isinstance(recorded, (list, tuple)) and len(recorded) == depth and all(0 <= i < teacher_layers
                                                                               for i in recorded):
        return list(recorded)
    if depth > teacher_layers:
        raise ValueError(f"the student has {depth} layers, the teacher {teacher_layers}: there is no evenly spaced "
                         "teacher layer for each; give features.layers={student_layer: teacher_layer, ...}")
    return evenly_spaced(teacher_layers, depth)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers`` for Llama, Qwen, Mistral, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    return model.get_submodule(_layers_prefix(model).rstrip("."))


def _layers_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the decoder layer list (``model.layers.`` for Llama, Qwen, Mistral, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return f"{name}."
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to prune")
