"""Batched tensor preprocessing equivalent to ``CLIPImageProcessor`` (resize shortest side, centre crop, normalise).

Resizing runs on uint8 tensors with torch's antialiased kernels, which follow PIL's fixed-point resampling, so the
output stays within a couple of grey levels of the PIL-based reference. Images of equal size resize in one call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values used by CLIP processors


def processor_class() -> Any:
    """The PIL-backed CLIP image processor (the path diffusers pipelines run without torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


@dataclass(frozen=True)
class Preprocess:
    """The checker's input transform, read from the model's own processor config so the two never disagree."""

    shortest_edge: int  # resize so the shorter side has this many pixels (aspect kept, long side truncated)
    crop: tuple[int, int]  # centre crop (height, width)
    mean: tuple[float, float, float]  # per-channel mean after rescaling to [0, 1]
    std: tuple[float, float, float]  # per-channel std after rescaling to [0, 1]
    resample: str = "bicubic"  # "bicubic" | "bilinear", antialiased like PIL
    rescale_factor: float = 1 / 255

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocess:
        size = processor.size
        shortest = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
        crop = processor.crop_size if getattr(processor, "do_center_crop", True) else None
        crop_hw = (crop["height"], crop["width"]) if crop else (shortest, shortest)
        resample = int(getattr(processor, "resample", 3))
        if resample not in _RESAMPLE:
            raise ValueError(f"processor resample={resample} is not supported; allowed: {sorted(_RESAMPLE)}")
        return cls(
            shortest_edge=int(shortest),
            crop=(int(crop_hw[0]), int(crop_hw[1])),
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
            resample=_RESAMPLE[resample],
            rescale_factor=float(getattr(processor, "rescale_factor", 1 / 255)),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, as ``transformers`` computes it."""
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> the same at the checker's scale (shortest side ``shortest_edge``), with exactly the
        kernel :meth:`__call__` uses: scoring the result equals scoring ``image`` (its resize is then a no-op)."""
        nh, nw = self.output_size(*image.shape[:2])
        if (nh, nw) == image.shape[:2]:
            return image
        image = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)  # torch wants it writable
        batch = torch.from_numpy(image).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        batch = batch.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(batch, size=(nh, nw), mode=self.resample, antialias=True)  # (1, 3, nh, nw) uint8
        return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays (H, W, 3) of any sizes -> normalised float32 pixels (B, 3, crop_h, crop_w)."""
        ch, cw = self.crop
        out = torch.empty((len(images), 3, ch, cw), dtype=torch.float32)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[img.shape[:2]].append(i)
        for (h, w), idx in groups.items():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)  # (G, 3, H, W) uint8
            nh, nw = self.output_size(h, w)
            if (nh, nw) != (h, w):  # channels-last (as decoded) takes torch's vectorised uint8 kernel: ~3x faster
                batch = batch.contiguous(memory_format=torch.channels_last)
                batch = F.interpolate(batch, size=(nh, nw), mode=self.resample, antialias=True)
            out[idx] = self._crop(batch).float()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return out.mul_(self.rescale_factor).sub_(mean).div_(std)  # in place: same arithmetic, no temporaries

    def _crop(self, batch: torch.Tensor) -> torch.Tensor:
        """Centre crop (B, 3, H, W), zero-padding any side smaller than the crop as transformers does."""
        ch, cw = self.crop
        h, w = batch.shape[-2:]
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            batch = F.pad(batch, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = batch.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        return batch[..., top : top + ch, left : left + cw]
