"""Cross-request generation batching on the real tiny diffusers pipeline: a request's images in a batch match its
unbatched render (within 1/255 per channel, measured: at most 1), with the same verdicts, for every SLD preset; the
batcher groups compatible requests, keeps incompatible ones apart and serves the oldest first."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from deployments.batching import GenerationBatcher
from pipeline import InvalidInput
from pipeline.generator import SLD_PRESETS, GenerationRequest, Generator

TOLERANCE = 1  # uint8 levels: batched kernels reduce in another order; measured max 1 on CPU float32


@pytest.fixture(scope="module")
def gen():
    return Generator.load("tiny", device="cpu", dtype="float32")


def req(**kw):
    return GenerationRequest.parse({"prompt": "a red bicycle", "steps": 3, "seed": 1, **kw})


def mixed(safety: str) -> list[GenerationRequest]:
    """Different prompts, negative prompts (one absent), seeds and image counts: one compatible batch of 6 images."""
    return [
        req(seed=1, num_images=2, safety=safety),
        req(prompt="a cat on a sofa", negative_prompt="blurry, dark", seed=9, safety=safety),
        req(prompt="a harbour at dusk", negative_prompt="people", seed=123456, num_images=3, safety=safety),
    ]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("safety", ["off", *SLD_PRESETS])
def test_batched_images_match_each_request_alone_with_the_same_verdicts(gen, checker, safety):
    requests = mixed(safety)
    alone = [gen.render(r) for r in requests]
    batched = gen.render_many(requests)
    assert [b.seed for b in batched] == [r.seed for r in requests]
    assert [len(b.images) for b in batched] == [1 * r.num_images for r in requests]
    for a, b in zip(alone, batched, strict=True):
        assert max_diff(a.images, b.images) <= TOLERANCE
        va, vb = checker.check_arrays(a.images), checker.check_arrays(b.images)
        assert [(v.nsfw, v.flagged_categories, v.bad_concept_names) for v in va] == [
            (v.nsfw, v.flagged_categories, v.bad_concept_names) for v in vb
        ]
    # Not vacuous: the requests' images differ from one another, and a different seed changes a request's images.
    assert max_diff(alone[0].images[:1], alone[1].images) > 10
    assert max_diff(gen.render(req(seed=2, num_images=2, safety=safety)).images, alone[0].images) > 10


def test_single_request_keeps_its_pre_batching_pixels(gen):
    """The unbatched path draws the request's latents from one CPU generator as diffusers did before: a seed that
    reproduced images before batching existed still does (DDIM with eta 0 adds no per-step noise)."""
    import torch

    r = req(num_images=2)
    legacy = gen.pipe(
        prompt=r.prompt,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images
    legacy_u8 = list((np.clip(legacy, 0, 1) * 255).round().astype(np.uint8))
    assert max_diff(gen.render(r).images, legacy_u8) == 0


def test_incompatible_requests_are_refused_together(gen):
    assert gen.batch_key(req()) == (64, 64, 3, 7.5, "off")
    assert gen.batch_key(req(width=96)) != gen.batch_key(req())
    with pytest.raises(InvalidInput, match=r"need equal \(width, height, steps, guidance, safety\)"):
        gen.render_many([req(), req(steps=4)])


class Recorder:
    """Wraps the real generator's render_many and records each call's requests (the thing under test is the
    batcher; the renders are real)."""

    def __init__(self, gen: Generator, gate: threading.Event | None = None):
        self.gen, self.gate, self.calls = gen, gate, []

    def __call__(self, requests):
        if self.gate is not None:
            self.gate.wait(30)
        self.calls.append([(r.prompt, r.width, r.num_images) for r in requests])
        return self.gen.render_many(requests)


def test_batcher_groups_compatible_requests_up_to_max_images(gen):
    rec = Recorder(gen)
    requests = [req(prompt=f"p{i}", seed=i) for i in range(5)] + [req(prompt="two", num_images=2, seed=7)]

    async def main():
        batcher = GenerationBatcher(rec, gen.batch_key, max_batch_images=4, batch_wait_timeout_s=0.5)
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    results = asyncio.run(main())
    assert rec.calls == [
        [("p0", None, 1), ("p1", None, 1), ("p2", None, 1), ("p3", None, 1)],
        [("p4", None, 1), ("two", None, 2)],
    ]
    assert [n for _, n in results] == [4, 4, 4, 4, 3, 3]
    for r, (rendering, _) in zip(requests, results, strict=True):
        assert max_diff(rendering.images, gen.render(r).images) <= TOLERANCE


def test_batcher_keeps_shapes_apart_and_serves_the_oldest_first(gen):
    """While the first batch renders (held on a gate), a wide request arrives, then more square ones: the wide one
    renders next, alone, before the square ones that came after it, which then share one call."""
    gate = threading.Event()
    rec = Recorder(gen, gate)

    async def main():
        batcher = GenerationBatcher(rec, gen.batch_key, max_batch_images=8, batch_wait_timeout_s=0.05)
        first = asyncio.ensure_future(batcher.submit(req(prompt="first")))
        await asyncio.sleep(0.2)  # the first batch is rendering (blocked on the gate)
        wide = asyncio.ensure_future(batcher.submit(req(prompt="wide", width=96)))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(batcher.submit(req(prompt=f"sq{i}", seed=i))) for i in range(3)]
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(first, wide, *later)

    results = asyncio.run(main())
    assert rec.calls == [
        [("first", None, 1)],
        [("wide", 96, 1)],
        [("sq0", None, 1), ("sq1", None, 1), ("sq2", None, 1)],
    ]
    assert [n for _, n in results] == [1, 1, 3, 3, 3]
    assert results[1][0].images[0].shape == (64, 96, 3)


def test_batcher_with_one_image_batches_renders_each_request_alone(gen):
    rec = Recorder(gen)

    async def main():
        batcher = GenerationBatcher(rec, gen.batch_key, max_batch_images=1, batch_wait_timeout_s=0.05)
        return await asyncio.gather(*(batcher.submit(req(prompt=f"p{i}", num_images=1 + i)) for i in range(3)))

    results = asyncio.run(main())
    assert [len(c) for c in rec.calls] == [1, 1, 1] and [n for _, n in results] == [1, 2, 3]


def test_a_failing_batch_is_retried_alone_so_only_the_bad_request_fails(gen):
    def render_many(requests):
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("out of memory")
        return gen.render_many(requests)

    async def main():
        batcher = GenerationBatcher(render_many, gen.batch_key, max_batch_images=8, batch_wait_timeout_s=0.2)
        return await asyncio.gather(
            *(batcher.submit(req(prompt=p)) for p in ("ok1", "boom", "ok2")), return_exceptions=True
        )

    ok1, boom, ok2 = asyncio.run(main())
    assert isinstance(boom, RuntimeError) and str(boom) == "out of memory"
    assert ok1[1] == 1 and ok2[1] == 1 and len(ok1[0].images) == 1


def test_batcher_refuses_bad_settings(gen):
    with pytest.raises(ValueError, match="max_batch_images must be >= 1"):
        GenerationBatcher(gen.render_many, gen.batch_key, max_batch_images=0)


# --- the queue and in-flight gauges (diffguard_generator_queue_images / _inflight_images) ---------------------------
class Job:
    """A request as the batcher sees it: its images, and a name the fake render answers with."""

    def __init__(self, name: str, num_images: int = 1):
        self.name, self.num_images = name, num_images


class Gated:
    """A fake render_many (the batcher is under test, not the renders): it says when it starts, waits for its gate,
    then answers each job's name, or raises for a batch holding a job named "boom"."""

    def __init__(self):
        self.started, self.gate, self.calls = threading.Event(), threading.Event(), []

    def __call__(self, jobs):
        self.calls.append([j.name for j in jobs])
        self.started.set()
        self.gate.wait(30)
        if any(j.name == "boom" for j in jobs):
            raise RuntimeError("out of memory")
        return [j.name for j in jobs]


