"""The application builder: ``import_path: deployments.app:build_app`` in a Serve config.

Importing this module is cheap (no torch, no weights), so ``serve build``, config validation and the CLI stay fast.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .checker import SafetyCheckerDeployment
from .generator import GeneratorDeployment
from .ingress import Ingress
from .quota import QuotaKeeper
from .settings import AppArgs


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Ingress -> Generator -> SafetyChecker (generate) and Ingress -> SafetyChecker (moderate); every Ingress
    replica draws its keys' quotas from the one QuotaKeeper."""
    settings = AppArgs(**(args or {}))
    checker = SafetyCheckerDeployment.bind(settings.checker.model_dump())
    generator = None
    if settings.generator is not None:
        generator = GeneratorDeployment.bind(settings.generator.model_dump(), settings.ingress.limits)
    limits = settings.checker.spec().limits()
    return Ingress.bind(checker, generator, settings.ingress.model_dump(), limits, QuotaKeeper.bind())
