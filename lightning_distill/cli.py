"""The ``lightning-distill`` command.

``fit | validate | test | predict`` go through :class:`DistillCLI`, a ``LightningCLI`` in subclass mode over
:class:`~lightning_distill.modules.DistillModule`, so a YAML picks the method with
``model: {class_path: lightning_distill.SoftDistill, init_args: {...}}``. Two more commands:

- ``lightning-distill export --ckpt PATH --out DIR``: the student of a checkpoint as a Hugging Face folder;
- ``lightning-distill demo``: the main job (see :mod:`lightning_distill.demo`).
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI

from lightning_distill.data import DistillDataModule
from lightning_distill.modules import DistillModule


EPILOG = """more commands:
  export              lightning-distill export --ckpt PATH --out DIR: a checkpoint's student as a Hugging Face folder
  demo                lightning-distill demo [--steps N ...]: distil the embedded teacher and print what it achieved
"""


class DistillCLI(LightningCLI):
    """LightningCLI over every :class:`DistillModule` subclass and :class:`DistillDataModule`."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter})
        super().__init__(DistillModule, DistillDataModule, subclass_mode_model=True, **kwargs)


def export(argv: list[str]) -> str:
    """``lightning-distill export --ckpt PATH --out DIR``: write the checkpoint's student as a Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="lightning-distill export", description=export.__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `lightning-distill fit`")
    parser.add_argument("--out", required=True, help="folder to write the student and tokenizer to")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.ckpt)
    path = model.export(args.out)
    print(f"exported the student to {path} (load it with AutoModelForCausalLM.from_pretrained)")
    return path


def load_checkpoint(path: str) -> DistillModule:
    """Load a checkpoint of any method: the class is read from the checkpoint's saved hyperparameters."""
    import torch

    from lightning_distill import modules

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    name = checkpoint.get("lightning_distill_class")
    if name not in modules.__all__:
        raise ValueError(f"{path} was not written by a lightning_distill module (no method name in it); load it "
                         "with the class that wrote it, e.g. SoftDistill.load_from_checkpoint(path)")
    return getattr(modules, name).load_from_checkpoint(path, map_location="cpu")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-distill`` and ``python -m lightning_distill``."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] == "export":
        export(words[1:])
    elif words and words[0] == "demo":
        from lightning_distill.demo import main as demo_main

        demo_main(words[1:])
    else:
        DistillCLI(args=argv)  # None: LightningCLI reads sys.argv itself
