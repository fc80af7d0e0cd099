"""The checker core against diffusers' checker as the diffusers pipeline runs it, and against the matmul limit.

Reference (``run_safety_checker``): ``CLIPImageProcessor`` on PIL images, then ``StableDiffusionSafetyChecker.forward``
under ``no_grad`` (its per-image Python loop included). Core: ``SafetyChecker.check`` on the same pictures as uint8
arrays (one view each, as generated images are scored: the reference's work, nothing more; the extra views of long or
translucent files are measured in ``bench.views``). Both hold the same randomly initialised weights (``bench.models``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

import numpy as np
import torch

from pipeline import SafetyChecker
from pipeline.hf import quiet_libraries
from pipeline.preprocess import processor_class
from pipeline.tiny import set_thresholds, widest_gap

from . import models
from .measure import flops_per_image, interleaved, matmul_peak, rate, timed

log = logging.getLogger("bench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CorePlan:
    batches: tuple[int, ...]  # batch sizes; the largest runs over the whole agreement set
    agree_images: int  # images whose decisions are compared (a multiple of the largest batch)
    small_images: int  # images timed at each smaller batch size: max(3, small_images // batch) calls after a warm-up


class Reference:
    """diffusers' path: CLIPImageProcessor (PIL) -> StableDiffusionSafetyChecker.forward, in ``dtype``."""

    name = "diffusers"

    def __init__(self, directory: Any, dtype: str):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        self.dtype = dtype
        self.model = StableDiffusionSafetyChecker.from_pretrained(directory).eval().to(DTYPES[dtype])
        self.processor = processor_class().from_pretrained(directory)

    def __call__(self, pictures: list[Any]) -> list[bool]:
        pixels = self.processor(pictures, return_tensors="pt").pixel_values
        with torch.no_grad():  # the pipeline's __call__ runs under no_grad
            _, nsfw = self.model(clip_input=pixels.to(DTYPES[self.dtype]), images=[np.asarray(p) for p in pictures])
        return nsfw

    def capture(self, store: list[torch.Tensor]) -> Any:
        return self.model.vision_model.register_forward_hook(lambda m, i, out: store.append(out[1].detach()))

    def replay(self, pooled: torch.Tensor, special: np.ndarray, concept: np.ndarray) -> list[bool]:
        """The reference's own scoring on captured vision outputs, under other thresholds."""
        with torch.no_grad():  # in the model's dtype, as a pipeline in that dtype holds them
            self.model.special_care_embeds_weights.copy_(torch.from_numpy(special))
            self.model.concept_embeds_weights.copy_(torch.from_numpy(concept))
        vision = self.model.vision_model
        self.model.vision_model = _Replay(pooled)
        try:
            with torch.no_grad():
                return self.model(clip_input=torch.empty(0), images=[np.zeros(1) for _ in range(len(pooled))])[1]
        finally:
            self.model.vision_model = vision

    def embeds(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.visual_projection(pooled).float()


class _Replay(torch.nn.Module):
    def __init__(self, pooled: torch.Tensor):
        super().__init__()
        self.pooled = pooled

    def forward(self, _: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.pooled


class Core:
    """diffguard's ``SafetyChecker.check`` (tensor preprocessing, one vision pass, one matmul for every concept)."""

    name = "diffguard"

    def __init__(self, directory: Any, dtype: str, max_batch: int):
        self.dtype = dtype
        self.checker = SafetyChecker.load(str(directory), "cpu", dtype, policy="stock", max_batch_size=max_batch)

    def __call__(self, pictures: list[Any]) -> list[bool]:
        return [v.nsfw for v in self.checker.check([np.asarray(p) for p in pictures])]

    def capture(self, store: list[torch.Tensor]) -> Any:
        return self.checker.projection.register_forward_hook(lambda m, i, out: store.append(out.detach().float()))

    def replay(self, embeds: torch.Tensor, ref: Reference, special: np.ndarray, concept: np.ndarray) -> list[bool]:
        set_thresholds(ref.model, self.checker, special, concept)
        return [v.nsfw for v in self.checker.verdicts(self.checker.score_embeddings(embeds))]


def run_core(arch: str, plan: CorePlan) -> dict[str, Any]:
    """Images/s per (implementation, dtype, batch), decision agreement with the float32 reference, roofline."""
    quiet_libraries()
    spec = models.ARCHS[arch]
    directory = models.model_dir(arch)
    top = max(plan.batches)
    if plan.agree_images % top:
        raise ValueError(f"agree_images ({plan.agree_images}) must be a multiple of the largest batch ({top})")
    impls: list[Any] = [
        Reference(directory, "float32"),
        Core(directory, "float32", top),
        Core(directory, "bfloat16", top),
        Reference(directory, "bfloat16"),
    ]
    pictures = models.images(plan.agree_images, seed=1)
    rows, captured, decided = [], {}, {}
    for batch in sorted(plan.batches):
        if batch == top:  # the whole agreement set once, with every implementation's embeddings captured
            calls, warmup = [pictures[i : i + top] for i in range(0, len(pictures), top)], 0
        else:
            stream = cycle(pictures)
            calls, warmup = [list(islice(stream, batch)) for _ in range(max(3, plan.small_images // batch) + 1)], 1
        stores: list[list[torch.Tensor]] = [[] for _ in impls]
        hooks = [impl.capture(store) for impl, store in zip(impls, stores, strict=True)] if batch == top else []
        try:
            timings = interleaved(impls, calls, warmup)
        finally:
            for hook in hooks:
                hook.remove()
        for impl, store, (secs, outs) in zip(impls, stores, timings, strict=True):
            if batch == top:
                captured[(impl.name, impl.dtype)] = torch.cat(store)
                decided[(impl.name, impl.dtype)] = [d for out in outs for d in out]
            row = {"impl": impl.name, "dtype": impl.dtype, "batch": batch, "calls": len(secs)}
            row |= {"images_per_s": rate(batch, secs), "best_images_per_s": batch / min(secs)}
            rows.append(row)
            log.info("core %s %s %s batch %d: %.2f images/s", arch, impl.name, impl.dtype, batch, row["images_per_s"])
    _ratios(rows)
    result = {
        "arch": spec.label,
        "model": str(directory),
        "rows": rows,
        "agreement": _agreement(impls, captured, decided),
        "roofline": _roofline(spec, impls[1].checker, rows, plan.batches),
    }
    return result


def _ratios(rows: list[dict[str, Any]]) -> None:
    ref = {(r["dtype"], r["batch"]): r["images_per_s"] for r in rows if r["impl"] == "diffusers"}
    for r in rows:
        r["x_ref_float32"] = r["images_per_s"] / ref[("float32", r["batch"])]
        r["x_ref_same_dtype"] = r["images_per_s"] / ref[(r["dtype"], r["batch"])]


def _agreement(impls: list[Any], captured: dict, decided: dict) -> dict[str, Any]:
    """Decisions against the float32 reference's, under two threshold settings.

    ``calibrated``: the model's thresholds (high quantiles on separate calibration pictures), as deployed. Margins
    crowd around 0 with random weights, so this is the harsh case. ``parity``: per-concept thresholds in the widest
    gap of the float32 reference's cosines, as tests/unit/test_parity.py chooses them (both outcomes, no margin
    within rounding distance of 0), replayed through each implementation's own scoring on its captured embeddings.
    """
    ref32 = impls[0]
    base = decided[("diffusers", "float32")]
    with torch.no_grad():
        e = torch.nn.functional.normalize(ref32.embeds(captured[("diffusers", "float32")]))
        special = (e @ torch.nn.functional.normalize(ref32.model.special_care_embeds).T).numpy()
        concept = (e @ torch.nn.functional.normalize(ref32.model.concept_embeds).T).numpy()
        calibrated = ref32.model.concept_embeds_weights.float().numpy().copy()
        rows = torch.nn.functional.normalize(ref32.model.concept_embeds.float())
        cos = {k: (torch.nn.functional.normalize(_embeds(impls, k, v)) @ rows.T).numpy() for k, v in captured.items()}
    special_thr = np.array([widest_gap(special[:, j], 0.5, 0.9) for j in range(special.shape[1])], np.float32)
    concept_thr = np.array([widest_gap(concept[:, j], 0.92, 1.0) for j in range(concept.shape[1])], np.float32)
    # How close to a threshold the reference's cosines sit, against how far another implementation's move.
    nearest = np.abs(concept - calibrated).min(axis=1)  # (images,) distance of the closest concept to its threshold
    parity = {}
    for impl in impls:
        key = (impl.name, impl.dtype)
        if isinstance(impl, Reference):
            parity[key] = impl.replay(captured[key], special_thr, concept_thr)
        else:
            parity[key] = impl.replay(captured[key], ref32, special_thr, concept_thr)
    out = {"images": len(base)}
    for impl in impls[1:]:
        key = (impl.name, impl.dtype)
        drift = float(np.abs(cos[key] - concept).max())
        out[f"{impl.name} {impl.dtype}"] = {
            "calibrated": _agree(decided[key], base),
            "parity": _agree(parity[key], parity[("diffusers", "float32")]),
            "max_cosine_difference": drift,
            "images_within_it_of_a_threshold": int((nearest < drift).sum()),
        }
    out["flagged_by_reference"] = {"calibrated": sum(base), "parity": sum(parity[("diffusers", "float32")])}
    out["cosine_spread"] = float(concept.std(axis=0).mean())  # across images, per concept, averaged
    return out


def _embeds(impls: list[Any], key: tuple[str, str], captured: torch.Tensor) -> torch.Tensor:
    """Captured outputs -> (N, D) float32 image embeddings (references capture the pooled output before projection)."""
    impl = next(i for i in impls if (i.name, i.dtype) == key)
    return impl.embeds(captured) if isinstance(impl, Reference) else captured.float()


def _agree(ours: list[bool], ref: list[bool]) -> dict[str, Any]:
    same = [a == b for a, b in zip(ours, ref, strict=True)]
    return {"agreement": float(np.mean(same)), "differ": len(same) - sum(same)}


def _roofline(spec: models.Arch, checker: SafetyChecker, rows: list[dict], batches: tuple[int, ...]) -> dict[str, Any]:
    """The machine's GEMM throughput per dtype (on this model's own layer shapes) and each row's share of it."""
    tokens = 8 * (1 + (224 // spec.vision["patch_size"]) ** 2)  # batch 8's rows of every linear layer
    hidden, inner = spec.vision["hidden_size"], spec.vision["intermediate_size"]
    shapes = [(tokens, hidden, inner), (tokens, inner, hidden), (tokens, hidden, 3 * hidden), (2048, 2048, 2048)]
    flops = flops_per_image(checker.vision, checker.projection)
    peaks = {name: matmul_peak(dtype, shapes) for name, dtype in DTYPES.items()}
    for r in rows:  # best call against the best GEMM call: both at the machine's quietest moment
        r["gflops"] = r["best_images_per_s"] * flops / 1e9
        r["roofline"] = r["gflops"] / peaks[r["dtype"]]["gflops"]
    return {"gflop_per_image": flops / 1e9, "peak_gflops": peaks}


def run_preprocess(n: int, calls: int) -> list[dict[str, Any]]:
    """The core's tensor preprocessing against CLIPImageProcessor on the same pictures (uint8 arrays vs PIL)."""
    quiet_libraries()
    directory = models.model_dir("vit-b-32")
    processor = processor_class().from_pretrained(directory)
    checker = SafetyChecker.load(str(directory), "cpu", "float32", policy="stock")
    out = []
    for label, pictures in (("512x512", models.images(n, seed=2, size=512)), ("varied", models.images(n, seed=2))):
        arrays = models.arrays(pictures)
        ref_secs, _ = timed(lambda p: processor(p, return_tensors="pt"), [pictures] * (calls + 1), warmup=1)
        core_secs, _ = timed(checker.preprocess, [arrays] * (calls + 1), warmup=1)
        ref, core = rate(n, ref_secs), rate(n, core_secs)
        out.append({"images": label, "batch": n, "clip_image_processor": ref, "diffguard": core, "x_ref": core / ref})
    return out


def bytes_rates(directory: Any, dtype: str, bodies: list[bytes], batches: list[int]) -> dict[int, float]:
    """The core alone, in this process, from encoded bytes to verdicts (decode, preprocess, vision pass, scoring):
    what the service's checker replica and the scan's actors do per batch."""
    checker = SafetyChecker.load(str(directory), "cpu", dtype, policy="stock", max_batch_size=max(batches))
    out = {}
    for b in batches:
        calls = max(3, 96 // b)
        chunks = [[bodies[(i * b + j) % len(bodies)] for j in range(b)] for i in range(calls + 1)]
        secs, _ = timed(checker.check, chunks, warmup=1)
        out[b] = rate(b, secs)
    return out
