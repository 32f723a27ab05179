"""``lightning-distill serve --teacher NAME``: a teacher behind an HTTP server, on LitServe (Lightning's serving
library: a worker process per device holding the model, request queues, FastAPI routes), for
:class:`~lightning_distill.signals.ServedTeacher` clients (``SoftDistill(teacher="http://HOST:PORT")``) and for
any client of vLLM's completions API (the subset :mod:`lightning_distill.serve.openai` describes).

It binds 127.0.0.1 (this machine only) unless ``--host 0.0.0.0`` is given; ``--api-key`` (or the
``LIGHTNING_DISTILL_API_KEY`` variable, which keeps the key out of the process list) makes every request without
``Authorization: Bearer KEY`` a 401. LitServe itself is an optional dependency: ``pip install
'lightning-distill[serve]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
from typing import Any

from lightning_distill import checks
from lightning_distill.backbone import (
    DEFAULT_TEACHER,
    load_config,
    load_tokenizer,
    teacher_fingerprint,
    tokenizer_fingerprint,
)

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
DTYPES = ("auto", "bfloat16", "float16", "float32")
API_KEY_ENV = "LIGHTNING_DISTILL_API_KEY"


def require_litserve() -> None:
    """A clear error when LitServe is not installed (it is an optional dependency)."""
    if importlib.util.find_spec("litserve") is None:
        raise ValueError("lightning-distill serve needs LitServe, which is not installed: "
                         "pip install 'lightning-distill[serve]' (or pip install litserve)")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-distill serve", description=main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="builtin name, Hugging Face id or local folder")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on, in [1024, 65535]")
    parser.add_argument("--host", default="127.0.0.1", help=f"address to bind, one of {', '.join(HOSTS)}")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"key every request must bring (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--max-logprobs", type=int, default=64, help="the largest k a client may ask for")
    parser.add_argument("--dtype", default="auto", help=f"the teacher's weights dtype, one of {', '.join(DTYPES)}")
    parser.add_argument("--name", default=None, help="the model id of /v1/models (default: the teacher's name)")
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--devices", default="auto", help="number of devices, or auto")
    parser.add_argument("--workers-per-device", type=int, default=1, help="teacher copies per device")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait in the queue")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``lightning-distill serve --teacher NAME [--port 8000] [--host 127.0.0.1] [--api-key KEY]
    [--max-logprobs 64] [--dtype auto]``: serve a teacher's log-probs over HTTP until Ctrl+C (or SIGTERM)."""
    args = parser().parse_args(argv)
    server, host, port = build(args)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated server stops its workers as Ctrl+C does
    print(f"lightning-distill serve: {args.teacher} on http://{host}:{port} (/v1/models, /v1/completions, "
          f"/v1/distill){'; requests need the API key' if args.api_key else ''}", flush=True)
    server.run(host=host, port=port, generate_client_file=False, log_level="warning")


def build(args: argparse.Namespace) -> tuple[Any, str, int]:
    """The LitServer of the parsed arguments (checked first: each bad one is a ``ValueError`` naming it)."""
    checks.integer("--port", args.port, "in [1024, 65535]", lambda v: 1024 <= v <= 65535, "8000")
    checks.choice("--host", args.host, HOSTS)
    checks.integer("--max-logprobs", args.max_logprobs, ">= 1", lambda v: v >= 1, "64")
    checks.choice("--dtype", args.dtype, DTYPES)
    checks.integer("--workers-per-device", args.workers_per_device, ">= 1", lambda v: v >= 1, "1")
    checks.require(args.api_key is None or bool(args.api_key.strip()), "--api-key", args.api_key, "a non-empty key")
    require_litserve()
    import litserve

    from lightning_distill.serve.teacher import ServedModel, TeacherAPI

    config = load_config(args.teacher, role="teacher")
    served = ServedModel(teacher=args.teacher, name=args.name or args.teacher, dtype=args.dtype,
                         max_logprobs=args.max_logprobs, vocab_size=int(config.vocab_size),
                         max_model_len=getattr(config, "max_position_embeddings", None),
                         tokenizer=tokenizer_fingerprint(load_tokenizer(args.teacher, role="teacher")),
                         fingerprint=teacher_fingerprint(args.teacher))
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    server = litserve.LitServer(TeacherAPI(served, args.api_key), accelerator=args.accelerator, devices=devices,
                                workers_per_device=args.workers_per_device, timeout=args.timeout)
    return server, args.host, args.port


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
