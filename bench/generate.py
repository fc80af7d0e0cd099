"""Generation throughput with cross-request batching on and off, and the checker's fed pipeline.

``generate``: closed-loop asyncio clients submit to a :class:`~deployments.batching.GenerationBatcher` over the real
tiny diffusers pipeline (the Generator replica's own queue, without Ray's hops), batching on (``max_batch_images`` 8)
and off (1) alternated in short windows so drift on a shared machine hits both alike; one shape, then a mix of two.

``fed checker``: batches of PNG uploads through the core checker, decode then vision pass one after the other (as the
replica did) and with the next batch's decoding overlapped on a worker thread (as it does now), with the per-image
decode / preprocess / model split.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import models


@dataclass(frozen=True)
class GeneratePlan:
    clients: tuple[int, ...] = (1, 4, 8, 16)
    steps: int = 4  # denoising steps per request
    rounds: int = 2  # on/off windows per (clients, shapes), alternated
    window_s: float = 3.0  # seconds per window
    max_batch_images: int = 8
    checker_batches: int = 6  # fed-checker batches of checker_batch images
    checker_batch: int = 16


def run_generate_bench(plan: GeneratePlan) -> dict[str, Any]:
    from pipeline.generator import GenerationRequest, Generator

    gen = Generator.load("tiny", device="cpu", dtype="float32")
    shapes = {"same": [(64, 64)], "two shapes": [(64, 64), (96, 64)]}
    rows = []
    for label, sizes in shapes.items():
        for clients in plan.clients:

            def request(i: int, k: int, sizes: list[tuple[int, int]] = sizes) -> Any:
                w, h = sizes[i % len(sizes)]
                body = {"prompt": f"a red bicycle {i}.{k}", "steps": plan.steps, "seed": k, "width": w, "height": h}
                return GenerationRequest.parse(body)

            rates: dict[str, list[float]] = {"on": [], "off": []}
            batch_means: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(plan.rounds):
                for mode in ("off", "on"):
                    limit = plan.max_batch_images if mode == "on" else 1
                    images_s, mean_batch = asyncio.run(_drive(gen, request, clients, limit, plan.window_s))
                    rates[mode].append(images_s)
                    batch_means[mode].append(mean_batch)
            on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
            rows.append(
                {
                    "shapes": label,
                    "clients": clients,
                    "off_images_s": off,
                    "on_images_s": on,
                    "ratio": on / off if off else None,
                    "mean_batch_images_on": statistics.mean(batch_means["on"]),
                }
            )
    return {
        "model": "tiny SD pipeline (CPU float32, 64 px)",
        "steps": plan.steps,
        "rows": rows,
        "checker": run_fed_checker(plan),
    }


async def _drive(gen: Any, request: Any, clients: int, max_images: int, window_s: float) -> tuple[float, float]:
    from deployments.batching import GenerationBatcher

    batches: list[int] = []
    batcher = GenerationBatcher(
        gen.render_many,
        gen.batch_key,
        max_batch_images=max_images,
        batch_wait_timeout_s=0.05,
        on_batch=lambda _requests, images: batches.append(images),
    )
    done: list[float] = []
    stop = time.perf_counter() + window_s

    async def client(i: int) -> None:
        k = 0
        while time.perf_counter() < stop:
            rendering, _ = await batcher.submit(request(i, k))
            done.append(time.perf_counter())
            k += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = max(done) - start if done else window_s
    return len(done) / elapsed, (statistics.mean(batches) if batches else 0.0)


def run_fed_checker(plan: GeneratePlan) -> dict[str, Any]:
    """Serial (decode, then preprocess + model) vs fed (decode of batch k+1 overlapping model of batch k)."""
    from pipeline import SafetyChecker
    from pipeline.images import load_decoded

    checker = SafetyChecker.load(str(models.model_dir("vit-b-32")), "cpu", "float32", policy="stock", max_batch_size=64)
    bodies = models.pngs(models.images(plan.checker_batch * plan.checker_batches, size=512))
    batches = [bodies[i : i + plan.checker_batch] for i in range(0, len(bodies), plan.checker_batch)]
    split = {"decode": 0.0, "preprocess": 0.0, "model": 0.0}
    original = checker.preprocess

    def timed_preprocess(arrays: Any) -> Any:
        t0 = time.perf_counter()
        out = original(arrays)
        split["preprocess"] += time.perf_counter() - t0
        return out

    checker.preprocess = timed_preprocess

    def decode(batch: list[bytes]) -> Any:
        t0 = time.perf_counter()
        out = load_decoded(batch, checker.limits)
        split["decode"] += time.perf_counter() - t0
        return out

    def score(decoded: Any) -> Any:
        t0, pre = time.perf_counter(), split["preprocess"]
        out = checker.check_arrays(decoded)
        split["model"] += time.perf_counter() - t0 - (split["preprocess"] - pre)
        return out

    score(decode(batches[0]))  # warm-up
    results = {}
    for mode in ("serial", "fed", "serial", "fed"):
        for k in split:
            split[k] = 0.0
        t0 = time.perf_counter()
        if mode == "serial":
            verdicts = [score(decode(b)) for b in batches]
        else:
            with ThreadPoolExecutor(1) as pool:
                nxt = pool.submit(decode, batches[0])
                verdicts = []
                for k in range(len(batches)):
                    decoded = nxt.result()
                    if k + 1 < len(batches):
                        nxt = pool.submit(decode, batches[k + 1])
                    verdicts.append(score(decoded))
        elapsed = time.perf_counter() - t0
        n = sum(len(v) for v in verdicts)
        per_image = {f"{k}_ms": 1000 * v / n for k, v in split.items()}
        best = results.get(mode)
        if best is None or n / elapsed > best["images_s"]:
            results[mode] = {"images_s": n / elapsed, **per_image}
    checker.preprocess = original
    results["ratio"] = results["fed"]["images_s"] / results["serial"]["images_s"]
    results["batch"] = plan.checker_batch
    results["model"] = "ViT-B/32 checker (random weights), 512 px PNG uploads"
    return results
