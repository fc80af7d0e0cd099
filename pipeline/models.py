"""Model sources: a Hugging Face Hub id (``id`` or ``id@revision``), a local ``save_pretrained`` directory, or ``tiny``.

``tiny`` models (built by :mod:`pipeline.tiny`) load through the very same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelSourceError
from .hf import first_line, quiet_libraries
from .tiny import TINY, TINY_BANNER, tiny_path

log = logging.getLogger(__name__)

DEFAULT_CHECKER = "CompVis/stable-diffusion-safety-checker"
DEFAULT_TEXT_TOWER = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class Source:
    """Where one model comes from: ``path`` for a local directory (tiny included), else a hub ``repo_id``."""

    spec: str  # what the user asked for (``id@revision`` included)
    path: Path | None  # local directory to load from, when there is one
    demo: bool  # True for tiny weights
    revision: str | None = None  # hub commit, tag or branch pinned with ``id@revision``; None: the repo's main

    @property
    def repo_id(self) -> str:
        return split_revision(self.spec)[0]

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else self.repo_id


_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; a spec without ``@`` -> ``(spec, None)``.

    ``rev`` is what ``from_pretrained(..., revision=)`` takes: a commit hash (a pin), a tag or a branch.
    """
    if "@" not in spec:
        return spec, None
    repo_id, _, revision = spec.partition("@")
    if not repo_id or not _REVISION.fullmatch(revision) or ".." in revision:
        raise ModelSourceError(
            f"model {spec!r}: expected HUB_ID@REVISION with a commit hash, tag or branch after '@' "
            f"(letters, digits, '.', '_', '-', '/'), e.g. CompVis/stable-diffusion-safety-checker@cb41f3a2..."
        )
    return repo_id, revision


def resolve(spec: str, component: str) -> Source:
    """``tiny`` | existing directory | hub id -> :class:`Source` (building tiny weights on first use)."""
    if spec == TINY:
        return Source(spec, tiny_path(component), demo=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any(path.iterdir()):
            raise ModelSourceError(f"model directory {path} is empty: expected files written by save_pretrained")
        return Source(spec, path.resolve(), demo=_is_tiny_dir(path))
    if spec.startswith((".", "/", "~")) or not spec.strip():
        raise ModelSourceError(f"model directory {spec!r} does not exist (and it is not a Hugging Face Hub id)")
    repo_id, revision = split_revision(spec)
    if repo_id.count("/") > 1:
        raise ModelSourceError(f"model directory {spec!r} does not exist (and it is not a Hugging Face Hub id)")
    return Source(spec, None, demo=False, revision=revision)


def _is_tiny_dir(path: Path) -> bool:
    return any(marker.exists() for marker in (path / "diffguard_tiny.json", path.parent / "diffguard_tiny.json"))


def from_pretrained(cls: Any, source: Source, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with errors turned into one clear :class:`ModelSourceError`.

    A hub id is looked up in the local cache first; only when it is not cached is the Hub contacted, after a quick
    reachability probe, so an offline machine fails in a second instead of after minutes of retries.
    """
    quiet_libraries()
    if source.revision is not None:
        kwargs = {**kwargs, "revision": source.revision}
    if source.path is None:
        try:
            return cls.from_pretrained(source.repo_id, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            reason = hub_unreachable()
            if reason:
                raise ModelSourceError(_hub_message(source, reason)) from None
    try:
        return cls.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        if source.path is not None:
            raise ModelSourceError(
                f"could not load the {what} from directory {source.path}: {first_line(exc)}. "
                f"The directory must hold files written by save_pretrained."
            ) from None
        raise ModelSourceError(_hub_message(source, first_line(exc), what)) from None


def _hub_message(source: Source, reason: str, what: str = "model") -> str:
    return (
        f"could not load the {what} {source.spec!r} from the Hugging Face Hub and there is no cached copy ({reason}). "
        f"On a machine with network access run `diffguard models download {source.spec} DIR`, copy DIR here and pass "
        f"DIR instead of the hub id (or use 'tiny' for offline demo weights)."
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, DNS, connect), or None when a TCP connection succeeds."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"no network access to {url.hostname}: {exc.strerror or exc}"
    return None


__all__ = ["DEFAULT_CHECKER", "DEFAULT_TEXT_TOWER", "TINY", "TINY_BANNER", "Source", "from_pretrained", "resolve"]
