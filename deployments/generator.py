"""The Generator deployment: a thin adapter over the core ``Generator`` (one GPU per replica in GPU configs).

Compatible requests (same size, steps, guidance and SLD preset) are rendered in one pipeline call by a
:class:`~deployments.batching.GenerationBatcher`, each with its own seed.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from .batching import GenerationBatcher
from .metrics import GeneratorMetrics
from .settings import GeneratorArgs, GeneratorRuntime, import_factory


@serve.deployment(
    name="Generator",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=16,  # >= max_batch_images, or batches of one-image requests never fill
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
    user_config=GeneratorRuntime().model_dump(),
)
class GeneratorDeployment:
    def __init__(self, args: dict[str, Any] | None = None, limits: dict[str, Any] | None = None):
        from pipeline.requests import GenerationLimits

        self.args = GeneratorArgs(**(args or {}))
        self.limits = GenerationLimits(**(limits or {}))
        if self.args.factory:
            self.generator = import_factory(self.args.factory)(self.args, self.limits)
        else:
            from pipeline import Generator

            self.generator = Generator.load(
                self.args.model,
                self.args.device,
                self.args.dtype,
                text_encoder=self.args.text_encoder,
                limits=self.limits,
            )
        self.metrics = GeneratorMetrics()  # per pipeline call, and the batch queue's images waiting and rendering
        self.runtime = GeneratorRuntime()
        self.batcher = GenerationBatcher(
            _render_many(self.generator),
            _batch_key(self.generator),
            max_batch_images=self.runtime.max_batch_images,
            batch_wait_timeout_s=self.runtime.batch_wait_timeout_s,
            on_batch=self.metrics.batch,
            on_depth=self.metrics.depth,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.runtime = GeneratorRuntime(**(user_config or {}))
        self.batcher.configure(self.runtime.max_batch_images, self.runtime.batch_wait_timeout_s)

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        """A validated request's fields -> uint8 images (through the object store), seed, size, warnings, and the
        number of images in the pipeline call that rendered them (``batch_size``)."""
        from pipeline.requests import GenerationRequest

        parsed = GenerationRequest.parse(request, self.limits)
        rendering, batch_images = await self.batcher.submit(parsed)  # rendered off the replica's event loop
        # The model info travels with the images: a separate info() call would queue behind other renders.
        return {**rendering.__dict__, "batch_size": batch_images, "info": self.info()}

    def info(self) -> dict[str, Any]:
        return {**self.generator.info(), "batching": self.runtime.model_dump()}


def _render_many(generator: Any) -> Any:
    """The core's batched render, or one render per request for a generator without one (test fakes)."""
    if hasattr(generator, "render_many"):
        return generator.render_many
    return lambda requests: [generator.render(r) for r in requests]


def _batch_key(generator: Any) -> Any:
    if hasattr(generator, "batch_key"):
        return generator.batch_key
    return lambda r: (r.width, r.height, r.steps, r.guidance_scale, r.safety)
