"""The methods' option groups: typed, documented and checked here, once.

Each group is a frozen dataclass that a method takes as one argument; YAML and the CLI take it as nested keys
(jsonargparse reads the types and these docstrings)::

    model:
      class_path: lightning_distill.SoftDistill
      init_args:
        optimization: {learning_rate: 0.002}
        on_policy: {lmbda: 0.5, loss: reverse_kl}

    lightning-distill fit ... --model.init_args.optimization.learning_rate 0.002

A bad value is a ``ValueError`` naming the field (``optimization.learning_rate``), the value and a valid one, raised
when the group is made. String choices are ``Literal`` types (the CLI lists them); every method shares
:class:`Optimization`, :class:`Performance` and :class:`Validation`; :class:`OnPolicy`, :class:`Features` and
:class:`Served` are SoftDistill's, :class:`Generation` HardDistill's, :class:`Schedule` CoDistill's, and
:class:`Teachers` (several named teachers, given as ``teacher=``) SoftDistill's and HardDistill's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_distill import checks
from lightning_distill.losses import Divergence

TeacherDtype = Literal["auto", "bfloat16", "float16", "float32"]
OnPolicyLoss = Literal["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd",
                       "sampled_token"]


@dataclass(frozen=True)
class Optimization:
    """AdamW (decay on matrices only) with linear warmup, then cosine decay, stepped every optimizer step.

    Args:
        learning_rate: peak learning rate of the student, > 0 (2e-3: best of a sweep for the 6-layer default student
            at the method table's budgets, see ``benchmarks/recipe_sweep.py``).
        weight_decay: AdamW weight decay, >= 0 (not applied to biases and norms).
        warmup_steps: linear warmup steps, >= 0; then cosine decay to ``min_lr_ratio * learning_rate`` at the last
            step.
        min_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].
        train_embeddings: train the student's token embeddings and output head (tied in SmolLM2). ``False`` keeps
            the teacher's vocabulary geometry fixed and trains only the transformer layers.
    """

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        checks.number("optimization.learning_rate", self.learning_rate, "> 0", lambda v: v > 0, "2e-3")
        checks.number("optimization.weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0, "0.0")
        checks.integer("optimization.warmup_steps", self.warmup_steps, ">= 0", lambda v: v >= 0, "10")
        checks.number("optimization.min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1, "0.1")
        checks.require(isinstance(self.train_embeddings, bool), "optimization.train_embeddings",
                       self.train_embeddings, "True or False")


@dataclass(frozen=True)
class Performance:
    """How a run uses the machine: memory, speed and layout. None of these changes what is computed beyond
    rounding (``teacher_dtype`` is the teacher's precision).

    Args:
        chunk_size: compute the loss from hidden states in chunks of this many positions, never holding the
            (B, T, V) logits (:func:`lightning_distill.losses.chunked_distill_loss`); 0: all at once. ``None``
            (default): the path ``benchmarks/speed.py`` measured fastest: chunks of 256 for a live teacher's hidden
            states and on CUDA, one pass for the rest on CPU.
        teacher_dtype: dtype of a frozen teacher's weights: ``"bfloat16"`` halves its memory and, on GPUs and CPUs
            with bf16 units, runs it faster; ``"auto"`` (default) picks bfloat16 where it is measured fast, else
            float32; ``None`` keeps float32.
        teacher_sharding: where a frozen teacher lives under FSDP (``--trainer.strategy fsdp``, or
            ``ModelParallelStrategy``): ``"shard"`` splits its decoder layers across ranks, each a unit in its own
            dtype, its embedding and head whole on every rank; ``"replicate"`` keeps all of it on every rank (a small
            teacher: no all-gathers). Unused without FSDP (:mod:`lightning_distill.sharding`).
        compile_student: ``torch.compile`` the student's decoder.
        compile_teacher: ``torch.compile`` a frozen teacher's decoder.
        liger_kernels: patch Liger Kernel's Llama kernels into both models (CUDA only; the ``bench`` extra).
    """

    chunk_size: int | None = None
    teacher_dtype: TeacherDtype | None = "auto"
    teacher_sharding: Literal["shard", "replicate"] = "shard"
    compile_student: bool = False
    compile_teacher: bool = False
    liger_kernels: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            checks.integer("performance.chunk_size", self.chunk_size, ">= 0 (0 disables chunking)",
                           lambda v: v >= 0, "256")
        if self.teacher_dtype is not None:
            checks.choice("performance.teacher_dtype", self.teacher_dtype, ("auto", "bfloat16", "float16", "float32"))
        checks.choice("performance.teacher_sharding", self.teacher_sharding, ("shard", "replicate"))
        for name in ("compile_student", "compile_teacher", "liger_kernels"):
            value = getattr(self, name)
            checks.require(isinstance(value, bool), f"performance.{name}", value, "True or False")


@dataclass(frozen=True)
class Validation:
    """What on-policy training optimizes, measured at each validation: the student continues each held-out block's
    first ``prompt_tokens`` greedily for ``new_tokens`` and the live teacher scores them (``val/teacher_logprob``,
    ``val/on_policy_rkl``).

    Args:
        new_tokens: tokens the student writes per block, >= 0; 0 (default) turns the metric off.
        prompt_tokens: the prompt length, >= 1.
    """

    new_tokens: int = 0
    prompt_tokens: int = 32

    def __post_init__(self) -> None:
        checks.integer("validation.new_tokens", self.new_tokens, ">= 0 (0 turns the metric off)", lambda v: v >= 0,
                       "0")
        checks.integer("validation.prompt_tokens", self.prompt_tokens, ">= 1", lambda v: v >= 1, "32")


@dataclass(frozen=True)
class OnPolicy:
    """On-policy distillation (SoftDistill): a share of the batches is replaced by the student's own continuations,
    graded token by token by the live teacher (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024).

    Args:
        lmbda: share of training batches that are on-policy, in [0, 1] (GKD's ``lmbda``): 0 never, 1 always.
        start: optimizer steps trained off-policy before on-policy batches begin (a pruned student's samples are
            noise at first), >= 0.
        loss: loss on the student's samples: a divergence (name or object; default reverse KL, as the on-policy
            papers use) over the full distributions, or ``"sampled_token"`` (only the teacher's log-prob of each
            sampled token, as a negative advantage; temperature 1).
        prompt_tokens: prompts are a block's first this-many tokens, or at most this many of a file prompt; >= 1.
        max_new_tokens: tokens the student samples per prompt, >= 1.
        temperature: the student's sampling temperature > 0 (1: its own distribution).
        top_p: the student's nucleus sampling mass in (0, 1].
        prompts: a JSONL prompt file (``{"prompt": ...}`` or ``{"messages": [...]}`` per line, the latter rendered
            with the chat template), or a list of them (several teachers: ``teacher.sources`` names each file's
            teacher); ``None``: prompts from the corpus blocks.
    """

    lmbda: float = 0.5
    start: int = 0
    loss: OnPolicyLoss | Divergence = "reverse_kl"
    prompt_tokens: int = 32
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    prompts: str | list[str] | None = None

    def __post_init__(self) -> None:
        checks.number("on_policy.lmbda", self.lmbda, "in [0, 1] (the share of on-policy batches)",
                      lambda v: 0 <= v <= 1, "0.5")
        checks.integer("on_policy.start", self.start, ">= 0 (optimizer steps)", lambda v: v >= 0, "0")
        if self.lmbda == 0 and self.start > 0:
            raise ValueError(f"on_policy.start={self.start} delays on-policy batches, but on_policy.lmbda=0 trains "
                             "none: set on_policy.lmbda > 0, or on_policy.start=0")
        checks.integer("on_policy.prompt_tokens", self.prompt_tokens, ">= 1", lambda v: v >= 1, "32")
        checks.integer("on_policy.max_new_tokens", self.max_new_tokens, ">= 1", lambda v: v >= 1, "64")
        checks.number("on_policy.temperature", self.temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("on_policy.top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1, "1.0")
        if isinstance(self.loss, str):
            checks.choice("on_policy.loss", self.loss, OnPolicyLoss.__args__)


@dataclass(frozen=True)
class Features:
    """Feature distillation (SoftDistill): each student layer's hidden states are matched to a teacher layer's,
    recorded during the teacher's forward that gives its distribution; ``loss += weight * feature_loss``.

    Args:
        weight: weight of the feature term, > 0.
        loss: ``"cosine"`` (1 - cosine similarity per token) or ``"mse"`` (MSE of layer-normalized states).
        layers: ``{student layer: teacher layer}`` to match; ``None``: every student layer to the teacher layer it
            was copied from (``from_teacher`` students), else to evenly spaced teacher layers.
    """

    weight: float = 1.0
    loss: Literal["cosine", "mse"] = "cosine"
    layers: dict[int, int] | None = None

    def __post_init__(self) -> None:
        checks.number("features.weight", self.weight, "> 0 (features=None turns the term off)", lambda v: v > 0,
                      "1.0")
        checks.choice("features.loss", self.loss, ("cosine", "mse"))
        if self.layers is not None:
            pairs = self.layers.items() if isinstance(self.layers, dict) else ()
            ok = bool(pairs) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                     for pair in pairs for i in pair)
            checks.require(ok, "features.layers", self.layers, "a map of student layer indices to teacher layer "
                           "indices (integers >= 0)", "e.g. {0: 0, 1: 5}")


@dataclass(frozen=True)
class Generation:
    """The teacher's continuations (HardDistill ``mode="generate"``): prompt, length and decoding.

    Args:
        prompt_tokens: the first this-many tokens of each block form the prompt, >= 1.
        max_new_tokens: length of the teacher's continuation, >= 1.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature > 0 (with ``do_sample``).
        top_p: nucleus mass in (0, 1] (with ``do_sample``).
        cache_dir: folder of stored continuations (reused across epochs and runs); default under the cache
            directory, in a subfolder keyed by teacher and generation settings.
    """

    prompt_tokens: int = 32
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        checks.integer("generation.prompt_tokens", self.prompt_tokens, ">= 1", lambda v: v >= 1, "32")
        checks.integer("generation.max_new_tokens", self.max_new_tokens, ">= 1", lambda v: v >= 1, "64")
        checks.require(isinstance(self.do_sample, bool), "generation.do_sample", self.do_sample, "True or False")
        checks.number("generation.temperature", self.temperature, "> 0", lambda v: v > 0, "1.0")
        checks.number("generation.top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1, "1.0")


@dataclass(frozen=True)
class Schedule:
    """CoDistill's schedule ``a(t)`` of the student's KD weight (up to ``kd_weight``).

    Args:
        kind: ``"constant"`` (``kd_weight`` from the first step), ``"linear"`` (a ramp from 0 over ``ramp_steps``
            optimizer steps) or ``"gated"`` (0 until the teacher's running (EMA) cross-entropy falls below
            ``gate_threshold``: the teacher has "matured").
        ramp_steps: ``linear``: steps to reach ``kd_weight``, >= 1.
        gate_threshold: ``gated``: teacher EMA cross-entropy (nats) below which KD switches on, > 0.
        gate_ema: ``gated``: EMA decay of the teacher's running cross-entropy, in [0, 1).
    """

    kind: Literal["constant", "linear", "gated"] = "linear"
    ramp_steps: int = 100
    gate_threshold: float = 4.0
    gate_ema: float = 0.9

    def __post_init__(self) -> None:
        checks.choice("schedule.kind", self.kind, ("constant", "linear", "gated"))
        checks.integer("schedule.ramp_steps", self.ramp_steps, ">= 1", lambda v: v >= 1, "100")
        checks.number("schedule.gate_threshold", self.gate_threshold, "> 0 (nats)", lambda v: v > 0, "4.0")
        checks.number("schedule.gate_ema", self.gate_ema, "in [0, 1)", lambda v: 0 <= v < 1, "0.9")


@dataclass(frozen=True)
class Served:
    """A teacher behind a server (SoftDistill's ``teacher="http://HOST:PORT"``, or a list of URLs of servers of the
    same teacher): what each batch asks of it, and how long a failing server is waited for. The server's API key is
    read from ``$LIGHTNING_DISTILL_API_KEY`` (never kept in the hyperparameters or a checkpoint).

    Args:
        k: ``topk``: ids per position asked of the server, in [1, its ``--max-logprobs``] (32: the label store's
            default).
        kind: ``"topk"`` (the k most likely ids, their log-probs and the mass they hold, as a top-k label store) or
            ``"sampled"`` (``num_samples`` draws, as a sampled store: ``lightning-distill serve`` only).
        num_samples: ``sampled``: draws per position, in [1, 255].
        protocol: ``"auto"`` (the binary endpoint of ``lightning-distill serve``, else vLLM's ``/v1/completions``),
            ``"binary"`` or ``"openai"``.
        value_dtype: the log-probs' precision on the wire and in the targets, as a store's: ``"float16"``,
            ``"bfloat16"`` or ``"float32"``.
        timeout: seconds one request may take, > 0.
        retry_for: seconds a failing server is retried, with exponential backoff, before the fit stops, >= 0.
        prefetch: ask for the next training batch's targets while the student computes the current one.
    """

    k: int = 32
    kind: Literal["topk", "sampled"] = "topk"
    num_samples: int = 12
    protocol: Literal["auto", "binary", "openai"] = "auto"
    value_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    timeout: float = 30.0
    retry_for: float = 120.0
    prefetch: bool = True

    def __post_init__(self) -> None:
        checks.integer("served.k", self.k, ">= 1 (at most the server's --max-logprobs)", lambda v: v >= 1, "32")
        checks.choice("served.kind", self.kind, ("topk", "sampled"))
        checks.integer("served.num_samples", self.num_samples, "in [1, 255]", lambda v: 1 <= v <= 255, "12")
        checks.choice("served.protocol", self.protocol, ("auto", "binary", "openai"))
        checks.choice("served.value_dtype", self.value_dtype, ("float16", "bfloat16", "float32"))
        checks.number("served.timeout", self.timeout, "> 0 (seconds)", lambda v: v > 0, "30.0")
        checks.number("served.retry_for", self.retry_for, ">= 0 (seconds)", lambda v: v >= 0, "120.0")
        checks.require(isinstance(self.prefetch, bool), "served.prefetch", self.prefetch, "True or False")
        if self.kind == "sampled" and self.protocol == "openai":
            raise ValueError("served.kind='sampled' draws on the server, which vLLM's completions API cannot: use "
                             "served.kind='topk', or lightning-distill serve (served.protocol='auto')")


@dataclass(frozen=True)
class Teachers:
    """Several named teachers in one run (SoftDistill, HardDistill ``mode="top1"``), and which of them grades which
    tokens: per source (each corpus entry or on-policy prompt file names its teacher: domain experts) or a weighted
    mixture of their distributions at every position.

    Args:
        models: teacher name (an identifier, e.g. ``code``) -> anything ``teacher=`` takes alone (the embedded
            default, a Hugging Face id or folder, a server's URL). The first is the run's main teacher: a
            ``from_teacher`` student is pruned from it and reads with its tokenizer, which every other must share.
        sources: corpus entry (as written in ``data.corpus``) or on-policy prompt file -> teacher name: each block,
            and each prompt's continuation, is graded by its source's teacher. Every corpus entry must be named.
        weights: teacher name -> weight > 0: every position is graded by the mixture ``sum_i w_i p_i`` of the
            teachers' (tempered) distributions, the weights normalized; live teachers only.
        labels: teacher name -> label store folder written by that teacher (``lightning-distill predict``): its
            targets are read from there; a store written by another teacher is refused.
    """

    models: dict[str, str]
    sources: dict[str, str] | None = None
    weights: dict[str, float] | None = None
    labels: dict[str, str] | None = None

    def __post_init__(self) -> None:
        models = self.models
        checks.require(isinstance(models, dict) and len(models) >= 2, "teacher.models", models,
                       "two or more named teachers", "e.g. {'code': 'builtin:smollm2-135m-instruct', 'prose': "
                       "'runs/prose-teacher'}; one teacher is teacher='NAME'")
        for name, spec in models.items():
            checks.require(isinstance(name, str) and name.isidentifier(), "teacher.models", name,
                           "teacher names that are identifiers", "e.g. 'code', 'prose'")
            checks.require(isinstance(spec, str) and bool(spec), f"teacher.models.{name}", spec,
                           "a model name, folder or server URL")
        checks.require((self.sources is None) != (self.weights is None), "teacher", self,
                       "exactly one rule: teacher.sources (per source) or teacher.weights (a mixture)",
                       "e.g. sources={'builtin:python-docs': 'code', 'builtin:shakespeare': 'prose'}")
        rules = (("sources", self.sources, lambda v: v in models, f"a teacher name ({', '.join(models)})"),
                 ("weights", self.weights, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                  "a weight > 0"),
                 ("labels", self.labels, lambda v: isinstance(v, str) and bool(v), "a label store folder"))
        for field, mapping, ok, expected in rules:
            if mapping is None:
                continue
            checks.require(isinstance(mapping, dict) and bool(mapping), f"teacher.{field}", mapping,
                           "a non-empty map")
            for key, value in mapping.items():
                checks.require(ok(value), f"teacher.{field}.{key}", value, expected)
        for field, mapping in (("weights", self.weights), ("labels", self.labels)):
            for name in mapping or {}:
                checks.require(name in models, f"teacher.{field}", name, f"a teacher name ({', '.join(models)})")

    @property
    def main(self) -> str:
        """The first teacher's name (the student is pruned from it; its tokenizer is the run's)."""
        return next(iter(self.models))


# A method's saved hyperparameters hold these: checkpoints load them with torch.load(weights_only=True).
torch.serialization.add_safe_globals([Optimization, Performance, Validation, OnPolicy, Features, Generation, Schedule,
                                      Served, Teachers])
