"""The Generator deployment: a thin adapter over the core ``Generator`` (one GPU per replica in GPU configs)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.metrics import Counter

from .settings import GeneratorArgs, import_factory


@serve.deployment(
    name="Generator",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1},
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
        self.generated = Counter("diffguard_images_generated", description="images generated")

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        """A validated request's fields -> uint8 images (through the object store), seed, size and warnings."""
        from pipeline.requests import GenerationRequest

        parsed = GenerationRequest.parse(request, self.limits)
        rendering = await asyncio.to_thread(self.generator.render, parsed)  # off the replica's event loop
        self.generated.inc(len(rendering.images))
        # The model info travels with the images: a separate info() call would queue behind other renders.
        return {**rendering.__dict__, "info": self.generator.info()}

    def info(self) -> dict[str, Any]:
        return self.generator.info()