def depth_batcher(render, max_batch_images: int) -> tuple[GenerationBatcher, list[tuple[int, int]]]:
    told: list[tuple[int, int]] = []
    batcher = GenerationBatcher(
        render,
        lambda job: "one shape",
        max_batch_images=max_batch_images,
        batch_wait_timeout_s=30,  # only full batches start: no test depends on a timer
        on_depth=lambda queued, inflight: told.append((queued, inflight)),
    )
    return batcher, told


async def until(condition) -> None:
    """Let the loop run until ``condition()`` holds (a hang, not a timing bound, is what the 30 s guard catches)."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), 30)


def test_gauges_count_images_queued_then_rendering_then_none():
    """A batch of 2 images renders (held on the gate) while 1 + 1 more queue behind it; when it ends they become
    the next batch; every change is told once, and both counts end at 0."""
    render = Gated()
    batcher, told = depth_batcher(render, max_batch_images=2)

    async def main():
        first = asyncio.ensure_future(batcher.submit(Job("a", 2)))
        await asyncio.to_thread(render.started.wait, 30)
        later = [asyncio.ensure_future(batcher.submit(Job(name))) for name in ("b", "c")]
        await until(lambda: batcher.queued_images == 2)
        assert (batcher.queued_images, batcher.inflight_images) == (2, 2)
        render.gate.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [("a", 2), ("b", 2), ("c", 2)]
    assert render.calls == [["a"], ["b", "c"]]
    assert told == [(2, 0), (0, 2), (1, 2), (2, 2), (2, 0), (0, 2), (0, 0)]
    assert (batcher.queued_images, batcher.inflight_images) == (0, 0)


def test_a_failed_batch_counts_in_flight_until_its_retries_end_then_none():
    render = Gated()
    render.gate.set()
    batcher, told = depth_batcher(render, max_batch_images=2)

    async def main():
        return await asyncio.gather(batcher.submit(Job("ok")), batcher.submit(Job("boom")), return_exceptions=True)

    ok, boom = asyncio.run(main())
    assert ok == ("ok", 1) and isinstance(boom, RuntimeError)
    assert render.calls == [["ok", "boom"], ["ok"], ["boom"]]  # the batch, then each request alone
    assert told == [(1, 0), (2, 0), (0, 2), (0, 0)]


def test_callers_that_give_up_leave_the_queue_at_once_and_the_render_when_it_ends():
    """Cancelled while queued: out of the queue's count now. Cancelled while rendering: the images are still being
    rendered (a worker thread cannot be stopped), so they count until the render ends, then 0."""
    render = Gated()
    batcher, told = depth_batcher(render, max_batch_images=1)

    async def main():
        rendering = asyncio.ensure_future(batcher.submit(Job("a")))
        await asyncio.to_thread(render.started.wait, 30)
        queued = asyncio.ensure_future(batcher.submit(Job("b", 3)))
        await until(lambda: batcher.queued_images == 3)
        queued.cancel()
        rendering.cancel()
        await until(lambda: batcher.queued_images == 0)
        assert batcher.inflight_images == 1
        render.gate.set()
        await until(lambda: batcher.inflight_images == 0)

    asyncio.run(main())
    assert render.calls == [["a"]]  # the cancelled queued request never rendered
    assert told == [(1, 0), (0, 1), (3, 1), (0, 1), (0, 0)]
