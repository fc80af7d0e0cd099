"""``diffguard models``: download hub weights for offline use, build the tiny demo models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError
from ..hf import first_line
from ..models import split_revision
from ..tiny import tiny_components, tiny_path
from .options import EXIT_OK


def register(sub: Any) -> None:
    mdl = sub.add_parser("models", help="model weights")
    msub = mdl.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    dl = msub.add_parser("download", help="save a hub model to a directory (needs network access)")
    dl.add_argument("model_id", help="e.g. CompVis/stable-diffusion-safety-checker (or ID@REVISION)")
    dl.add_argument("directory", type=Path)
    dl.set_defaults(run=cmd_models_download)
    tiny = msub.add_parser("tiny", help="build the tiny demo models and print where they are")
    tiny.set_defaults(run=cmd_models_tiny)


def cmd_models_download(args: argparse.Namespace) -> int:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(args.model_id)  # a malformed ID@REVISION fails before the Hub is asked
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=str(args.directory))
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise ModelSourceError(
            f"could not download {args.model_id!r}: {first_line(exc)} (this needs network access to the Hub)"
        ) from None
    del StableDiffusionSafetyChecker
    print(path)
    return EXIT_OK


def cmd_models_tiny(args: argparse.Namespace) -> int:
    for component in tiny_components():
        print(f"{component}\t{tiny_path(component)}")
    return EXIT_OK
