"""What the commands share: exit codes, argparse types, and the checker options every scoring command takes."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIEWS,
    DEFAULT_VIDEO_FPS,
)
from ..tiny import TINY, demo_banner

if TYPE_CHECKING:
    from ..checker import SafetyChecker
    from ..spec import CheckerSpec

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3

log = logging.getLogger("diffguard")


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo}, {hi}], got {value}")
        return value

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_checker_options(p: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """The options every command that scores images shares (``generate`` names the checker ``--checker-model``)."""
    p.add_argument(model_flag, default=TINY, help="checker: hub id, local directory or 'tiny' (default: tiny)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--adjustment", type=float_in(-1, 1), default=0.0, help="stricter filter when > 0 (default 0)")
    p.add_argument("--concepts", type=Path, help="concept set file (safetensors) with custom concepts/overrides")
    p.add_argument("--concept-text-model", help="CLIP text tower for text concepts (default matches --model)")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images (default {DEFAULT_MAX_PIXELS // 1_000_000} MP)",
    )
    p.add_argument(
        "--max-object-bytes",
        type=positive_int,
        default=DEFAULT_MAX_OBJECT_BYTES,
        help="larger files are unscorable, withheld unread (default 256 MiB)",
    )
    p.add_argument(
        "--max-views",
        type=positive_int,
        default=DEFAULT_MAX_VIEWS,
        help="views scored per file: frames, pages, both backgrounds under the alpha, tiles of a long image; past it "
        f"frames are sampled over display time (default {DEFAULT_MAX_VIEWS})",
    )
    p.add_argument(
        "--max-decoded-pixels",
        type=positive_int,
        default=DEFAULT_MAX_DECODED_PIXELS,
        help="refuse animations and videos whose frames add up to more pixels, from their headers (default 2 G)",
    )
    p.add_argument(
        "--video-fps",
        type=float_in(0.01, 60),
        default=DEFAULT_VIDEO_FPS,
        help=f"video frames sampled per second of display time, + the first and last (default {DEFAULT_VIDEO_FPS:g})",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="views per model call (default 32)")
    if model_flag == "--model":  # generate adds its own --policy (the same option, with image-policy keywords)
        p.add_argument("--policy", default="default", help="policy file (YAML) or keyword: default | stock")
    p.add_argument(
        "--policy-fallback",
        choices=["stock"],
        help="if the policy's CLIP text tower cannot load, score with the stock policy (with a warning) instead of "
        "failing",
    )


def checker_spec(args: argparse.Namespace, model: str | None = None) -> CheckerSpec:
    """The options of ``add_checker_options`` as a :class:`pipeline.checker.CheckerSpec` (``model``: another flag's)."""
    from ..spec import CheckerSpec

    return CheckerSpec(
        model=model or args.model,
        device=args.device,
        dtype=args.dtype,
        adjustment=args.adjustment,
        concepts=args.concepts,
        policy=args.policy,
        max_batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        max_object_bytes=args.max_object_bytes,
        max_views=args.max_views,
        max_decoded_pixels=args.max_decoded_pixels,
        video_fps=args.video_fps,
        concept_text_model=args.concept_text_model,
        policy_fallback=args.policy_fallback,
    )


def load_checker(args: argparse.Namespace) -> SafetyChecker:
    checker = checker_spec(args).load()
    if banner := demo_banner(checker.parts):
        log.warning("WARNING: %s", banner)
    return checker
