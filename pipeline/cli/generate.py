"""``diffguard generate``: text-to-image through the moderated chain; blocked pixels never reach the disk."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..policy import WITHHELD
from ..tiny import TINY, TINY_BANNER
from .options import add_checker_options, checker_spec

log = logging.getLogger("diffguard")


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate images, check every one, write only what the policy allows")
    p.add_argument("prompt")
    p.add_argument("--out", type=Path, required=True, help="output directory (created; must be empty)")
    p.add_argument("--negative-prompt")
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--safety", default="off", choices=["off", "weak", "medium", "strong", "max"])
    p.add_argument(
        "--policy",
        default="default",
        help="policy file (YAML) or keyword: default | stock | block | blur | black (the default policy, with "
        "flagged images blocked, blurred or blackened)",
    )
    p.add_argument("--model", default=TINY, help="Stable Diffusion: hub id, directory or 'tiny' (default)")
    p.add_argument("--text-encoder", help="swap the text encoder, e.g. aimagelab/safeclip_vit-l_14 (or 'tiny')")
    p.add_argument("--force", action="store_true", help="replace earlier diffguard output in --out")
    add_checker_options(p, model_flag="--checker-model")
    p.set_defaults(run=cmd_generate)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        ours = [
            p for p in out.iterdir() if p.name == "report.json" or (p.name.startswith("image-") and p.suffix == ".png")
        ]
        others = [p for p in out.iterdir() if p not in ours]
        if others or (ours and not force):
            raise UsageError(f"--out {out} is not empty; use an empty directory (or --force to replace earlier output)")
        for p in ours:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def cmd_generate(args: argparse.Namespace) -> int:
    import io

    from PIL import Image

    from ..generator import GenerationRequest, Generator
    from ..moderate import generate_moderated
    from ..policy import load_policy

    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_images": args.num_images,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "safety": args.safety,
    }
    request = GenerationRequest.parse(fields)  # invalid parameters exit 2 before anything is loaded or written
    load_policy(args.policy)
    _prepare_out(args.out, args.force)
    generator = Generator.load(args.model, args.device, args.dtype, text_encoder=args.text_encoder)
    checker = checker_spec(args, model=args.checker_model).load()
    if generator.demo or checker.demo:
        log.warning("WARNING: %s", TINY_BANNER)
    result = generate_moderated(generator, checker, request)
    report = result.report()
    for moderated, entry in zip(result.images, report["images"], strict=True):
        entry["file"] = None
        if moderated.image is not None:
            buf = io.BytesIO()
            Image.fromarray(moderated.image).save(buf, format="PNG")
            name = f"image-{moderated.index}.png"
            _write_atomic(args.out / name, buf.getvalue())
            entry["file"] = name
        word = "flagged" if moderated.action in WITHHELD else "reported" if moderated.action == "flag" else "allowed"
        log.info("image %d: %s (%s)", moderated.index, moderated.action, word)  # the words of docs/CLI.md
    for warning in result.warnings:
        log.warning("warning: %s", warning)
    _write_atomic(args.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    print(
        json.dumps(
            {
                "out": str(args.out),
                "seed": result.seed,
                "images": [{"index": e["index"], "action": e["action"], "file": e["file"]} for e in report["images"]],
            }
        )
    )
    return 0
