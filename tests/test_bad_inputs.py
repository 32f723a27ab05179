"""Bad input is never accepted silently and never answered by a raw dependency error: each row below must raise a
``ValueError`` (a file in the way: ``FileExistsError``) whose message names the argument and the value, before any
training step; and the CLI shows such a message without a traceback. Rerunning a finished labelling is a no-op."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import TINY_STUDENT, make_tiny_model_dir, small_data, tiny_data, tiny_trainer, write_labels

from lightning_distill import (
    CoDistill,
    DistillDataModule,
    Features,
    Generation,
    HardDistill,
    OnPolicy,
    Optimization,
    Performance,
    Schedule,
    Served,
    SoftDistill,
    Validation,
)
from lightning_distill.callbacks import ExportStudent, OfflineFirstWandbLogger, SampleTable
from lightning_distill.cli import export, load_checkpoint, main
from lightning_distill.cli import run as cli_run
from lightning_distill.data.sampler import ResumableSampler
from lightning_distill.demo import parse as demo_parse
from lightning_distill.losses import GeneralizedJSD
from lightning_distill.serve.command import build as build_server
from lightning_distill.serve.command import parser as serve_parser
from lightning_distill.store import LabelWriter, read_manifest

ROOT = Path(__file__).parents[1]
SERVER = "http://127.0.0.1:9"  # a teacher server's URL (nothing listens there: these rows fail before asking it)


@dataclass
class Ctx:
    teacher: str
    tmp: Path

    def file(self, name: str, data: bytes | str = "some text") -> str:
        path = self.tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def folder(self, name: str) -> str:
        (self.tmp / name).mkdir(exist_ok=True)
        return str(self.tmp / name)


def fit(model, data=None, **trainer_kwargs):
    """Start a fit on CPU (a bad input must stop it in setup, before the first step)."""
    tiny_trainer(Path(os.getcwd()), max_steps=1, **trainer_kwargs).fit(model, data or tiny_data())


def built(model):
    model.configure_model()
    return model


def small_student(vocab_size: int) -> dict:
    return {"config": {"vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2}}


def soft(ctx: Ctx, **kwargs) -> SoftDistill:
    return SoftDistill(**{"teacher": ctx.teacher, "student": TINY_STUDENT, **kwargs})


def without_cuda(make):
    """``make()`` as on a machine without CUDA (the CPU's answer to a CUDA-only argument)."""
    with mock.patch("torch.cuda.is_available", return_value=False):
        return make()


def generating(ctx: Ctx, **kwargs) -> HardDistill:
    return HardDistill(teacher=ctx.teacher, student=TINY_STUDENT, mode="generate", **kwargs)


TINY_SOFT = str(ROOT / "configs" / "tiny" / "soft.yaml")


def cli(ctx: Ctx, *words: str, command: str = "fit") -> None:
    """``lightning-distill COMMAND`` with the tiny SoftDistill config and these words (errors raised, not printed)."""
    cli_run([command, "--config", TINY_SOFT, "--model.init_args.teacher", ctx.teacher, *words])


def soft_checkpoint(ctx: Ctx) -> str:
    """A checkpoint of the tiny SoftDistill (2-layer student) after one step."""
    trainer = tiny_trainer(ctx.tmp, max_steps=1, limit_val_batches=0)
    trainer.fit(soft(ctx), tiny_data())
    trainer.save_checkpoint(ctx.tmp / "soft.ckpt")
    return str(ctx.tmp / "soft.ckpt")


def resume(model, checkpoint: str) -> None:
    """Go on with a fit from ``checkpoint`` (refused before the first step)."""
    tiny_trainer(Path(os.getcwd()), max_steps=2).fit(model, tiny_data(), ckpt_path=checkpoint)


def truncated(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def store(ctx: Ctx, teacher: str | None = None, splits: tuple[str, ...] = ("validation",),
          **manifest_changes) -> str:
    """A small top-k store labelled by ``teacher`` (default the tiny one), its manifest then edited."""
    path = Path(write_labels(SoftDistill(teacher=teacher or ctx.teacher, student=TINY_STUDENT), ctx.tmp / "store",
                             kind="topk", k=8, splits=list(splits)))
    manifest = read_manifest(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return str(path)


def other_teacher(ctx: Ctx) -> str:
    """A teacher of the same architecture and tokenizer as the tiny one, other weights."""
    return str(make_tiny_model_dir(ctx.tmp / "other_teacher", seed=1))


# (id, what is done with the bad input, the error's message: it names the argument and the value)
BAD_INPUTS = [
    # --- the methods' arguments and their option groups
    ("learning_rate as a string", lambda c: soft(c, optimization=Optimization(learning_rate="1e-3")),
     r"optimization.learning_rate must be a number > 0, got the string '1e-3': write it without quotes"),
    ("learning_rate zero", lambda c: Optimization(learning_rate=0),
     r"optimization.learning_rate must be a number > 0, got 0"),
    ("weight_decay negative", lambda c: Optimization(weight_decay=-0.1),
     r"optimization.weight_decay must be a number >= 0, got -0.1"),
    ("warmup_steps fractional", lambda c: Optimization(warmup_steps=2.5),
     r"optimization.warmup_steps must be an integer >= 0, got 2.5"),
    ("min_lr_ratio above 1", lambda c: Optimization(min_lr_ratio=1.5),
     r"optimization.min_lr_ratio must be a number in \[0, 1\], got 1.5"),
    ("optimization as a dict", lambda c: soft(c, optimization={"learning_rate": 1e-3}),
     r"optimization must be Optimization\(...\), got \{'learning_rate': 0.001\}: write "
     r"optimization=Optimization\(...\) \(from lightning_distill.options\)"),
    ("chunk_size negative", lambda c: Performance(chunk_size=-1), r"performance.chunk_size must be an integer >= 0"),
    ("compile_student as a string", lambda c: Performance(compile_student="yes"),
     r"performance.compile_student must be True or False, got 'yes'"),
    ("compile_teacher of a trained teacher",
     lambda c: CoDistill(teacher=c.teacher, performance=Performance(compile_teacher=True)),
     r"compile_teacher=True compiles a frozen teacher, but this method trains its teacher"),
    ("compile_teacher without a teacher kept",
     lambda c: built(soft(c, labels="/no/such/store", performance=Performance(compile_teacher=True))),
     r"compile_teacher=True, but this run keeps no teacher in memory \(stored labels"),
    ("liger_kernels without CUDA",
     lambda c: without_cuda(lambda: soft(c, performance=Performance(liger_kernels=True))),
     r"liger_kernels=True needs a CUDA device"),
    ("teacher_dtype unknown", lambda c: Performance(teacher_dtype="float33"),
     r"performance.teacher_dtype must be one of 'auto', 'bfloat16', 'float16', 'float32', got 'float33'"),
    ("teacher_sharding unknown", lambda c: Performance(teacher_sharding="split"),
     r"performance.teacher_sharding must be one of 'shard', 'replicate', got 'split'"),
    ("validation new_tokens negative", lambda c: Validation(new_tokens=-1),
     r"validation.new_tokens must be an integer >= 0"),
    ("temperature zero", lambda c: soft(c, temperature=0), r"temperature must be a number > 0, got 0"),
    ("temperature as a string", lambda c: soft(c, temperature="2"),
     r"temperature must be a number > 0, got the string '2'"),
    ("ce_weight above 1", lambda c: soft(c, ce_weight=1.5), r"ce_weight must be a number in \[0, 1\].*1.5"),
    ("loss unknown", lambda c: soft(c, loss="kl_div"), r"loss must be a Divergence or one of .*got 'kl_div'"),
    ("beta out of range", lambda c: soft(c, loss=GeneralizedJSD(beta=2)), r"beta must be in \[0, 1\], got 2"),
    ("tail renorm with reverse KL", lambda c: soft(c, loss="reverse_kl", tail="renorm"),
     r"tail='renorm'.*use tail='bucket' with loss='reverse_kl'"),
    ("tail unknown", lambda c: soft(c, tail="drop"), r"tail must be one of 'bucket', 'renorm', got 'drop'"),
    ("on_policy lmbda above 1", lambda c: OnPolicy(lmbda=1.5),
     r"on_policy.lmbda must be a number in \[0, 1\] \(the share of on-policy batches\), got 1.5"),
    ("on_policy loss unknown", lambda c: OnPolicy(loss="kl"),
     r"on_policy.loss must be one of 'forward_kl', .*'sampled_token', got 'kl'"),
    ("on_policy top_p zero", lambda c: OnPolicy(top_p=0), r"on_policy.top_p must be a number in \(0, 1\], got 0"),
    ("on_policy with stored labels", lambda c: soft(c, on_policy=OnPolicy(), labels="/no/such/store"),
     r"on_policy=OnPolicy\(.*\) needs a live teacher to grade the student's samples, but labels='/no/such/store'"),
    ("features weight negative", lambda c: soft(c, features=Features(weight=-1.0)),
     r"features.weight must be a number > 0 \(features=None turns the term off\), got -1.0"),
    ("features weight as a string", lambda c: Features(weight="1"),
     r"features.weight must be a number > 0 .*got the string '1': write it without quotes"),
    ("features loss unknown", lambda c: Features(loss="l1"),
     r"features.loss must be one of 'cosine', 'mse', got 'l1'"),
    ("features layers a list", lambda c: Features(layers=[0, 1]),
     r"features.layers must be a map of student layer indices to teacher layer indices .*got \[0, 1\]"),
    ("features layers outside the teacher", lambda c: built(soft(c, features=Features(layers={1: 7}))),
     r"features.layers=\{1: 7\} maps \{1: 7\} outside the models: .*the teacher 0..3"),
    ("features with stored labels", lambda c: soft(c, features=Features(), labels="/no/such/store"),
     r"features=Features\(.*\) matches the teacher's hidden states, which the label store labels='/no/such/store' "
     r"does not hold"),
    ("features on-policy", lambda c: soft(c, features=Features(), on_policy=OnPolicy(lmbda=0.5)),
     r"features=Features\(.*\) matches hidden states on the corpus text, but on_policy trains on the student's"),
    ("hard mode unknown", lambda c: HardDistill(teacher=c.teacher, mode="beam"),
     r"mode must be one of 'top1', 'generate', got 'beam'"),
    ("hard prompt_tokens zero", lambda c: Generation(prompt_tokens=0),
     r"generation.prompt_tokens must be an integer >= 1, got 0"),
    ("hard prompt_tokens as a string", lambda c: Generation(prompt_tokens="8"),
     r"generation.prompt_tokens must be an integer >= 1, got '8': write it without quotes"),
    ("hard max_new_tokens zero", lambda c: Generation(max_new_tokens=0),
     r"generation.max_new_tokens must be an integer >= 1, got 0"),
    ("hard sampling temperature zero", lambda c: Generation(do_sample=True, temperature=0),
     r"generation.temperature must be a number > 0, got 0"),
    ("hard top_p zero", lambda c: Generation(do_sample=True, top_p=0),
     r"generation.top_p must be a number in \(0, 1\], got 0"),
    ("hard generation as a dict", lambda c: HardDistill(teacher=c.teacher, generation={"prompt_tokens": 8}),
     r"generation must be Generation\(...\), got \{'prompt_tokens': 8\}"),
    ("co without a teacher", lambda c: CoDistill(teacher=None),
     r"teacher must be a model name or \{'config': \{...\}\}, got None: CoDistill trains its teacher"),
    ("co kd_weight above 1", lambda c: CoDistill(teacher=c.teacher, kd_weight=2),
     r"kd_weight must be a number in \[0, 1\], got 2"),
    ("co schedule unknown", lambda c: Schedule(kind="cosine"),
     r"schedule.kind must be one of 'constant', 'linear', 'gated', got 'cosine'"),
    ("co schedule as a string", lambda c: CoDistill(teacher=c.teacher, schedule="linear"),
     r"schedule must be Schedule\(...\), got 'linear': write e.g. schedule=Schedule\(kind='linear'\)"),
    ("co ramp_steps zero", lambda c: Schedule(ramp_steps=0),
     r"schedule.ramp_steps must be an integer >= 1, got 0"),
    ("co gate_ema 1", lambda c: Schedule(gate_ema=1.0),
     r"schedule.gate_ema must be a number in \[0, 1\), got 1.0"),
    ("co gate_threshold as a string", lambda c: Schedule(gate_threshold="4"),
     r"schedule.gate_threshold must be a number > 0 \(nats\), got the string '4'"),
    ("co mutual_weight negative", lambda c: CoDistill(teacher=c.teacher, mutual_weight=-1),
     r"mutual_weight must be a number >= 0"),
    ("co stale_every negative", lambda c: CoDistill(teacher=c.teacher, stale_every=-1),
     r"stale_every must be an integer >= 0"),
    ("co teacher_learning_rate as a string", lambda c: CoDistill(teacher=c.teacher, teacher_learning_rate="5e-5"),
     r"teacher_learning_rate must be a number > 0, got the string '5e-5'"),
    # --- models: teachers and students that are not there or do not fit
    ("teacher folder missing", lambda c: soft(c, teacher="/no/such/teacher"),
     r"teacher='/no/such/teacher': no such folder \(/no/such/teacher\)"),
    ("teacher relative folder missing", lambda c: soft(c, teacher="./gone/teacher"),
     r"teacher='./gone/teacher': no such folder"),
    ("teacher under an existing local folder", lambda c: c.folder("models") and soft(c, teacher="models/teacher"),
     r"teacher='models/teacher': no such folder"),
    ("teacher is a file", lambda c: soft(c, teacher=c.file("teacher.bin")),
     r"teacher='.*teacher.bin' is a file, not a model folder"),
    ("teacher folder is empty", lambda c: soft(c, teacher=c.folder("empty")),
     r"teacher='.*empty' is a folder without config.json"),
    ("teacher builtin unknown", lambda c: soft(c, teacher="builtin:gpt-5"),
     r"teacher='builtin:gpt-5' is an unknown builtin model"),
    ("teacher empty name", lambda c: soft(c, teacher=""), r"teacher must be a model name .*got ''"),
    ("student spec unknown", lambda c: built(soft(c, student={"bogus": 1})),
     r"student must be a model name, \{'from_teacher'.*got \{'bogus': 1\}"),
    ("student keeps more layers than the teacher has",
     lambda c: built(soft(c, student={"from_teacher": {"layers": 99}})),
     r"layers must be between 1 and the teacher's 4 layers, got 99"),
    ("student keeps more important layers than the teacher has",
     lambda c: built(soft(c, student={"from_teacher": {"layers": 5, "select": "importance"}})),
     r"layers must be between 1 and the teacher's 4 layers, got 5"),
    ("student layer selection unknown", lambda c: built(soft(c, student={"from_teacher": {"layers": 2,
                                                                                          "select": "best"}})),
     r"student.from_teacher.select must be one of 'evenly', 'importance', got 'best'"),
    ("student lists a teacher layer twice", lambda c: built(soft(c, student={"from_teacher": {"layers": [1, 1]}})),
     r"student.from_teacher.layers must be a list of distinct teacher layers, got \[1, 1\]: give each once"),
    ("student lists a layer the teacher lacks", lambda c: built(soft(c, student={"from_teacher": {"layers": [0, 4]}})),
     r"student.from_teacher.layers must be a list of teacher layer indices in \[0, 3\], got \[0, 4\]"),
    ("student folder missing", lambda c: built(soft(c, student="/no/such/student")),
     r"student='/no/such/student': no such folder"),
    ("student vocabulary differs (soft)", lambda c: built(soft(c, student=small_student(500))),
     r"student=.* predicts 500 token ids, teacher=.* 384: distillation compares them id by id"),
    ("student vocabulary differs (hard top1)",
     lambda c: built(HardDistill(teacher=c.teacher, mode="top1", student=small_student(500))),
     r"predicts 500 token ids.*HardDistill\(mode='generate'\)"),
    ("student vocabulary smaller than the tokenizer (hard generate)",
     lambda c: built(HardDistill(teacher=c.teacher, mode="generate", student=small_student(100))),
     r"student=.* has 100 token ids, fewer than the tokenizer's 384"),
    ("hard prompt longer than the block",
     lambda c: fit(generating(c, generation=Generation(prompt_tokens=40, max_new_tokens=4))),
     r"generation.prompt_tokens=40 is longer than the data's block_size=32"),
    ("hard prompt + new tokens past the positions",
     lambda c: fit(generating(c, generation=Generation(prompt_tokens=8, max_new_tokens=600))),
     r"generation.prompt_tokens \+ max_new_tokens = 608 is more than the models' 512 positions: use "
     r"max_new_tokens <= 504"),
    ("labels folder missing", lambda c: fit(soft(c, labels="/no/such/store")),
     r"labels='/no/such/store' is not a label store \(no manifest.json\)"),
    ("labels manifest truncated",
     lambda c: read_manifest(Path(c.file("manifest.json", '{"kind": "topk", "spl')).parent),
     r"labels='.*': manifest.json is not valid JSON .*label the corpus again"),
    # --- data
    ("corpus file missing", lambda c: DistillDataModule(corpus="/no/such/corpus.txt"),
     r"corpus entry '/no/such/corpus.txt' does not exist"),
    ("corpus builtin unknown", lambda c: DistillDataModule(corpus="builtin:wikipedia"),
     r"corpus must be a known builtin corpus \(builtin:python-docs, builtin:shakespeare, builtin:smollm2-writing\), "
     r"got 'builtin:wikipedia'"),
    ("corpus glob matches nothing", lambda c: DistillDataModule(corpus=str(c.tmp / "*.nothing")),
     r"corpus glob .* matches no file"),
    ("corpus is a binary file",
     lambda c: fit(soft(c), DistillDataModule(corpus=c.file("model.bin", bytes(range(256)) * 64))),
     r"corpus file '.*model.bin' is not UTF-8 text .*NUL bytes"),
    ("corpus is an empty file", lambda c: fit(soft(c), DistillDataModule(corpus=c.file("empty.txt", "  \n"))),
     r"holds no text"),
    ("corpus JSONL line is not JSON",
     lambda c: fit(soft(c), DistillDataModule(corpus=c.file("bad.jsonl", '{"text": "a"}\n{oops\n'))),
     r"bad.jsonl, line 2: not valid JSON"),
    ("block_size 1", lambda c: DistillDataModule(block_size=1), r"block_size must be an integer >= 2, got 1"),
    ("batch_size zero", lambda c: DistillDataModule(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    ("val_fraction 1", lambda c: DistillDataModule(val_fraction=1.0),
     r"val_fraction must be a number strictly between 0 and 1"),
    ("seed as a string", lambda c: DistillDataModule(seed="0"), r"seed must be an integer, got '0'"),
    ("max_documents 1", lambda c: DistillDataModule(max_documents=1), r"max_documents must be an integer >= 2"),
    ("text_field empty", lambda c: DistillDataModule(text_field=""), r"text_field must be a non-empty field name"),
    ("block_size past the model's positions", lambda c: fit(soft(c), tiny_data(block_size=1024)),
     r"block_size=1024 is larger than the model's maximum of 512 positions"),
    ("sampler start negative", lambda c: ResumableSampler(range(4), start=-1), r"start must be >= 0, got -1"),
    # --- checkpoints and export
    ("export checkpoint missing", lambda c: export(["--ckpt", str(c.tmp / "none.ckpt"), "--out", str(c.tmp / "o")]),
     r"--ckpt='.*none.ckpt' does not exist"),
    ("export checkpoint is a folder", lambda c: export(["--ckpt", c.folder("ckpts"), "--out", str(c.tmp / "o")]),
     r"--ckpt='.*ckpts' is a folder"),
    ("export checkpoint is not a checkpoint",
     lambda c: export(["--ckpt", c.file("notes.ckpt", "hello"), "--out", str(c.tmp / "o")]),
     r"--ckpt='.*notes.ckpt' is not a PyTorch checkpoint"),
    ("export checkpoint of something else",
     lambda c: torch.save({"state_dict": {}}, c.tmp / "other.ckpt") or load_checkpoint(str(c.tmp / "other.ckpt")),
     r"was not written by a lightning_distill module"),
    ("load_from_checkpoint of a missing file", lambda c: SoftDistill.load_from_checkpoint(str(c.tmp / "none.ckpt")),
     r"checkpoint_path='.*none.ckpt' does not exist"),
    ("export into an existing file", lambda c: built(soft(c)).export(c.file("student.txt")),
     r"the export folder '.*student.txt' is a file"),
    # --- labelling and callbacks
    ("label kind unknown", lambda c: LabelWriter(str(c.tmp / "s"), kind="logits"),
     r"kind must be one of .*got 'logits'"),
    ("label k zero", lambda c: LabelWriter(str(c.tmp / "s"), k=0), r"k must be an integer in \[1, inf\], got 0"),
    ("label path empty", lambda c: LabelWriter(""), r"path must be the folder to write the label store to, got ''"),
    ("sample table every 0 validations", lambda c: SampleTable(every_n_validations=0),
     r"every_n_validations must be an integer >= 1, got 0"),
    ("export artifact name with a space", lambda c: ExportStudent(artifact_name="my student"),
     r"artifact_name must be letters.*got 'my student'"),
    ("W&B project empty", lambda c: OfflineFirstWandbLogger(project=""),
     r"project must be a non-empty W&B project name"),
    # --- a teacher behind a server (the server's own answers: tests/serve/test_server.py)
    ("served k zero", lambda c: Served(k=0), r"served.k must be an integer >= 1 \(at most the server's --max-logprobs"),
    ("served kind unknown", lambda c: Served(kind="logits"),
     r"served.kind must be one of 'topk', 'sampled', got 'logits'"),
    ("served num_samples zero", lambda c: Served(kind="sampled", num_samples=0),
     r"served.num_samples must be an integer in \[1, 255\], got 0"),
    ("served protocol unknown", lambda c: Served(protocol="grpc"),
     r"served.protocol must be one of 'auto', 'binary', 'openai', got 'grpc'"),
    ("served value_dtype unknown", lambda c: Served(value_dtype="int8"),
     r"served.value_dtype must be one of 'float16', 'bfloat16', 'float32', got 'int8'"),
    ("served timeout zero", lambda c: Served(timeout=0), r"served.timeout must be a number > 0 \(seconds\), got 0"),
    ("served retry_for negative", lambda c: Served(retry_for=-1),
     r"served.retry_for must be a number >= 0 \(seconds\), got -1"),
    ("served prefetch as a string", lambda c: Served(prefetch="yes"),
     r"served.prefetch must be True or False, got 'yes'"),
    ("served sampled over vLLM's API", lambda c: Served(kind="sampled", protocol="openai"),
     r"served.kind='sampled' draws on the server, which vLLM's completions API cannot"),
    ("served options without a server", lambda c: soft(c, served=Served(k=8)),
     r"served=Served\(k=8.*\) sets how a teacher server is asked, but teacher='.*' is not a server's URL"),
    ("served options as a dict", lambda c: soft(c, teacher=SERVER, tokenizer=c.teacher, served={"k": 8}),
     r"served must be Served\(...\), got \{'k': 8\}"),
    ("served teacher with stored labels", lambda c: soft(c, teacher=SERVER, tokenizer=c.teacher, labels="/no/store"),
     r"labels='/no/store' and teacher='http://127.0.0.1:9' are two teacher signals"),
    ("served teacher with features", lambda c: soft(c, teacher=SERVER, tokenizer=c.teacher, features=Features()),
     r"features=Features\(.*\) matches the teacher's hidden states, which teacher='http://127.0.0.1:9' keeps on"),
    ("served teacher pruned without a local copy", lambda c: SoftDistill(teacher=SERVER, student=TINY_STUDENT),
     r"student=\{'from_teacher'.*prunes the teacher's weights, but teacher='http://127.0.0.1:9' keeps them on the "
     r"server: name a local copy of the same teacher with tokenizer=NAME"),
    ("served teacher for CoDistill", lambda c: CoDistill(teacher=SERVER, tokenizer=c.teacher),
     r"teacher='http://127.0.0.1:9' is a teacher behind a server, which CoDistill cannot ask \(it needs the model "
     r"itself\): use SoftDistill\(teacher=...\) or HardDistill\(teacher=..., mode='top1'\)"),
    ("served teacher for HardDistill generate",
     lambda c: HardDistill(teacher=SERVER, tokenizer=c.teacher, mode="generate"),
     r"mode='generate' has the teacher write whole continuations, but teacher='http://127.0.0.1:9' is served"),
    ("served teacher for HardDistill with stored labels",
     lambda c: HardDistill(teacher=SERVER, tokenizer=c.teacher, labels="/no/store"),
     r"labels='/no/store' and teacher='http://127.0.0.1:9' are two teacher signals"),
    ("served options for HardDistill without a server", lambda c: HardDistill(teacher=c.teacher, served=Served(k=4)),
     r"served=Served\(k=4.*\) sets how a teacher server is asked, but teacher='.*' is not a server's URL"),
    ("served sampled with reverse KL",
     lambda c: soft(c, teacher=SERVER, tokenizer=c.teacher, loss="reverse_kl", served=Served(kind="sampled")),
     r"loss='reverse_kl' has no unbiased estimate from sampled targets"),
    ("served teacher list with a model name", lambda c: soft(c, teacher=[SERVER, c.teacher], tokenizer=c.teacher),
     r"teacher must be a model name, or a list of http:// URLs of servers of the same teacher"),
    ("serve port below 1024", lambda c: build_server(serve_parser().parse_args(["--port", "80"])),
     r"--port must be an integer in \[1024, 65535\], got 80"),
    ("serve host another machine's", lambda c: build_server(serve_parser().parse_args(["--host", "10.0.0.2"])),
     r"--host must be one of '127.0.0.1', '0.0.0.0', '::', got '10.0.0.2'"),
    ("serve max_logprobs zero", lambda c: build_server(serve_parser().parse_args(["--max-logprobs", "0"])),
     r"--max-logprobs must be an integer >= 1, got 0"),
    ("serve dtype unknown", lambda c: build_server(serve_parser().parse_args(["--dtype", "float8"])),
     r"--dtype must be one of 'auto', 'bfloat16', 'float16', 'float32', got 'float8'"),
    ("serve api key blank", lambda c: build_server(serve_parser().parse_args(["--api-key", " "])),
     r"--api-key must be a non-empty key, got ' '"),
    # --- nothing silently wrong, part two (issue #23): accepted silently or unclear before
    ("learning_rate 1e12 (the loss becomes NaN)",
     lambda c: tiny_trainer(c.tmp, max_steps=4, limit_val_batches=0).fit(
         soft(c, optimization=Optimization(learning_rate=1e12, warmup_steps=0)), tiny_data()),
     r"became NaN or infinite in step 2: the run stops before that step changes the weights.*"
     r"optimization.learning_rate=1e\+12"),
    ("max_steps 0", lambda c: cli(c, "--trainer.max_steps", "0"),
     r"--trainer.max_steps must be an integer >= 1, or -1 for no limit .*got 0"),
    ("max_steps -5", lambda c: cli(c, "--trainer.max_steps", "-5"), r"--trainer.max_steps must be an integer >= 1.*"
                                                                     r"got -5"),
    ("devices 0", lambda c: cli(c, "--trainer.devices", "0"),
     r"--trainer.devices must be an integer >= 1, or -1 for every device, got 0"),
    ("accumulate_grad_batches 0", lambda c: cli(c, "--trainer.accumulate_grad_batches", "0"),
     r"--trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    ("a mistyped option is not prefix-matched", lambda c: cli(c, "--trainer.max_step", "3"),
     r"unknown option\(s\): --trainer.max_step \(did you mean --trainer.max_steps\?\): options are matched exactly"),
    ("temperature inf (CLI)", lambda c: cli(c, "--model.init_args.temperature", "inf"),
     r"--model.init_args.temperature must be a finite number, got 'inf'$"),
    ("temperature nan (CLI)", lambda c: cli(c, "--model.init_args.temperature", "nan"),
     r"--model.init_args.temperature must be a finite number, got 'nan'$"),
    ("temperature inf", lambda c: soft(c, temperature=float("inf")), r"temperature must be a number > 0, got inf"),
    ("on_policy loss unknown (CLI)", lambda c: cli(c, "--model.init_args.on_policy.loss", "kl"),
     r"--model.init_args.on_policy.loss must be one of 'forward_kl', 'reverse_kl'.* or a class path .*got 'kl'$"),
    ("predict without a label writer", lambda c: cli(c, command="predict"),
     r"predict labels a corpus into a label store through a LabelWriter callback, and this config has none"),
    ("ckpt_path a text file", lambda c: cli(c, "--ckpt_path", c.file("notes.txt", "hello")),
     r"--ckpt_path='.*notes.txt' is not a PyTorch checkpoint"),
    ("ckpt_path a truncated checkpoint", lambda c: cli(c, "--ckpt_path", truncated(soft_checkpoint(c))),
     r"--ckpt_path='.*soft.ckpt' is not a PyTorch checkpoint"),
    ("resume a SoftDistill checkpoint as HardDistill",
     lambda c: resume(HardDistill(teacher=c.teacher, student=TINY_STUDENT), soft_checkpoint(c)),
     r"this checkpoint was written by SoftDistill, not HardDistill"),
    ("resume a 2-layer checkpoint with a 3-layer student",
     lambda c: resume(soft(c, student={"from_teacher": {"layers": 3}}), soft_checkpoint(c)),
     r"this checkpoint's student has num_hidden_layers=2, the model being restored num_hidden_layers=3"),
    ("demo steps negative", lambda c: demo_parse(["--steps", "-1"]), r"--steps must be an integer >= 1, got -1"),
    ("export into a folder that holds files",
     lambda c: c.file("notes.txt") and export(["--ckpt", soft_checkpoint(c), "--out", str(c.tmp)]),
     r"--out='.*' already holds files \(.*notes.txt.*\): export into a new or empty folder, or pass --overwrite"),
    ("label store manifest with an edited k", lambda c: fit(soft(c, labels=store(c, k=16)), small_data()),
     r"manifest.json says kind='topk', k=16, .* but its records are laid out as .*: the manifest was edited"),
    ("label store of another teacher", lambda c: fit(soft(c, labels=store(c, teacher=other_teacher(c))), small_data()),
     r"labels='.*store' was labelled by teacher '.*other_teacher' \(config \w+, weights \w+\), and teacher='.*' is "
     r"another model .*pass labels_any_teacher=True"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case, tiny_teacher_dir, tmp_path, monkeypatch):
    _, act, message = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name taken for a Hub id must never wait on a network
    with pytest.raises((ValueError, FileExistsError), match=message):
        act(Ctx(tiny_teacher_dir, tmp_path))


def test_the_table_is_long_enough():
    assert len(BAD_INPUTS) >= 40 and len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_rerunning_a_finished_labelling_is_a_no_op_that_says_so(tiny_teacher_dir, tmp_path, caplog):
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    path = write_labels(model, tmp_path / "store", kind="top1", splits=["validation"])
    manifest = (Path(path) / "manifest.json").read_bytes()
    write_labels(model, tmp_path / "store", kind="top1", splits=["validation"])  # the same command again
    assert (Path(path) / "manifest.json").read_bytes() == manifest
    assert "already complete with these settings; nothing to do" in caplog.text
    with pytest.raises(FileExistsError, match="temperature differ"):
        write_labels(model, tmp_path / "store", kind="top1", splits=["validation"], temperature=2.0)
    assert read_manifest(path)["complete"]


def test_the_cli_shows_a_bad_argument_without_a_traceback(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    config = ROOT / "configs" / "tiny" / "soft.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--model.init_args.teacher", tiny_teacher_dir,
              "--model.init_args.temperature", "-1"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in error
    assert "lightning-distill: error: temperature must be a number > 0, got -1.0" in error
    assert "Union subtypes" not in error  # jsonargparse's summary of the types it tried is left out
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt", "missing.ckpt", "--out", "x"])
    assert exit_.value.code == 2 and "--ckpt='missing.ckpt' does not exist" in capsys.readouterr().err


def test_a_parse_error_is_one_message_without_the_usage_dump(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """jsonargparse would print its ~80-line usage around the message; the CLI prints the message alone. A dotted
    key inside the student's dict is read as YAML (an integer), as in a config file."""
    from lightning_distill.cli import DistillCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", TINY_SOFT, "--model.init_args.teacher", tiny_teacher_dir,
              "--model.init_args.temperature", "nan"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage:" not in error and len(error.strip().splitlines()) == 2, error
    cli = DistillCLI(args=["--config", TINY_SOFT, "--model.init_args.teacher", tiny_teacher_dir,
                           "--model.init_args.student.from_teacher.layers", "3"], run=False)
    assert cli.model.hparams.student == {"from_teacher": {"layers": 3}}


def test_a_store_of_another_teacher_trains_when_asked(tiny_teacher_dir, tmp_path, monkeypatch):
    """labels_any_teacher=True is the explicit way to train a student pruned from one teacher on another's labels."""
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tiny_teacher_dir, tmp_path)
    labels = store(ctx, teacher=other_teacher(ctx), splits=("train", "validation"))
    model = soft(ctx, labels=labels, labels_any_teacher=True)
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, small_data())
    assert model.trainer.global_step == 1
