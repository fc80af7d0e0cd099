"""Cross-request generation batching: compatible requests share one pipeline call, FIFO across shapes.

Plain asyncio (no Ray), so it is tested and benchmarked without Serve; the Generator deployment holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ray.serve")


@dataclass
class _Pending:
    request: Any
    key: Hashable
    images: int
    arrived: float
    future: asyncio.Future[tuple[Any, int]] = field(repr=False)


class GenerationBatcher:
    """Renders queued requests in batches of equal ``key(request)``, up to ``max_batch_images`` images per call.

    The oldest waiting request always leads the next batch: it waits at most ``batch_wait_timeout_s`` for
    compatible company (or until its batch is full), then renders with whatever compatible requests queued behind
    it, so no request waits behind an incompatible queue for longer than the batches ahead of it take to render.
    ``render_many(requests)`` runs in a worker thread and returns one result per request, in order.
    ``on_depth(queued_images, inflight_images)`` is told each time either changes: images of the requests waiting in
    the queue, and of the batch being rendered (a failed batch's requests count until their retries end).

    >>> batcher = GenerationBatcher(generator.render_many, generator.batch_key, max_batch_images=8)
    >>> rendering, batch_images = await batcher.submit(request)
    """

    def __init__(
        self,
        render_many: Callable[[list[Any]], list[Any]],
        key: Callable[[Any], Hashable],
        *,
        max_batch_images: int = 8,
        batch_wait_timeout_s: float = 0.05,
        on_batch: Callable[[int, int], None] | None = None,
        on_depth: Callable[[int, int], None] | None = None,
    ):
        self.render_many, self.key, self.on_batch, self.on_depth = render_many, key, on_batch, on_depth
        self.configure(max_batch_images, batch_wait_timeout_s)
        self._pending: list[_Pending] = []
        self.inflight_images = 0  # images of the batch being rendered now
        self._told = (0, 0)  # the depth on_depth was last told
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    def configure(self, max_batch_images: int, batch_wait_timeout_s: float) -> None:
        if max_batch_images < 1 or batch_wait_timeout_s < 0:
            raise ValueError(
                f"max_batch_images must be >= 1 and batch_wait_timeout_s >= 0, got {max_batch_images} and "
                f"{batch_wait_timeout_s}"
            )
        self.max_batch_images, self.batch_wait_timeout_s = max_batch_images, batch_wait_timeout_s

    async def submit(self, request: Any) -> tuple[Any, int]:
        """The request's result and the number of images in the pipeline call that rendered it."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        item = _Pending(request, self.key(request), request.num_images, loop.time(), loop.create_future())
        self._pending.append(item)
        item.future.add_done_callback(self._depth)  # a caller that gives up while queued leaves the queue's count
        self._depth()
        assert self._arrived is not None
        self._arrived.set()
        return await item.future

    @property
    def queued_images(self) -> int:
        """Images of the requests waiting in the queue (not rendering yet; callers that gave up not counted)."""
        return sum(p.images for p in self._pending if not p.future.done())

    def _depth(self, _: object = None) -> None:
        depth = (self.queued_images, self.inflight_images)
        if self.on_depth is not None and depth != self._told:
            self._told = depth
            self.on_depth(*depth)

    def _group(self, head: _Pending) -> list[_Pending]:
        """The head and the compatible requests behind it, in arrival order, while they fit the batch."""
        group, images = [head], head.images
        for item in self._pending[1:]:
            if item.key != head.key or item.future.done():
                continue
            if images + item.images > self.max_batch_images:
                break
            group.append(item)
            images += item.images
        return group

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        arrived = self._arrived
        assert arrived is not None
        while True:
            self._pending = [p for p in self._pending if not p.future.done()]  # callers that gave up
            if not self._pending:
                arrived.clear()
                await arrived.wait()
                continue
            head = self._pending[0]
            while True:
                group = self._group(head)
                remaining = head.arrived + self.batch_wait_timeout_s - loop.time()
                if sum(p.images for p in group) >= self.max_batch_images or remaining <= 0:
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), remaining)
                if head.future.done():
                    break
            if head.future.done():
                continue
            taken = {id(p) for p in group}
            self._pending = [p for p in self._pending if id(p) not in taken]
            await self._render(group)

    async def _render(self, group: list[_Pending]) -> None:
        """Render a batch taken off the queue; its images count as in flight until every request of it is settled
        (or the worker is cancelled)."""
        images = sum(p.images for p in group)
        self.inflight_images += images
        self._depth()
        try:
            await self._render_now(group, images)
        finally:
            self.inflight_images -= images
            self._depth()

    async def _render_now(self, group: list[_Pending], images: int) -> None:
        try:
            results = await asyncio.to_thread(self.render_many, [p.request for p in group])
        except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the others
            if len(group) == 1:
                _settle(group[0].future, exc=exc)
                return
            log.warning("generation batch of %d requests failed (%r); rendering each alone", len(group), exc)
            for p in group:
                await self._render_now([p], p.images)
            return
        if self.on_batch is not None:
            self.on_batch(len(group), images)
        for p, result in zip(group, results, strict=True):
            _settle(p.future, result=(result, images))


def _settle(future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled (e.g. its timeout) while we rendered
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
