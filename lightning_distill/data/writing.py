"""Text a teacher writes itself: a request it makes up, then its answer, one JSONL line per document.

Distilling only on in-domain text narrows a student to that domain: the demo's student, trained on Python docs
alone, ends at 10.5x the teacher's perplexity on Shakespeare. Text the teacher wrote, mixed into training, is where
it shows the student its general skill (``builtin:smollm2-writing`` is such a corpus; the demo mixes it in, measured
in ``benchmarks/results/demo_recipe_sweep4.md``). No topic list steers what is written: the teacher samples each
request as a user turn of its own chat template (``user: <sampled>``), then answers it (``assistant: <sampled>``).

    lightning-distill write --teacher builtin:smollm2-135m-instruct --documents 144 --out writing.jsonl

Each line is ``{"request": ..., "text": ...}`` (train on ``text``: the corpus' default ``text_field``). Documents are
written a batch at a time and flushed; an interrupted run (Ctrl+C, a crash) resumes where the file ends and writes
the documents the uninterrupted run would have (batch ``i`` draws from a generator seeded by ``seed`` and ``i``).
The settings are kept beside the file (``FILE.settings.json``) and a resume with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_distill import checks
from lightning_distill.backbone import DEFAULT_TEACHER, as_dtype, load_teacher, load_tokenizer
from lightning_distill.files import atomic_write
from lightning_distill.generation import GenerationSettings, generate


@dataclass(frozen=True)
class WritingSettings:
    """What a written corpus depends on (a resume must use the same).

    Args:
        teacher: the model that writes (a chat model: its tokenizer needs a chat template).
        seed: seeds every batch's sampling (batch ``i``: ``seed * 1_000_003 + i``).
        batch_size: documents written per batch, >= 1.
        request_tokens: most tokens of a request, >= 1.
        max_new_tokens: most tokens of an answer, >= 1.
        temperature: sampling temperature of requests and answers, > 0 (1: the teacher's own distribution).
        top_p: nucleus mass in (0, 1] (below 1 drops the unlikely tail, where a small model's samples derail).
    """

    teacher: str = DEFAULT_TEACHER
    seed: int = 0
    batch_size: int = 48
    request_tokens: int = 48
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95

    def __post_init__(self) -> None:
        checks.require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", self.seed,
                       "an integer", "e.g. seed=0")
        for name in ("batch_size", "request_tokens", "max_new_tokens"):
            checks.integer(name, getattr(self, name), ">= 1", lambda v: v >= 1)
        GenerationSettings(self.max_new_tokens, True, self.temperature, self.top_p)  # checks temperature, top_p


def write_corpus(out: str | Path, documents: int, settings: WritingSettings = WritingSettings(),
                 dtype: torch.dtype | str | None = None, progress: bool = True) -> Path:
    """Have ``settings.teacher`` write ``documents`` documents into the JSONL file ``out`` (resuming it if it holds
    fewer, from a run with the same settings).

    Args:
        out: the JSONL file to write (its folder is created).
        documents: how many documents the file holds at the end, >= 1.
        settings: the teacher and the sampling.
        dtype: the teacher's dtype; ``None``: bfloat16 where this machine computes it fast (a CUDA device that has
            it, or a CPU with bf16 units), else float32.
        progress: show a progress bar.

    Returns:
        ``out`` as a path.

    Raises:
        ValueError: a bad argument, a teacher without a chat template, or ``out`` written with other settings.
    """
    checks.integer("documents", documents, ">= 1", lambda v: v >= 1, "144")
    out = Path(out)
    tokenizer = load_tokenizer(settings.teacher)
    prefix = _user_turn_prefix(tokenizer, settings.teacher)  # a chat model, or refused before anything is written
    done = _resume(out, out.with_name(out.name + ".settings.json"), settings)
    if done >= documents:
        return out
    model, _ = load_teacher(settings.teacher, dtype=as_dtype(dtype) or as_dtype("auto"),
                            device="cuda" if torch.cuda.is_available() else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as file, Progress(disable=not progress) as bar:
        task = bar.add_task(f"{settings.teacher} writes", total=documents, completed=done)
        for batch in range(done // settings.batch_size, -(-documents // settings.batch_size)):
            size = min(settings.batch_size, documents - batch * settings.batch_size)
            lines = write_batch(model, tokenizer, prefix, size, settings, settings.seed * 1_000_003 + batch)
            file.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            file.flush()
            os.fsync(file.fileno())
            bar.update(task, advance=size)
    return out


def write_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prefix: str, size: int,
                settings: WritingSettings, seed: int) -> list[dict[str, str]]:
    """``size`` documents: requests sampled after ``prefix`` (the start of a user turn), then their answers."""
    torch.manual_seed(seed)  # model.generate samples from the global generator (on the model's device too)
    start = tokenizer(prefix, return_tensors="pt", add_special_tokens=False).input_ids.repeat(size, 1)  # (S, P)
    eos = tokenizer.eos_token_id
    asked = generate(model, start.to(model.device), GenerationSettings(settings.request_tokens, True,
                                                                        settings.temperature, settings.top_p), eos)
    requests = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in asked]  # S texts
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                           add_generation_prompt=True) for r in requests]
    batch = tokenizer(chats, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    answers = generate(model, batch.input_ids.to(model.device), GenerationSettings(
        settings.max_new_tokens, True, settings.temperature, settings.top_p), eos,
        attention_mask=batch.attention_mask.to(model.device))  # (S, N)
    return [{"request": r, "text": tokenizer.decode(a, skip_special_tokens=True).strip()}
            for r, a in zip(requests, answers, strict=True)]


def _user_turn_prefix(tokenizer: PreTrainedTokenizerBase, teacher: str) -> str:
    """The chat template's text before a user message's content (system prompt included, if it adds one)."""
    marker = "\x00MESSAGE\x00"
    checks.require(getattr(tokenizer, "chat_template", None) is not None, "teacher", teacher,
                   "a chat model (its tokenizer has a chat template): the teacher writes requests as user turns",
                   "use an instruct/chat model, e.g. builtin:smollm2-135m-instruct")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


def _resume(out: Path, sidecar: Path, settings: WritingSettings) -> int:
    """Documents of an earlier run with the same settings kept in ``out`` (whole batches: a batch cut short by an
    interruption is dropped and written again); 0 for a new file."""
    wanted = asdict(settings)
    if not out.exists():
        atomic_write(sidecar, json.dumps(wanted, indent=2).encode())
        return 0
    earlier = json.loads(sidecar.read_text()) if sidecar.exists() else None
    if earlier != wanted:
        raise ValueError(f"out={str(out)!r} holds documents written with other settings ({earlier}, now {wanted}): "
                         "pass the same settings to go on with it, or another out (or delete it) to start anew")
    lines = out.read_bytes().split(b"\n")[:-1]  # whole lines (the last, without its newline, was cut short)
    keep = len(lines) // settings.batch_size * settings.batch_size
    atomic_write(out, b"".join(line + b"\n" for line in lines[:keep]))
    return keep


def main(argv: list[str] | None = None) -> Path:
    """``lightning-distill write --documents N --out FILE.jsonl [--teacher NAME ...]``: :func:`write_corpus`."""
    defaults = WritingSettings()
    parser = argparse.ArgumentParser(prog="lightning-distill write", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL file to write (an interrupted one is resumed)")
    parser.add_argument("--documents", type=int, required=True, help="documents the file holds at the end")
    parser.add_argument("--teacher", default=defaults.teacher, help="the chat model that writes")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--request-tokens", type=int, default=defaults.request_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--dtype", default=None, help="the teacher's dtype (default: bf16 where fast, else fp32)")
    args = parser.parse_args(argv)
    settings = WritingSettings(args.teacher, args.seed, args.batch_size, args.request_tokens, args.max_new_tokens,
                               args.temperature, args.top_p)
    path = write_corpus(args.out, args.documents, settings, dtype=args.dtype)
    print(f"wrote {path}: train on it with DistillDataModule(corpus=[..., {str(path)!r}])")
    return path
