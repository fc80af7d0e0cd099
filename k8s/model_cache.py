"""Init container: fill the model cache volume (``HF_HOME``) with the Hub models a pod loads, and nothing more.

    python -m k8s.model_cache --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --model CompVis/stable-diffusion-safety-checker --model openai/clip-vit-large-patch14

Every ID may carry a pinned revision, ``ID@REVISION`` (a commit hash), exactly as the Serve config and the scan's
``--model`` name it: the cache then holds that snapshot, which is what the replicas load.

``--pipeline ID``: a Stable Diffusion pipeline; exactly the files ``Generator.load`` reads (diffusers' own download
step, without the ``safety_checker`` and ``feature_extractor`` folders the generator never loads).
``--model ID``: a transformers repository (the checker, a CLIP text tower, Safe-CLIP): configs, tokenizer files and the
weights in one format (safetensors when the repository has them, else PyTorch ``.bin``).

Files already in the cache are not fetched again, so on a shared volume only the first pod downloads. Without network
access a fully cached model is used as is; a model that is neither reachable nor cached exits 1 with the reason.
The replicas load the same hub ids from the same cache (``pipeline.models`` looks in the cache first).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipeline.errors import ModelSourceError
from pipeline.models import split_revision  # one parser for ID@REVISION: the replicas load what this fetched

log = logging.getLogger("diffguard.model_cache")

CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, processor/tokenizer files (vocab, merges, spm models)


def transformers_patterns(filenames: list[str]) -> list[str]:
    """The files of a transformers repository that ``from_pretrained`` reads: one weight format, never both."""
    if any(name.endswith(".safetensors") for name in filenames):
        return [*CONFIG_PATTERNS, "*.safetensors"]
    return [*CONFIG_PATTERNS, "pytorch_model*.bin"]


def fetch_model(spec: str) -> str:
    from huggingface_hub import HfApi, snapshot_download

    repo_id, revision = split_revision(spec)
    files = [sibling.rfilename for sibling in HfApi().model_info(repo_id, revision=revision).siblings or []]
    return snapshot_download(repo_id, revision=revision, allow_patterns=transformers_patterns(files))


def fetch_pipeline(spec: str) -> str:
    from diffusers import StableDiffusionPipeline

    repo_id, revision = split_revision(spec)
    # The same call StableDiffusionPipeline.from_pretrained makes first, with the components the generator passes.
    return str(
        StableDiffusionPipeline.download(repo_id, revision=revision, safety_checker=None, feature_extractor=None)
    )


def cached(spec: str) -> str | None:
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(spec)
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m k8s.model_cache", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", default=[], metavar="ID[@REV]", help="Stable Diffusion pipeline")
    p.add_argument("--model", action="append", default=[], metavar="ID[@REV]", help="transformers model hub id")
    args = p.parse_args(argv)
    if not args.pipeline and not args.model:
        p.error("nothing to fetch: pass --pipeline ID and/or --model ID")
    for spec in args.pipeline + args.model:
        try:
            split_revision(spec)
        except ModelSourceError as exc:
            p.error(str(exc))
    return args


def main(
    argv: list[str] | None = None,
    fetchers: dict[str, Callable[[str], str]] | None = None,
    cached_copy: Callable[[str], str | None] = cached,
) -> int:
    logging.basicConfig(level=logging.INFO, format="model-cache: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    fetchers = fetchers or {"pipeline": fetch_pipeline, "model": fetch_model}
    log.info("HF_HOME=%s", os.environ.get("HF_HOME", "(unset: ~/.cache/huggingface)"))
    failed = []
    for kind, repo_id in [("pipeline", r) for r in args.pipeline] + [("model", r) for r in args.model]:
        try:
            log.info("%s %s -> %s", kind, repo_id, fetchers[kind](repo_id))
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: report and try the cache
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            path = cached_copy(repo_id)
            if path is None:
                log.error("could not fetch %s %s and it is not cached: %s", kind, repo_id, reason)
                failed.append(repo_id)
            else:
                log.warning("could not refresh %s (%s); using the cached copy %s", repo_id, reason, path)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
