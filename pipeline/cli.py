"""The ``diffguard`` command line: check images, manage model weights.

Exit codes of ``check``: 0 every input checked; 1 with ``--fail-on-nsfw`` when something was flagged;
2 usage errors (bad arguments, a model that cannot be loaded); 3 some inputs could not be read or scored (their rows
are still printed, with the policy's ``unscorable_action``; 3 wins over 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from . import evaluate_cli, generate_cli, models, scan_cli, serve_cli, tiny
from .errors import DiffguardError, ModelSourceError, UsageError
from .hf import first_line
from .images import DEFAULT_MAX_OBJECT_BYTES, IMAGE_SUFFIXES, SNIFF_BYTES, identify

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
CHUNK = 64  # inputs read and scored together, bounding memory on large folders

log = logging.getLogger("diffguard")


def _float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo}, {hi}], got {value}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_checker_options(p: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """The options every command that scores images shares (``generate`` names the checker ``--checker-model``)."""
    p.add_argument(model_flag, default=models.TINY, help="checker: hub id, local directory or 'tiny' (default: tiny)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--adjustment", type=_float_in(-1, 1), default=0.0, help="stricter filter when > 0 (default 0)")
    p.add_argument("--concepts", type=Path, help="concept set file (safetensors) with custom concepts/overrides")
    p.add_argument("--concept-text-model", help="CLIP text tower for text concepts (default matches --model)")
    p.add_argument("--max-pixels", type=_positive_int, default=40_000_000, help="refuse larger images (default 40 MP)")
    p.add_argument(
        "--max-object-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_OBJECT_BYTES,
        help="larger files are unscorable, withheld unread (default 256 MiB)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per model call (default 32)")
    if model_flag == "--model":  # generate adds its own --policy (the same option, with image-policy keywords)
        p.add_argument("--policy", default="default", help="policy file (YAML) or keyword: default | stock")
    p.add_argument(
        "--policy-fallback",
        choices=["stock"],
        help="if the policy's CLIP text tower cannot load, score with the stock policy (with a warning) instead of "
        "failing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffguard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="score images with the safety checker")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or directories (recursed)")
    add_checker_options(check)
    check.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    check.add_argument("--fail-on-nsfw", action="store_true", help="exit 1 when any image is flagged")
    check.set_defaults(run=cmd_check)

    mdl = sub.add_parser("models", help="model weights")
    msub = mdl.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    dl = msub.add_parser("download", help="save a hub model to a directory (needs network access)")
    dl.add_argument("model_id", help="e.g. CompVis/stable-diffusion-safety-checker")
    dl.add_argument("directory", type=Path)
    dl.set_defaults(run=cmd_models_download)
    tiny = msub.add_parser("tiny", help="build the tiny demo models and print where they are")
    tiny.set_defaults(run=cmd_models_tiny)

    # Other command families live in their own modules; each registers its subparsers here (cheap imports only).
    generate_cli.register(sub)
    serve_cli.register(sub)
    evaluate_cli.register(sub)
    scan_cli.register(sub)
    return parser


def _is_image(path: Path) -> bool:
    """Named like an image (then an undecodable one is reported and withheld), or an image by its first bytes whatever
    its name: what Pillow's format detection says of the first ``SNIFF_BYTES`` (one small read)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return identify(f.read(SNIFF_BYTES)) is not None
    except OSError:
        return True  # unreadable: keep it, so that it is reported (and withheld) rather than silently skipped


def iter_inputs(paths: list[Path]) -> Iterator[Path]:
    """Files as given; directories recursed in sorted order, keeping images by name or by content (as the scan does)."""
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if _is_image(p)]
            kept = set(images)
            skipped = [p for p in files if p not in kept]
            if skipped:
                log.info("%s: skipping %d files that are not images (e.g. %s)", path, len(skipped), skipped[0].name)
            yield from images
        else:
            yield path


def checker_spec(args: argparse.Namespace, model: str | None = None):
    """The options of ``add_checker_options`` as a :class:`pipeline.checker.CheckerSpec` (``model``: another flag's)."""
    from .checker import CheckerSpec

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
        concept_text_model=args.concept_text_model,
        policy_fallback=args.policy_fallback,
    )


def load_checker(args: argparse.Namespace):
    checker = checker_spec(args).load()
    if checker.demo:
        log.warning("WARNING: %s", models.TINY_BANNER)
    return checker


def cmd_check(args: argparse.Namespace) -> int:
    checker = load_checker(args)
    inputs = list(iter_inputs(args.paths))
    if not inputs:
        raise UsageError(f"no image files found under {', '.join(map(str, args.paths))}")
    flagged = unscorable = 0
    if not args.json:
        print(f"{'action':<8} {'top score':>9}  {'concepts and categories hit':<28} path")
    for start in range(0, len(inputs), CHUNK):
        chunk = inputs[start : start + CHUNK]
        for path, verdict in zip(chunk, checker.check(chunk), strict=True):
            flagged += verdict.nsfw
            unscorable += verdict.error is not None
            row = {"path": str(path), **verdict.to_dict(), "fingerprint": checker.fingerprint, "demo": checker.demo}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(_table_row(row), flush=True)
    if not args.json:
        tag = " (tiny demo weights: meaningless)" if checker.demo else ""
        action = checker.concepts.unscorable_action
        summary = f"{len(inputs)} checked, {flagged} flagged, {unscorable} unscorable ({action})"
        print(f"\n{summary}; fingerprint {checker.fingerprint}{tag}")
    if unscorable:
        return EXIT_UNREADABLE
    return EXIT_FLAGGED if args.fail_on_nsfw and flagged else EXIT_OK


def _table_row(row: dict) -> str:
    if row["error"]:  # unscorable: the policy's unscorable_action, and why
        return f"{row['action'] or 'block':<8} {'-':>9}  {'UNSCORABLE: ' + row['error'][:60]:<28} {row['path']}"
    top = max(row["concept_scores"], default=0.0)
    hits = ",".join(row["bad_concept_names"] + row["flagged_categories"]) or "-"
    hits = f"(truncated) {hits}" if row.get("truncated") else hits
    return f"{row['action'] or ('NSFW' if row['nsfw'] else 'ok'):<8} {top:>9.3f}  {hits[:28]:<28} {row['path']}"


def cmd_models_download(args: argparse.Namespace) -> int:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(args.model_id, local_dir=str(args.directory))
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise ModelSourceError(
            f"could not download {args.model_id!r}: {first_line(exc)} (this needs network access to the Hub)"
        ) from None
    del StableDiffusionSafetyChecker
    print(path)
    return EXIT_OK


def cmd_models_tiny(args: argparse.Namespace) -> int:
    for component in tiny.tiny_components():
        print(f"{component}\t{tiny.tiny_path(component)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except DiffguardError as exc:
        print(f"diffguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
