"""Objects with many views beside single images: objects/s and views/s through the core, from encoded bytes.

Each corpus goes through ``SafetyChecker.check`` on its bytes (decode into views, preprocess, vision passes, one
verdict per object), ``batch`` objects a call, on the same tiny-architecture weights as the core section (ViT-B/32):
single 512x512 PNGs (one view each), 8-frame animated GIFs (one view per distinct frame), 3-second videos (H.264,
10 fps: the first frame, 2 per second and the last), 1:3 PNG banners (the centre crop and 3 tiles), and RGBA PNGs with
translucent pixels (over white and over black). views/s is what the vision pass sees; objects/s what a caller gets.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import SafetyChecker
from pipeline.hf import quiet_libraries

from . import models
from .measure import rate, timed

log = logging.getLogger("bench")


@dataclass(frozen=True)
class ViewsPlan:
    objects: int = 32  # distinct objects per corpus
    batch: int = 16  # objects per check() call
    calls: int = 6  # timed calls per corpus (after one warm-up)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _gif(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
    return buf.getvalue()


def _video(frames: list[np.ndarray]) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _shifted(picture: np.ndarray, k: int) -> np.ndarray:
    """Frame k of an animation of ``picture``: moved along and brightened, so every frame differs (no duplicates)."""
    return ((np.roll(picture, 12 * k, axis=1).astype(np.int16) + 9 * k) % 256).astype(np.uint8)


def corpora(n: int) -> dict[tuple[str, str], list[bytes]]:
    pictures = models.arrays(models.images(n * 2, seed=5, size=256))
    rng = np.random.default_rng(5)
    alpha = [np.dstack([p, rng.integers(0, 256, p.shape[:2], dtype=np.uint8)]) for p in pictures[:n]]
    return {
        ("single", "PNG 512x512 (single image)"): [
            _png(np.asarray(Image.fromarray(p).resize((512, 512)))) for p in pictures[:n]
        ],
        ("alpha", "RGBA PNG 256x256, translucent"): [_png(a) for a in alpha],
        ("long", "PNG banner 768x256 (1:3)"): [
            _png(np.concatenate([p, q, p[::-1]], axis=1)) for p, q in zip(pictures[:n], pictures[n:], strict=True)
        ],
        ("animation", "animated GIF 256x256, 8 frames"): [
            _gif([_shifted(p, k) for k in range(8)]) for p in pictures[:n]
        ],
        ("video", "video H.264 224x224, 3 s at 10 fps"): [
            _video([_shifted(p[:224, :224], k) for k in range(30)]) for p in pictures[:n]
        ],
    }


def run_views(plan: ViewsPlan) -> dict[str, Any]:
    quiet_libraries()
    directory = models.model_dir("vit-b-32")
    checker = SafetyChecker.load(str(directory), "cpu", "float32", policy="stock", max_batch_size=32)
    rows = []
    for (kind, name), bodies in corpora(plan.objects).items():
        views = [v.views for v in checker.check(bodies[: plan.batch])]
        chunks = [
            [bodies[(i * plan.batch + j) % len(bodies)] for j in range(plan.batch)] for i in range(plan.calls + 1)
        ]
        secs, _ = timed(checker.check, chunks, warmup=1)
        per_object = float(np.mean(views))
        objects_s = rate(plan.batch, secs)
        rows.append(
            {
                "kind": kind,
                "corpus": name,
                "views_per_object": per_object,
                "objects_per_s": objects_s,
                "views_per_s": objects_s * per_object,
                "ms_per_object": 1000 / objects_s,
            }
        )
        log.info("views %s: %.1f views/object, %.2f objects/s", name, per_object, objects_s)
    single = rows[0]["objects_per_s"]
    for r in rows:
        r["x_single_objects"] = r["objects_per_s"] / single
    return {"model": "ViT-B/32 (random weights)", "batch": plan.batch, "rows": rows}
