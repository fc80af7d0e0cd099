"""A picture hidden where a person still sees it (issue 24's table), generated: seeded functions returning bytes.

Each case is ``(data, example)``: the file, and what a person sees of it where the picture is (the view the checker
must find). A policy whose only category fires on that one example (an image concept at threshold 0.998: with the tiny
CLIP only the example itself passes) then flags the file exactly when the hidden view is scored:

>>> case = CASES["animated-gif"]()
>>> policy = write_policy(tmp_path, case.example)          # category "target", action block
>>> checker.configure(policy=policy); checker.check([case.data])[0].flagged_categories
['target']
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.adversarial import picture

THRESHOLD = 0.998  # cosine: with the tiny CLIP only the example itself (or pixels within a few levels) passes


@dataclass(frozen=True)
class Case:
    data: bytes
    example: np.ndarray  # RGB uint8: what a person sees where the picture is
    view: str | None  # the view that must decide (its label, or a prefix of it)
    naive: np.ndarray | None = None  # what the pre-views decoder scored instead (first frame, alpha dropped, ...)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def target(seed: int = 7, size: tuple[int, int] = (224, 224)) -> Image.Image:
    return picture(seed, size)


def gradient(size: tuple[int, int] = (224, 224)) -> np.ndarray:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    channels = [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)]
    return np.stack(channels, -1).astype(np.uint8)


def alpha_camouflage(background: int = 255, seed: int = 7) -> Case:
    """The picture's pixels opaque where a mask says, the rest transparent over a hidden gradient: over a page of
    ``background`` a person sees the picture's pixels and the page; a decoder dropping alpha sees the gradient."""
    pic = np.asarray(target(seed))
    mask = (np.indices(pic.shape[:2]).sum(axis=0) // 8) % 2 == 0  # a coarse checkerboard of picture pixels
    rgba = np.dstack([np.where(mask[..., None], pic, gradient()), np.where(mask, 255, 0).astype(np.uint8)])
    seen = np.where(mask[..., None], pic, np.uint8(background)).astype(np.uint8)
    label = "over white" if background == 255 else "over black"
    return Case(_png(Image.fromarray(rgba, "RGBA")), seen, label, rgba[..., :3])


def animated(fmt: str, seed: int = 7) -> Case:
    """Frame 1 a harmless gradient, frame 2 (half a second later) the picture."""
    frames = [Image.fromarray(gradient()), target(seed)]
    buf = io.BytesIO()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=500, loop=0, **kw)
    data = buf.getvalue()
    shown = Image.open(io.BytesIO(data))
    shown.seek(1)
    return Case(data, np.asarray(shown.convert("RGB")), "frame 2 @ 0.50 s", np.asarray(frames[0]))


def multipage_tiff(seed: int = 7) -> Case:
    """Page 1 a harmless gradient, page 2 the picture (JPEG-compressed pages: a scanner's output, and small)."""
    buf = io.BytesIO()
    Image.fromarray(gradient()).save(buf, "TIFF", save_all=True, append_images=[target(seed)], compression="jpeg")
    data = buf.getvalue()
    shown = Image.open(io.BytesIO(data))
    shown.seek(1)
    return Case(data, np.asarray(shown.convert("RGB")), "page 2", gradient())


def long_image(wide: bool = True, seed: int = 7) -> Case:
    """224x672 (or 672x224) with the picture in its first third: the centre crop never sees it."""
    pic = np.asarray(target(seed))
    rest = np.concatenate([gradient(), gradient()[::-1]], axis=1 if wide else 0)
    full = np.concatenate([pic, rest], axis=1 if wide else 0)
    return Case(_png(Image.fromarray(full)), pic, "tile 1/3", full[:, 224:448] if wide else full[224:448])


def svg_embedding(seed: int = 7) -> Case:
    import base64

    png = base64.b64encode(_png(target(seed))).decode()
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="224" height="224" viewBox="0 0 224 224">'
        f'<image width="224" height="224" href="data:image/png;base64,{png}"/></svg>'
    )
    return Case(svg.encode(), np.asarray(target(seed)), None)


def heic(seed: int = 7) -> Case:
    import pillow_heif

    buf = io.BytesIO()
    pillow_heif.from_pillow(target(seed)).save(buf, quality=-1)  # lossless
    data = buf.getvalue()
    pillow_heif.register_heif_opener()
    return Case(data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), None)


