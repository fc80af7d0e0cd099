"""What loads a :class:`~pipeline.checker.SafetyChecker`, as one frozen dataclass: the CLI's checker options, the
scan's checker, and the fields the Serve settings derive from. No torch: cheap to import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIEWS,
    DEFAULT_VIDEO_FPS,
    DecodeLimits,
)

if TYPE_CHECKING:
    from .checker import SafetyChecker
    from .concepts import ConceptSet


@dataclass(frozen=True)
class CheckerSpec:
    """Everything that loads a :class:`SafetyChecker`: what the CLI's checker options mean, in one place.

    Distributed jobs load it twice: a driver resolves the concept set, the policy (text tower, example-image folders)
    and the thresholds once (``load()``); workers load only the weights and adopt the driver's concept rows
    (``load(concepts=driver.concepts)``), so those files and towers need not exist on the workers.

    >>> spec = CheckerSpec(model="tiny", policy="stock", adjustment=0.02)
    >>> checker = spec.load()
    """

    model: str = "tiny"  # hub id, directory (present on every node) or "tiny"
    device: str = "auto"  # in the actors: "auto" takes the GPU Ray assigned, if any
    dtype: str = "auto"
    adjustment: float = 0.0
    concepts: Path | None = None  # a saved concept set (read by the driver only)
    policy: str | None = "default"  # policy file or keyword (read by the driver only); None: no categories
    max_batch_size: int = 32  # images per vision pass
    max_pixels: int = DEFAULT_MAX_PIXELS
    concept_text_model: str | None = None  # text tower for the policy's text concepts (driver only)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # encoded images larger than this are unscorable
    policy_fallback: str | None = None  # "stock": score with the stock policy when the text tower cannot load
    max_views: int = DEFAULT_MAX_VIEWS  # views scored per object (frames, pages, backgrounds, tiles); then sampled
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS  # every frame decoded for one object (animations, video)
    video_fps: float = DEFAULT_VIDEO_FPS  # video frames sampled per second of display time

    def limits(self) -> DecodeLimits:
        """What one object may cost to decode, as the checker this spec loads applies it (before a policy's own
        ``max_views``): the HTTP edge prices uploads with it."""
        return DecodeLimits(
            max_pixels=self.max_pixels,
            max_bytes=self.max_object_bytes,
            max_decoded_pixels=self.max_decoded_pixels,
            max_views=self.max_views,
            video_fps=self.video_fps,
        )

    def load(
        self, device: str | None = None, dtype: str | None = None, concepts: ConceptSet | None = None
    ) -> SafetyChecker:
        """The resolving checker (``concepts=None``), or one that adopts already resolved rows."""
        from .checker import SafetyChecker

        checker = SafetyChecker.load(
            self.model,
            device or self.device,
            dtype or self.dtype,
            adjustment=self.adjustment,
            concepts=self.concepts if concepts is None else None,
            policy=self.policy if concepts is None else None,
            max_batch_size=self.max_batch_size,
            max_pixels=self.max_pixels,
            max_object_bytes=self.max_object_bytes,
            max_views=self.max_views,
            max_decoded_pixels=self.max_decoded_pixels,
            video_fps=self.video_fps,
            concept_text_model=self.concept_text_model,
            policy_fallback=self.policy_fallback,
        )
        if concepts is not None:
            checker.adopt(concepts, self.adjustment)
        return checker
