"""Images that the real open_nsfw model scores high, made here against its weights (torch autograd through the ONNX
graph as a torch module), so that the tests that need a detector hit never ship or fetch such an image.

A seeded 64×64 picture, upsampled to 256×256 (open_nsfw's resize is then the identity and its JPEG round trip keeps
the low frequencies the optimisation uses), is pushed towards P(nsfw) = 1 for a few dozen Adam steps (~2 s on 2 cores).
The result is an abstract pattern that fools the classifier (the score through the package's own pipeline is above
0.95): a stand-in for an unsafe photograph, not one.

Beside them, what the detector tests share: real photographs (:func:`photo`), the default policy's open_nsfw row
alone (:func:`only_open_nsfw_row`), a count of a detector's forwards (:func:`counting_forwards`) and a detector that
fails on purpose (:class:`Faulty`).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator
from typing import Any

import numpy as np


@functools.cache
def nsfw_array(seed: int = 0, steps: int = 30) -> np.ndarray:
    """(256, 256, 3) uint8 RGB that open_nsfw scores above 0.95 (asserted, through the real preprocessing)."""
    import torch
    import torch.nn.functional as F

    from pipeline.detectors.open_nsfw import MEAN_BGR, OpenNSFW

    detector = OpenNSFW()
    net = detector.torch_module()
    generator = torch.Generator().manual_seed(seed)
    low = (torch.rand(1, 3, 64, 64, generator=generator) * 0.2 + 0.4).requires_grad_(True)  # RGB in [0, 1]
    optimiser = torch.optim.Adam([low], lr=0.05)
    mean_rgb = torch.tensor(MEAN_BGR[::-1].copy()).view(1, 3, 1, 1)

    def picture() -> torch.Tensor:  # (1, 3, 256, 256) in [0, 255]
        return F.interpolate(low.clamp(0, 1), size=(256, 256), mode="bilinear", align_corners=False) * 255

    with torch.random.fork_rng(devices=[]):
        for _ in range(steps):
            crop = picture()[:, :, 16:240, 16:240]  # open_nsfw's centre crop of its 256×256 resize
            nhwc_bgr = (crop - mean_rgb).flip(1).permute(0, 2, 3, 1)
            loss = -torch.log(net(nhwc_bgr)[0, 1] + 1e-6)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        array = picture()[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    score = float(detector(detector.prepare([array]))[0, 0])
    assert score > 0.95, f"the optimised image scores only {score:.3f} through open_nsfw's own preprocessing"
    return array


def nsfw_png(seed: int = 0) -> bytes:
    """:func:`nsfw_array` as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(nsfw_array(seed)).save(buf, format="PNG")
    return buf.getvalue()


def photo(name: str) -> np.ndarray:
    """scikit-image's sample photograph ``name`` (real photographs, in its wheel) as RGB uint8 (H, W, 3)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def only_open_nsfw_row(**overrides) -> dict:
    """A policy with the built-in default policy's own open_nsfw row alone in `sexual` (the tiny stock checker's
    decision only leads to ``nsfw_action``: ``allow`` unless overridden)."""
    import yaml

    from pipeline.policy import DEFAULT_POLICY_FILE

    default = yaml.safe_load(DEFAULT_POLICY_FILE.read_text())
    row = next(r for r in default["categories"]["sexual"]["concepts"] if "detector" in r)
    return {"version": 1, "name": "open_nsfw-only", "nsfw_action": "allow", **overrides} | {
        "categories": {"sexual": {"action": "block", "concepts": [row]}}
    }


@contextlib.contextmanager
def counting_forwards(detectors: Any, name: str = "open_nsfw") -> Iterator[list[int]]:
    """Within the block, each forward of the checker's detector ``name`` records its batch size in the list yielded."""
    detector, calls = detectors.get(name), []

    class Counting:
        def __getattr__(self, attr: str) -> Any:
            return getattr(detector, attr)

        def __call__(self, inputs: Any) -> Any:
            calls.append(len(inputs))
            return detector(inputs)

    detectors.loaded[name] = Counting()
    try:
        yield calls
    finally:
        detectors.loaded[name] = detector


class Faulty:
    """The real open_nsfw, except that it cannot prepare a 7×7 view and answers NaN for a 9×9 all-black one."""

    def __init__(self, detector: Any):
        self.detector = detector

    def __getattr__(self, name: str) -> Any:
        return getattr(self.detector, name)

    def prepare(self, arrays: Any) -> Any:
        if any(a.shape[:2] == (7, 7) for a in arrays):
            raise ValueError("cannot prepare a 7x7 view")
        return self.detector.prepare(arrays)

    def __call__(self, inputs: Any) -> Any:
        import torch

        probs = self.detector(inputs)
        nan = torch.from_numpy(np.isclose(inputs[:, 0, 0, 0], -104.0))  # the 9x9 view is all black: B - mean
        return torch.where(nan[:, None], float("nan"), probs)