def icc_inverted(seed: int = 7) -> Case:
    """The picture stored inverted, with an ICC profile whose tone curves invert it back (what Chromium shows)."""
    from tests.color_profiles import inverted_srgb_profile

    pic = np.asarray(target(seed))
    im = Image.fromarray(255 - pic)
    return Case(_png(im, icc_profile=inverted_srgb_profile()), pic, None, 255 - pic)


def ico(seed: int = 7) -> Case:
    """An icon whose 256x256 entry is harmless and whose 48x48 entry is the picture."""
    big, small = Image.fromarray(gradient((256, 256))), target(seed, size=(48, 48))
    buf = io.BytesIO()
    big.save(buf, "ICO", sizes=[(256, 256), (48, 48)], append_images=[small])
    data = buf.getvalue()
    return Case(data, np.asarray(small), "size 48x48", np.asarray(big))


def mpo(seed: int = 7) -> Case:
    """A two-image MPO (a stereo pair): the second image is the picture."""
    buf = io.BytesIO()
    Image.fromarray(gradient()).save(buf, "MPO", save_all=True, append_images=[target(seed)], quality=95)
    data = buf.getvalue()
    shown = Image.open(io.BytesIO(data))
    shown.seek(1)
    return Case(data, np.asarray(shown.convert("RGB")), "image 2", gradient())


def video(container: str = "mp4", seed: int = 7) -> Case:
    """Two seconds of a gradient, then the picture from 1.0 s to 1.5 s: sampled at 2 per second, it is found."""
    import av

    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}[container]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": "0"}
        for i in range(20):
            arr = np.asarray(target(seed)) if 10 <= i < 15 else gradient()
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    with av.open(io.BytesIO(data)) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
    return Case(data, frames[11], "frame @ 1.", frames[0])


CASES: dict[str, Callable[[], Case]] = {  # each hides its own picture (seed), so one policy can hold them all
    "alpha-over-white": lambda: alpha_camouflage(255, seed=10),
    "alpha-over-black": lambda: alpha_camouflage(0, seed=11),
    "animated-gif": lambda: animated("GIF", seed=12),
    "apng": lambda: animated("PNG", seed=13),
    "animated-webp": lambda: animated("WEBP", seed=14),
    "multipage-tiff": lambda: multipage_tiff(seed=15),
    "wide-224x672": lambda: long_image(True, seed=16),
    "tall-672x224": lambda: long_image(False, seed=17),
    "svg": lambda: svg_embedding(seed=18),
    "heic": lambda: heic(seed=19),
    "icc-inverted": lambda: icc_inverted(seed=20),
    "ico": lambda: ico(seed=21),
    "mpo": lambda: mpo(seed=22),
    "mp4": lambda: video("mp4", seed=23),
    "webm": lambda: video("webm", seed=24),
}


FILENAMES = {  # realistic names, and a few without a suffix (every path selects by content)
    "alpha-over-white": "alpha-white.png",
    "alpha-over-black": "alpha-black.png",
    "animated-gif": "anim.gif",
    "apng": "anim.png",
    "animated-webp": "anim.webp",
    "multipage-tiff": "scan.tiff",
    "wide-224x672": "banner.png",
    "tall-672x224": "strip.png",
    "svg": "drawing",  # an SVG without a suffix: found by its content
    "heic": "IMG_0001",  # an iPhone photo without a suffix
    "icc-inverted": "profile.png",
    "ico": "favicon.ico",
    "mpo": "stereo.mpo",
    "mp4": "clip.mp4",
    "webm": "clip.webm",
}


def write_policy(folder: Path, example: np.ndarray, action: str = "block", **extra) -> Path:
    """A policy whose only category (``target``) fires on ``example``; the stock decision leads to ``allow`` (the tiny
    stock concepts are random), so only the hidden picture is withheld."""
    examples = folder / "target"
    examples.mkdir(parents=True, exist_ok=True)
    Image.fromarray(example).save(examples / "example.png")
    policy = {
        "version": 1,
        "name": "hidden-picture",
        "nsfw_action": "allow",
        "unscorable_action": "block",
        **extra,
        "categories": {"target": {"action": action, "concepts": [{"images": "target", "threshold": THRESHOLD}]}},
    }
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path
